"""Input audit of the public entry points: bad input is refused with a ValueError or
TypeError that names the parameter; valid edge cases keep working.

Each ``*_rejects`` test lists, per entry point, the bad inputs and the name the error
message must contain. The models are tiny (``TransformerConfig.preset("tiny")``), so
the whole file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tutorial_lib import (CausalLM, Encoder, MaskedLM, SequenceClassifier, TransformerConfig,
                          build_model)
from tutorial_lib.data.batching import (IGNORE_INDEX, ClassificationCollator, MLMCollator,
                                        causal_lm_blocks, classification_examples,
                                        mlm_examples, pad_batch)
from tutorial_lib.data.tokenization import (CharTokenizer, train_bpe, train_wordpiece,
                                            truncation_lengths)
from tutorial_lib.training.evaluation import (classification_metrics, fixed_batches,
                                              masked_lm_metrics)
from tutorial_lib.training.loop import (BatchLoader, TrainConfig, count_shifted_targets,
                                        evaluate_loss, lr_multiplier, parameter_groups,
                                        split_batch, train)

VOCAB = 50
BATCH, SEQ = 2, 6
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)


def tiny(**overrides) -> TransformerConfig:
    return TransformerConfig.preset("tiny", vocab_size=VOCAB, hidden_dropout=0.0,
                                    attention_dropout=0.0, **overrides)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "classifier": SequenceClassifier(tiny(), num_labels=3).eval(),
        "regressor": SequenceClassifier(tiny(), num_labels=1, pooling="mean").eval(),
        "mlm": MaskedLM(tiny()).eval(),
        "sparse-mlm": MaskedLM(tiny(), sparse_prediction=True).eval(),
        "causal-lm": CausalLM(tiny(causal=True, norm_position="pre")).eval(),
        "sinusoidal": Encoder(tiny(position_embedding="sinusoidal")).eval(),
        "rope": Encoder(tiny(position_embedding="none", rotary=True)).eval(),
    }


def ids(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.arange(batch * seq).reshape(batch, seq) % (VOCAB - 5) + 5


def full(value, dtype=torch.long, shape=(BATCH, SEQ)) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def no_token_row() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1] = 0
    return mask


# -- TransformerConfig ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides, name", [
    (dict(hidden_size=30, num_heads=4), "num_heads"),
    (dict(hidden_dropout=-0.1), "hidden_dropout"),
    (dict(hidden_dropout="0.1"), "hidden_dropout"),
    (dict(attention_dropout=float("nan")), "attention_dropout"),
    (dict(type_vocab_size=True), "type_vocab_size"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps"),
    (dict(layer_norm_eps="1e-12"), "layer_norm_eps"),
    (dict(initializer_range=-0.02), "initializer_range"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(pad_token_id=1.5), "pad_token_id"),
    (dict(pad_token_id=True), "pad_token_id"),
    (dict(pad_token_id=None), "pad_token_id"),
    (dict(causal="yes"), "causal"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings"),
    (dict(rotary="yes"), "rotary"),
    (dict(rotary_base=float("nan")), "rotary_base"),
    (dict(rotary_base="10000"), "rotary_base"),
    (dict(rotary=True, position_embedding="none", rotary_ntk_factor=float("inf")),
     "rotary_ntk_factor"),
    (dict(extra=None), "extra"),
    (dict(num_layers=0), "num_layers"),
])
def test_transformer_config_rejects(overrides, name):
    with pytest.raises((ValueError, TypeError), match=name):
        tiny(**overrides)


# -- model construction ---------------------------------------------------------------------

@pytest.mark.parametrize("build, name", [
    (lambda: SequenceClassifier(tiny(), num_labels=True), "num_labels"),
    (lambda: SequenceClassifier(tiny(), num_labels=2.0), "num_labels"),
    (lambda: SequenceClassifier(tiny(), classifier_dropout=1.5), "classifier_dropout"),
    (lambda: SequenceClassifier(tiny(), classifier_dropout=-0.1), "classifier_dropout"),
    (lambda: SequenceClassifier({"vocab_size": VOCAB}), "config"),
    (lambda: MaskedLM(None), "config"),
    (lambda: Encoder(None), "config"),
    (lambda: CausalLM({"causal": True}), "config"),
    (lambda: build_model("mlm", {"vocab_size": VOCAB}), "config"),
])
def test_model_constructors_reject(build, name):
    with pytest.raises((ValueError, TypeError), match=name):
        build()


# -- the encoder's inputs (every head calls Encoder.encode) ---------------------------------

@pytest.mark.parametrize("model_name, inputs, name", [
    ("classifier", lambda: dict(input_ids=[[5, 6, 7]]), "input_ids"),
    ("classifier", lambda: dict(input_ids=ids().float()), "input_ids"),
    ("classifier", lambda: dict(input_ids=full(VOCAB)), "input_ids"),
    ("classifier", lambda: dict(input_ids=ids().to("meta")), "input_ids"),
    ("classifier", lambda: dict(input_ids=torch.zeros(0, SEQ, dtype=torch.long)), "input_ids"),
    ("classifier", lambda: dict(inputs_embeds=[[0.0] * 32]), "inputs_embeds"),
    ("classifier", lambda: dict(inputs_embeds=torch.zeros(BATCH, SEQ, 32, dtype=torch.long)),
     "inputs_embeds"),
    ("classifier", lambda: dict(inputs_embeds=torch.zeros(BATCH, SEQ, 32, dtype=torch.float64)),
     "inputs_embeds"),
    ("classifier", lambda: dict(inputs_embeds=torch.zeros(0, SEQ, 32)), "inputs_embeds"),
    ("classifier", lambda: dict(input_ids=ids(), attention_mask=full(0.5, torch.float)),
     "attention_mask"),
    ("classifier", lambda: dict(input_ids=ids(), attention_mask=no_token_row()),
     "attention_mask"),
    ("classifier", lambda: dict(input_ids=ids(), attention_mask=[[1] * SEQ] * BATCH),
     "attention_mask"),
    ("classifier", lambda: dict(input_ids=ids(), attention_mask=full(1)[:, :3]),
     "attention_mask"),
    ("classifier", lambda: dict(input_ids=ids(), attention_mask=full(1).to("meta")),
     "attention_mask"),
    ("classifier", lambda: dict(input_ids=ids(), token_type_ids=full(0, torch.float)),
     "token_type_ids"),
    ("classifier", lambda: dict(input_ids=ids(), token_type_ids=full(0, torch.bool)),
     "token_type_ids"),
    ("classifier", lambda: dict(input_ids=ids(), token_type_ids=full(2)), "token_type_ids"),
    ("classifier", lambda: dict(input_ids=ids(), token_type_ids=full(-1)), "token_type_ids"),
    ("classifier", lambda: dict(input_ids=ids(), token_type_ids=[[0] * SEQ] * BATCH),
     "token_type_ids"),
    ("classifier", lambda: dict(input_ids=ids(), position_ids=torch.arange(-3, 3)[None]),
     "position_ids"),
    ("classifier", lambda: dict(input_ids=ids(), position_ids=torch.arange(200, 206)[None]),
     "max_position_embeddings"),
    ("classifier", lambda: dict(input_ids=ids(), position_ids=torch.arange(6.0)[None]),
     "position_ids"),
    ("classifier", lambda: dict(input_ids=ids(), position_ids=[list(range(SEQ))]),
     "position_ids"),
    ("classifier", lambda: dict(input_ids=ids(), position_ids=torch.arange(SEQ)),
     "position_ids"),
    ("rope", lambda: dict(input_ids=ids(), position_ids=torch.ones(1, SEQ, dtype=torch.bool)),
     "position_ids"),
    ("rope", lambda: dict(input_ids=ids(),
                          position_ids=torch.tensor([[0.0, 1, 2, 3, 4, float("nan")]])),
     "position_ids"),
    ("sinusoidal", lambda: dict(input_ids=ids(), position_ids=torch.full((1, SEQ), math.inf)),
     "position_ids"),
])
def test_encoder_inputs_rejected(models, model_name, inputs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        models[model_name](**inputs())


# -- labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name, labels, name", [
    # Fractional class ids used to be truncated by labels.long(): 0.7 became class 0.
    ("classifier", lambda: torch.tensor([0.7, 1.0]), "labels"),
    ("classifier", lambda: torch.tensor([0.0, 1.0]), "labels"),
    ("classifier", lambda: torch.tensor([True, False]), "labels"),
    ("classifier", lambda: torch.tensor([3, 1]), "num_labels=3"),
    ("classifier", lambda: torch.tensor([-1, 1]), "labels"),
    ("classifier", lambda: [0, 1], "labels"),
    ("classifier", lambda: torch.tensor([[0], [1]]), "labels"),
    ("classifier", lambda: torch.tensor([0, 1]).to("meta"), "labels"),
    ("regressor", lambda: torch.tensor([0, 1]), "labels"),
    ("regressor", lambda: torch.tensor([float("nan"), 1.0]), "labels"),
    ("regressor", lambda: torch.tensor([0.5, math.inf]), "labels"),
    ("mlm", lambda: ids().float(), "labels"),
    ("mlm", lambda: full(VOCAB), "vocab_size"),
    ("mlm", lambda: full(-1), "labels"),
    ("mlm", lambda: ids()[:, :3], "labels"),
    ("mlm", lambda: ids().tolist(), "labels"),
    ("sparse-mlm", lambda: full(VOCAB), "vocab_size"),
    ("sparse-mlm", lambda: ids().double(), "labels"),
    ("causal-lm", lambda: full(VOCAB + 7), "vocab_size"),
    ("causal-lm", lambda: ids().float(), "labels"),
    ("causal-lm", lambda: full(True, torch.bool), "labels"),
])
def test_labels_rejected(models, model_name, labels, name):
    with pytest.raises((ValueError, TypeError), match=name):
        models[model_name](ids(), labels=labels())


def test_label_values_are_not_read_back_under_compile(models, monkeypatch):
    """Under torch.compile only dtype and shape are checked (no host read-back), as for
    the other inputs; the dtype check still refuses fractional class ids."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(TypeError, match="labels"):
        models["classifier"](ids(), labels=torch.tensor([0.7, 1.0]))
    with pytest.raises(IndexError):  # the value check is skipped: torch's own error
        models["classifier"](ids(), labels=torch.tensor([5, 1]))


