"""Examples and collators: padding, BERT masking statistics, reproducibility, errors."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tutorial_lib.data.batching import (IGNORE_INDEX, ClassificationCollator, MLMCollator,
                                   causal_lm_blocks, classification_examples, mlm_examples,
                                   pad_batch)
from tutorial_lib.data.tokenization import CharTokenizer

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = {PAD, UNK, CLS, SEP, MASK}
VOCAB = 50


def bert_like(lengths, start=5):
    """Examples [CLS] w... [SEP] with ordinary ids from ``start`` on."""
    return [{"input_ids": [CLS, *[start + (i + j) % (VOCAB - start) for j in range(n)], SEP]}
            for i, n in enumerate(lengths)]


def collator(**options):
    return MLMCollator(MASK, VOCAB, SPECIALS, PAD, **options)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# --- pad_batch ----------------------------------------------------------------------------

def test_pad_batch_pads_right_and_builds_the_attention_mask():
    batch = pad_batch([{"input_ids": [7, 8, 9], "token_type_ids": [0, 1, 1]},
                       {"input_ids": torch.tensor([5]), "token_type_ids": [0]}], pad_id=3)
    assert batch["input_ids"].tolist() == [[7, 8, 9], [5, 3, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_batch_pads_token_labels_with_ignore_index_and_stacks_scalars():
    batch = pad_batch([{"input_ids": [7, 8], "labels": [7, 8], "score": 0.5},
                       {"input_ids": [5], "labels": [5], "score": 2.0}], pad_id=0)
    assert batch["labels"].tolist() == [[7, 8], [5, IGNORE_INDEX]]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [0.5, 2.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(5, VOCAB - 1), min_size=1, max_size=12),
                min_size=1, max_size=6))
def test_pad_batch_keeps_every_sequence_and_masks_exactly_the_padding(sequences):
    batch = pad_batch([{"input_ids": s} for s in sequences], pad_id=PAD)
    longest = max(len(s) for s in sequences)
    assert batch["input_ids"].shape == (len(sequences), longest)
    for row, sequence in enumerate(sequences):
        n = len(sequence)
        assert batch["input_ids"][row, :n].tolist() == sequence
        assert (batch["input_ids"][row, n:] == PAD).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)


@pytest.mark.parametrize("examples, message", [
    ([], "non-empty list"),
    ({"input_ids": [1]}, "non-empty list"),
    ([{"labels": [1]}], "dict that has 'input_ids'"),
    ([[1, 2]], "dict that has 'input_ids'"),
    ([{"input_ids": [1]}, {"input_ids": [1], "labels": [1]}], r"examples\[1\] must be a dict"),
    ([{"input_ids": []}], "is empty"),
    ([{"input_ids": [1, 2], "token_type_ids": [0]}], "has 1 items but input_ids has 2"),
    ([{"input_ids": [1], "spans": [3]}], "no padding value is known for the per-token key 'spans'"),
])
def test_pad_batch_errors(examples, message):
    with pytest.raises(ValueError, match=message):
        pad_batch(examples, pad_id=0)


# --- MLMCollator --------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.integers(0, 2**31 - 1),
       st.floats(0.05, 1.0))
def test_masking_never_touches_specials_or_padding(lengths, seed, probability):
    examples = bert_like(lengths)
    examples[0]["input_ids"][1:1] = [UNK]  # an [UNK] inside a sentence stays too
    batch = collator(mlm_probability=probability)(examples, generator=seeded(seed))
    original = pad_batch(examples, PAD)["input_ids"]
    special = torch.isin(original, torch.tensor(sorted(SPECIALS)))
    assert (batch["input_ids"][special] == original[special]).all()
    assert (batch["labels"][special] == IGNORE_INDEX).all()
    # labels hold the original id exactly where a position was selected
    selected = batch["labels"] != IGNORE_INDEX
    assert (batch["labels"][selected] == original[selected]).all()
    assert (batch["input_ids"][~selected] == original[~selected]).all()
    assert batch["attention_mask"].tolist() == pad_batch(examples, PAD)["attention_mask"].tolist()


def test_masking_rate_and_80_10_10_split():
    examples = bert_like([126] * 256)  # 32,256 ordinary tokens
    batch = collator()(examples, generator=seeded(0))
    original = pad_batch(examples, PAD)["input_ids"]
    selected = batch["labels"] != IGNORE_INDEX
    ordinary = ~torch.isin(original, torch.tensor(sorted(SPECIALS)))
    n = int(selected.sum())
    # binomial standard deviation of the rate is about 0.002: 0.01 is five of them
    assert abs(n / int(ordinary.sum()) - 0.15) < 0.01
    masked = selected & (batch["input_ids"] == MASK)
    replaced = selected & (batch["input_ids"] != MASK) & (batch["input_ids"] != original)
    kept = selected & (batch["input_ids"] == original)
    # a random token equals the original with probability 1/45: that shows up as "kept"
    assert abs(int(masked.sum()) / n - 0.8) < 0.03
    assert abs(int(replaced.sum()) / n - 0.1 * 44 / 45) < 0.025
    assert abs(int(kept.sum()) / n - (0.1 + 0.1 / 45)) < 0.025
    random_tokens = batch["input_ids"][replaced]
    assert not torch.isin(random_tokens, torch.tensor(sorted(SPECIALS))).any()
    assert len(random_tokens.unique()) == VOCAB - len(SPECIALS)  # every ordinary id shows up


def test_same_generator_state_gives_the_same_batch():
    examples = bert_like([10, 30, 7, 22])
    mlm = collator()
    first = mlm(examples, generator=seeded(1234))
    again = mlm(examples, generator=seeded(1234))
    other = mlm(examples, generator=seeded(1235))
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["labels"], other["labels"])


def test_extreme_fractions_do_what_they_say():
    examples = bert_like([40] * 8)
    all_masked = collator(mlm_probability=1.0, mask_fraction=1.0, random_fraction=0.0)(
        examples, generator=seeded(0))
    ordinary = ~torch.isin(pad_batch(examples, PAD)["input_ids"], torch.tensor(sorted(SPECIALS)))
    assert (all_masked["input_ids"][ordinary] == MASK).all()
    none_changed = collator(mlm_probability=1.0, mask_fraction=0.0, random_fraction=0.0)(
        examples, generator=seeded(0))
    assert torch.equal(none_changed["input_ids"], pad_batch(examples, PAD)["input_ids"])
    assert (none_changed["labels"][ordinary] != IGNORE_INDEX).all()


@pytest.mark.parametrize("options, name", [
    ({"mlm_probability": 0.0}, "mlm_probability"),
    ({"mlm_probability": 1.5}, "mlm_probability"),
    ({"mask_fraction": -0.1}, "mask_fraction"),
    ({"random_fraction": 2}, "random_fraction"),
    ({"mask_fraction": "0.8"}, "mask_fraction"),
    ({"mask_fraction": 0.8, "random_fraction": 0.3}, r"mask_fraction \+ random_fraction"),
])
def test_mlm_collator_validates_probabilities(options, name):
    with pytest.raises(ValueError, match=name):
        collator(**options)


def test_mlm_collator_validates_ids():
    with pytest.raises(ValueError, match="mask_id must be an id in"):
        MLMCollator(VOCAB, VOCAB, SPECIALS, PAD)
    with pytest.raises(ValueError, match="at least one ordinary token"):
        MLMCollator(MASK, 5, SPECIALS, PAD)


def test_from_tokenizer_uses_its_ids():
    tokenizer = CharTokenizer("abcdef", specials=("unk", "cls", "sep", "mask"))
    mlm = MLMCollator.from_tokenizer(tokenizer, mlm_probability=0.5)
    assert (mlm.mask_id, mlm.pad_id, mlm.vocab_size) == (4, 0, 11)
    assert mlm.special_ids == frozenset({0, 1, 2, 3, 4}) and mlm.mlm_probability == 0.5
    with pytest.raises(ValueError, match="mask and a pad token"):
        MLMCollator.from_tokenizer(CharTokenizer("ab"))


# --- causal LM blocks ---------------------------------------------------------------------

def test_causal_lm_blocks_are_contiguous_and_drop_the_tail():
    blocks = causal_lm_blocks(list(range(10)), block_size=4)
    assert [b["input_ids"] for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(b["labels"] == b["input_ids"] and b["labels"] is not b["input_ids"]
               for b in blocks)
    assert causal_lm_blocks(torch.arange(8), 4)[1]["input_ids"] == [4, 5, 6, 7]
    batch = pad_batch(blocks, pad_id=0)
    assert torch.equal(batch["labels"], batch["input_ids"])


@pytest.mark.parametrize("ids, block_size, message", [
    ([1, 2, 3], 1, "block_size must be an int >= 2"),
    ([1, 2, 3], 2.0, "block_size must be an int >= 2"),
    ([1, 2, 3], 4, "fewer than one block"),
    ("abc", 2, "token_ids must be a list of ints"),
    (torch.zeros(2, 3, dtype=torch.long), 2, "token_ids must be 1-D"),
])
def test_causal_lm_blocks_errors(ids, block_size, message):
    with pytest.raises((ValueError, TypeError), match=message):
        causal_lm_blocks(ids, block_size)


# --- MLM packing --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chars():
    return CharTokenizer("abcdefghij ", specials=("unk", "cls", "sep", "mask"))


def test_mlm_examples_pack_lines_and_split_long_ones(chars):
    lines = ["abc", "de", "", "fghij", "aaaaaaaaaaaaa"]
    examples = mlm_examples(lines, chars, max_length=8)
    decoded = [chars.decode(e["input_ids"]) for e in examples]
    # capacity 6: "abc"+"de" share, "fghij" alone, 13 a's split into 6 + 6 + 1
    assert decoded == ["abcde", "fghij", "aaaaaa", "aaaaaa", "a"]
    for example in examples:
        ids = example["input_ids"]
        assert ids[0] == chars.cls_id and ids[-1] == chars.sep_id and len(ids) <= 8
    assert "".join(decoded) == "".join(lines)  # no token lost or repeated


def test_mlm_examples_errors(chars):
    with pytest.raises(ValueError, match="max_length must be an int >= 3"):
        mlm_examples(["abc"], chars, max_length=2)
    with pytest.raises(ValueError, match="cls and sep"):
        mlm_examples(["abc"], CharTokenizer("abc"), max_length=8)


# --- classification -----------------------------------------------------------------------

def test_classification_examples_and_collator_for_pairs(chars):
    examples = classification_examples(["abc", "a"], [1, 0], chars, max_length=6,
                                       pairs=["de", "fghij"])
    a, b, d, f, g = 5, 6, 8, 10, 11
    # 3 content tokens fit: both sentences shrink, the longer keeps the odd one
    assert examples[0] == {"input_ids": [2, a, b, 3, d, 3],
                           "token_type_ids": [0, 0, 0, 0, 1, 1], "label": 1}
    # the short sentence is kept whole, the long one gives up the rest
    assert examples[1]["input_ids"] == [2, a, 3, f, g, 3]
    batch = ClassificationCollator(pad_id=chars.pad_id)(examples)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == (2, 6)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}


def test_regression_labels_are_float(chars):
    examples = classification_examples(["abc", "ab"], [4.2, 0.0], chars, max_length=10,
                                       pairs=["a", "b"])
    batch = ClassificationCollator(pad_id=0, regression=True)(examples)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([4.2, 0.0])
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]


def test_classification_errors(chars):
    with pytest.raises(ValueError, match="labels must have one item per text"):
        classification_examples(["a", "b"], [1], chars, max_length=8)
    with pytest.raises(ValueError, match="pairs must have one item per text"):
        classification_examples(["a", "b"], [1, 0], chars, max_length=8, pairs=["c"])
    with pytest.raises(TypeError, match=r"labels\[0\] must be an int or a float"):
        classification_examples(["a"], ["positive"], chars, max_length=8)
    with pytest.raises(ValueError, match="class index"):
        ClassificationCollator(pad_id=0)([{"input_ids": [1], "label": 0.5}])
    with pytest.raises(ValueError, match=r"examples\[0\] needs a 'label'"):
        ClassificationCollator(pad_id=0)([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="non-empty list"):
        ClassificationCollator(pad_id=0)([])