# -- valid edge inputs still work (and give what they gave before) --------------------------

@pytest.mark.parametrize("model_name", ["mlm", "sparse-mlm", "causal-lm"])
def test_token_labels_with_ignored_padding_and_int32(models, model_name):
    model = models[model_name]
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 4:] = 0
    labels = torch.where(mask.bool(), ids(), IGNORE_INDEX)
    labels[0, 1] = IGNORE_INDEX
    with torch.no_grad():
        reference = model(ids(), mask, labels=labels).loss
        narrow = model(ids(), mask, labels=labels.to(torch.int32)).loss
    assert torch.isfinite(reference)
    assert torch.equal(narrow, reference)


@pytest.mark.parametrize("model_name", ["mlm", "sparse-mlm", "causal-lm"])
def test_all_ignored_token_labels_give_nan_not_an_error(models, model_name):
    # The training loop relies on it: a micro-batch without targets has a NaN mean loss
    # and a zero weight.
    with torch.no_grad():
        loss = models[model_name](ids(), labels=full(IGNORE_INDEX)).loss
    assert torch.isnan(loss)


def test_class_labels_int32_and_ignored_rows(models):
    model = models["classifier"]
    with torch.no_grad():
        reference = model(ids(), labels=torch.tensor([0, 2])).loss
        assert torch.equal(model(ids(), labels=torch.tensor([0, 2], dtype=torch.int32)).loss,
                           reference)
        one_row = model(ids()[:1], labels=torch.tensor([0])).loss
        ignored = model(ids(), labels=torch.tensor([0, IGNORE_INDEX])).loss
    assert torch.allclose(ignored, one_row, atol=1e-6)


def test_regression_labels_of_any_float_dtype(models):
    model = models["regressor"]
    with torch.no_grad():
        single = model(ids(), labels=torch.tensor([0.5, 2.0])).loss
        double = model(ids(), labels=torch.tensor([0.5, 2.0], dtype=torch.float64)).loss
    assert torch.equal(single, double)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_ids(models, dtype):
    model = models["classifier"]
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    types[:, 3:] = 1
    positions = torch.arange(SEQ)[None]
    with torch.no_grad():
        reference = model(ids(), token_type_ids=types, position_ids=positions).logits
        narrow = model(ids().to(dtype), token_type_ids=types.to(dtype),
                       position_ids=positions.to(dtype)).logits
    assert torch.equal(narrow, reference)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32])
def test_attention_mask_dtypes(models, dtype):
    model = models["classifier"]
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, 3:] = 0
    with torch.no_grad():
        assert torch.equal(model(ids(), mask.to(dtype)).logits, model(ids(), mask).logits)


def test_fractional_and_negative_positions_without_a_learned_table(models):
    fractional = (torch.arange(SEQ) * 0.5)[None]
    negative = torch.arange(-3, 3)[None]
    with torch.no_grad():
        for name in ("rope", "sinusoidal"):
            assert torch.isfinite(models[name](ids(), position_ids=fractional)).all()
            assert torch.isfinite(models[name](ids(), position_ids=negative)).all()


def test_inputs_embeds_of_the_model_dtype(models):
    model = models["classifier"]
    embeds = model.encoder.embeddings.word_embeddings(ids())
    with torch.no_grad():
        assert torch.allclose(model(inputs_embeds=embeds).logits, model(ids()).logits)
        double = SequenceClassifier(tiny(), num_labels=3).double().eval()
        assert double(inputs_embeds=embeds.double()).logits.dtype == torch.float64


# -- batching -------------------------------------------------------------------------------

def mlm_collator(**options) -> MLMCollator:
    return MLMCollator(MASK, VOCAB, SPECIALS, PAD, **options)


@pytest.mark.parametrize("examples, pad_id, name", [
    ([{"input_ids": [2, 5, 3]}], -1, "pad_id"),
    ([{"input_ids": [2, 5, 3]}], 1.5, "pad_id"),
    ([{"input_ids": [2, 5, 3]}], True, "pad_id"),
    ([{"input_ids": [2, 5.5, 3]}], 0, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": torch.tensor([2.0, 5.0])}], 0, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": ["a", "b"]}], 0, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": [[1, 2], [3, 4]]}], 0, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": [True, False]}], 0, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": [2, 5]}, {"input_ids": [2, -5]}], 0, r"examples\[1\]\['input_ids'\]"),
    ([{"input_ids": [2, 5], "attention_mask": [2, 1]}], 0, r"examples\[0\]\['attention_mask'\]"),
    ([{"input_ids": [2, 5], "token_type_ids": [0.5, 1]}], 0,
     r"examples\[0\]\['token_type_ids'\]"),
    ([{"input_ids": [2, 5], "token_type_ids": [0, -1]}], 0,
     r"examples\[0\]\['token_type_ids'\]"),
    ([{"input_ids": [2, 5], "labels": [0.5, 1.0]}], 0, r"examples\[0\]\['labels'\]"),
    ([{"input_ids": [2, 5], "labels": [-1, 5]}], 0, r"examples\[0\]\['labels'\]"),
])
def test_pad_batch_rejects(examples, pad_id, name):
    with pytest.raises((ValueError, TypeError), match=name):
        pad_batch(examples, pad_id)


@pytest.mark.parametrize("build, name", [
    (lambda: mlm_collator(mlm_probability=1.5), "mlm_probability"),
    (lambda: mlm_collator(mlm_probability=-0.1), "mlm_probability"),
    (lambda: mlm_collator(mlm_probability=True), "mlm_probability"),
    (lambda: mlm_collator(mask_fraction=2), "mask_fraction"),
    (lambda: mlm_collator(random_fraction=-1), "random_fraction"),
    (lambda: MLMCollator(MASK, True, SPECIALS, PAD), "vocab_size"),
    (lambda: MLMCollator(True, VOCAB, SPECIALS, PAD), "mask_id"),
    (lambda: MLMCollator(MASK, VOCAB, SPECIALS, VOCAB), "pad_id"),
    (lambda: MLMCollator(MASK, VOCAB, None, PAD), "special_ids"),
    (lambda: MLMCollator(MASK, VOCAB, "abc", PAD), "special_ids"),
    (lambda: MLMCollator(MASK, VOCAB, [99], PAD), "special_ids"),
    (lambda: MLMCollator(MASK, VOCAB, [-1], PAD), "special_ids"),
    (lambda: MLMCollator(MASK, VOCAB, [1.5], PAD), "special_ids"),
])
def test_mlm_collator_init_rejects(build, name):
    with pytest.raises((ValueError, TypeError), match=name):
        build()


@pytest.mark.parametrize("examples, generator, name", [
    ([], None, "examples"),
    ({"input_ids": [2, 5, 3]}, None, "examples"),
    ([{"input_ids": [2, VOCAB, 3]}], None, r"examples\[0\]\['input_ids'\].*vocab_size"),
    ([{"input_ids": [2, -5, 3]}], None, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": [2, 5.5, 3]}], None, r"examples\[0\]\['input_ids'\]"),
    ([{"input_ids": [2, 5, 3]}], 5, "generator"),
])
def test_mlm_collator_call_rejects(examples, generator, name):
    with pytest.raises((ValueError, TypeError), match=name):
        mlm_collator()(examples, generator=generator)


@pytest.mark.parametrize("build, examples, name", [
    (lambda: ClassificationCollator(True), None, "pad_id"),
    (lambda: ClassificationCollator(-1), None, "pad_id"),
    (lambda: ClassificationCollator(0, regression="no"), None, "regression"),
    (lambda: ClassificationCollator(0), [], "examples"),
    (lambda: ClassificationCollator(0), [{"input_ids": [2, 5], "label": -1}],
     r"examples\[0\]\['label'\]"),
    (lambda: ClassificationCollator(0), [{"input_ids": [2, 5], "label": 0.5}],
     r"examples\[0\]\['label'\]"),
    (lambda: ClassificationCollator(0), [{"input_ids": [2, 5], "label": "positive"}],
     r"examples\[0\]\['label'\]"),
    (lambda: ClassificationCollator(0), [{"input_ids": [2, 5], "label": True}],
     r"examples\[0\]\['label'\]"),
    (lambda: ClassificationCollator(0, regression=True),
     [{"input_ids": [2, 5], "label": float("nan")}], r"examples\[0\]\['label'\]"),
    (lambda: ClassificationCollator(0, regression=True),
     [{"input_ids": [2, 5], "label": "x"}], r"examples\[0\]\['label'\]"),
])
def test_classification_collator_rejects(build, examples, name):
    with pytest.raises((ValueError, TypeError), match=name):
        collator = build()
        collator(examples)


@pytest.fixture(scope="module")
def chars():
    return CharTokenizer("abcdefghij ", specials=("unk", "cls", "sep", "mask"))


@pytest.mark.parametrize("call, name", [
    (lambda tok: causal_lm_blocks([0.5, 1.5, 2.5], 2), "token_ids"),
    (lambda tok: causal_lm_blocks([1, 2, 3], True), "block_size"),
    (lambda tok: mlm_examples("abc", tok, 8), "lines"),
    (lambda tok: mlm_examples(["abc"], tok, 2), "max_length"),
    (lambda tok: classification_examples("ab", [1, 0], tok, 8), "texts"),
    (lambda tok: classification_examples(["a"], "1", tok, 8), "labels"),
    (lambda tok: classification_examples(["a", "b"], [1, 0], tok, 8, pairs="cd"), "pairs"),
    (lambda tok: classification_examples(["a"], [float("nan")], tok, 8), r"labels\[0\]"),
    (lambda tok: classification_examples(["a"], [True], tok, 8), r"labels\[0\]"),
    (lambda tok: classification_examples(["a"], [1], tok, 1), "max_length"),
])
def test_example_builders_reject(chars, call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(chars)


# -- tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(["the cat sat on the mat", "a dog ate the hat"] * 3,
                           vocab_size=60, min_frequency=1)


@pytest.mark.parametrize("call, name", [
    (lambda chars, wp: chars.decode([99]), "ids"),
    (lambda chars, wp: chars.decode([-1]), "ids"),
    (lambda chars, wp: chars.decode([1.5]), "ids"),
    (lambda chars, wp: chars.decode("abc"), "ids"),
    (lambda chars, wp: chars.decode(torch.zeros(2, 2, dtype=torch.long)), "ids"),
    # Hugging Face's decoder drops unknown ids silently; they are refused here.
    (lambda chars, wp: wp.decode([wp.vocab_size]), "ids"),
    (lambda chars, wp: wp.decode([-1]), "ids"),
    (lambda chars, wp: wp.decode("abc"), "ids"),
    (lambda chars, wp: wp.encode("the cat", max_length=True, add_special_tokens=False),
     "max_length"),
    (lambda chars, wp: wp.encode("the cat", max_length=2), "max_length"),
    (lambda chars, wp: wp.encode(5), "text"),
    (lambda chars, wp: wp.encode_batch("the cat"), "texts"),
    (lambda chars, wp: truncation_lengths(-1, 3, 2), "length_a"),
    (lambda chars, wp: truncation_lengths(3, 3, -2), "budget"),
    (lambda chars, wp: train_wordpiece(["a b"], vocab_size=True), "vocab_size"),
    (lambda chars, wp: train_wordpiece(["a b"], min_frequency=True), "min_frequency"),
    (lambda chars, wp: train_bpe(["a b"], vocab_size=10), "vocab_size"),
])
def test_tokenizers_reject(chars, wordpiece, call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(chars, wordpiece)


def test_tokenizer_valid_edges(chars, wordpiece):
    ids_ = wordpiece.encode("the cat")
    assert wordpiece.decode(torch.tensor(ids_)) == wordpiece.decode(np.array(ids_)) == "the cat"
    assert chars.decode(torch.tensor(chars.encode("abc"))) == "abc"
    assert truncation_lengths(0, 0, 0) == (0, 0)


def test_batching_valid_edges():
    batch = pad_batch([{"input_ids": [np.int64(2), np.int64(5), 3],
                        "attention_mask": torch.tensor([True, True, False])},
                       {"input_ids": torch.tensor([2, 3], dtype=torch.int32),
                        "attention_mask": [True, True]}], PAD)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]
    collated = ClassificationCollator(PAD)([{"input_ids": [2, 5], "label": IGNORE_INDEX},
                                            {"input_ids": [2], "label": np.int64(1)}])
    assert collated["labels"].tolist() == [IGNORE_INDEX, 1]
    scores = ClassificationCollator(PAD, regression=True)([{"input_ids": [2], "label": 3}])
    assert scores["labels"].dtype == torch.float32
    from_tensor = MLMCollator(MASK, VOCAB, torch.tensor(SPECIALS), PAD)
    assert from_tensor.special_ids == mlm_collator().special_ids
    masked = mlm_collator()([{"input_ids": torch.tensor([2, 5, 3], dtype=torch.int32)}],
                            generator=torch.Generator().manual_seed(0))
    assert masked["input_ids"].shape == (1, 3)


# -- training loop --------------------------------------------------------------------------

@pytest.mark.parametrize("options, name", [
    (dict(steps=True), "steps"),
    (dict(lr="1e-3"), "lr"),
    (dict(lr=float("inf")), "lr"),
    (dict(lr=True), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(betas=0.9), "betas"),
    (dict(betas=(0.9, "x")), "betas"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(eval_every=True), "eval_every"),
    (dict(seed=1.5), "seed"),
    (dict(seed=None), "seed"),
    (dict(compile="yes"), "compile"),
    (dict(progress="no"), "progress"),
    (dict(device=5), "device"),
])
def test_train_config_rejects(options, name):
    with pytest.raises((ValueError, TypeError), match=name):
        TrainConfig(**options)


def labelled_examples(n: int = 8) -> list[dict]:
    return [{"input_ids": [CLS, 5 + i % 10, 6, SEP], "label": i % 2} for i in range(n)]


@pytest.mark.parametrize("build, name", [
    (lambda c: BatchLoader(labelled_examples(), 0, c, seed=0), "global_batch_size"),
    (lambda c: BatchLoader(labelled_examples(), 2.0, c, seed=0), "global_batch_size"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0, accumulation_steps=0),
     "accumulation_steps"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=True), "seed"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0, rank=True, world_size=2), "rank"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0, shuffle="no"), "shuffle"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0, drop_last=None), "drop_last"),
    (lambda c: BatchLoader(iter(labelled_examples()), 4, c, seed=0), "examples"),
    (lambda c: BatchLoader({"a": 1}, 1, c, seed=0), "examples"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0, target_counter=None),
     "target_counter"),
    (lambda c: BatchLoader(labelled_examples(), 4, None, seed=0), "collate_fn"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0).load_state_dict(None), "state"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0).load_state_dict(
        {"seed": 0, "global_batch_size": 4, "num_examples": 8, "epoch": -1, "batch_index": 0}),
     "epoch"),
    (lambda c: BatchLoader(labelled_examples(), 4, c, seed=0).load_state_dict(
        {"seed": 0, "global_batch_size": 4, "num_examples": 8, "epoch": 0, "batch_index": 9}),
     "batch_index"),
])
def test_batch_loader_rejects(build, name):
    with pytest.raises((ValueError, TypeError), match=name):
        build(ClassificationCollator(PAD))


@pytest.mark.parametrize("call, name", [
    (lambda: lr_multiplier(-1, warmup_steps=0, total_steps=10), "step"),
    (lambda: lr_multiplier(0, warmup_steps=-1, total_steps=10), "warmup_steps"),
    (lambda: lr_multiplier(0, warmup_steps=0, total_steps=0), "total_steps"),
    (lambda: lr_multiplier(5, warmup_steps=0, total_steps=10, min_lr_ratio=2), "min_lr_ratio"),
    (lambda: split_batch({"x": torch.zeros(4)}, 0), "chunks"),
    (lambda: split_batch({"x": torch.zeros(4)}, 8), "chunks"),
    (lambda: split_batch({"x": torch.zeros(4)}, 2.0), "chunks"),
    (lambda: count_shifted_targets({"input_ids": torch.zeros(2, 3)}), "labels"),
    (lambda: count_shifted_targets({"labels": torch.zeros(3)}), "labels"),
    (lambda: parameter_groups(nn.Linear(2, 2), -0.1), "weight_decay"),
])
def test_loop_helpers_reject(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()


@pytest.fixture(scope="module")
def classification_setup():
    torch.manual_seed(0)
    model = SequenceClassifier(tiny(), num_labels=2).eval()
    collator = ClassificationCollator(PAD)
    return model, collator, BatchLoader(labelled_examples(), 4, collator, seed=0)


@pytest.mark.parametrize("call, name", [
    (lambda m, c, l: train(None, l, steps=1, progress=False), "model"),
    (lambda m, c, l: train(m, None, steps=1, progress=False), "loader"),
    (lambda m, c, l: train(m, l, steps=1, loss_step=None, progress=False), "loss_step"),
    (lambda m, c, l: train(m, l, steps=1, eval_fn=5, progress=False), "eval_fn"),
    (lambda m, c, l: evaluate_loss(m, c(labelled_examples(2))), "batches"),
    (lambda m, c, l: fixed_batches(labelled_examples(), c, 2.0), "batch_size"),
    (lambda m, c, l: fixed_batches(labelled_examples(), c, True), "batch_size"),
    (lambda m, c, l: fixed_batches(labelled_examples(), c, 2, seed=None), "seed"),
    (lambda m, c, l: fixed_batches(labelled_examples(), None, 2), "collate_fn"),
    (lambda m, c, l: fixed_batches("abc", c, 2), "examples"),
    (lambda m, c, l: fixed_batches([], c, 2), "examples"),
    (lambda m, c, l: classification_metrics(m, []), "batches"),
    (lambda m, c, l: classification_metrics(m, c(labelled_examples(2))), "batches"),
    (lambda m, c, l: classification_metrics(m, [{"input_ids": ids()}]), "labels"),
    (lambda m, c, l: classification_metrics(
        m, [{"input_ids": ids(), "labels": torch.tensor([0.0, 1.0])}]), "labels"),
    (lambda m, c, l: masked_lm_metrics(m, [{"input_ids": ids()}]), "labels"),
    (lambda m, c, l: masked_lm_metrics(m, c(labelled_examples(2))), "batches"),
])
def test_training_and_evaluation_entry_points_reject(classification_setup, call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(*classification_setup)


def test_classification_metrics_leave_out_ignored_rows(classification_setup):
    model, collator, _ = classification_setup
    batch = collator(labelled_examples(4))
    full_metrics = classification_metrics(model, [batch])
    assert full_metrics["examples"] == 4
    partial = dict(batch, labels=batch["labels"].clone())
    partial["labels"][1] = IGNORE_INDEX
    kept = {key: value[[0, 2, 3]] for key, value in batch.items()}
    assert classification_metrics(model, [partial]) == pytest.approx(
        classification_metrics(model, [kept]))


def test_loop_valid_edges():
    assert TrainConfig(eps=0.0, grad_clip=None, lr=np.float64(1e-3)).eps == 0.0
    assert lr_multiplier(np.int64(2), warmup_steps=4, total_steps=8) == 0.75
    assert [len(part["x"]) for part in split_batch({"x": torch.zeros(3)}, 3)] == [1, 1, 1]


@pytest.mark.parametrize("model_name", ["classifier", "sparse-mlm"])
def test_checks_compile_without_graph_breaks(models, model_name):
    """fullgraph=True fails on any graph break: the new checks read nothing back to the
    host under torch.compile."""
    model = models[model_name]
    labels = torch.tensor([0, 2]) if model_name == "classifier" else ids()
    inputs = dict(attention_mask=torch.ones(BATCH, SEQ, dtype=torch.long),
                  token_type_ids=torch.zeros(BATCH, SEQ, dtype=torch.long),
                  position_ids=torch.arange(SEQ)[None], labels=labels.to(torch.int32))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(ids(), **inputs).loss, model(ids(), **inputs).loss,
                              atol=1e-6)
