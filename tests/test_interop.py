"""Parity with Hugging Face BERT (random weights built from a config, no download)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tutorial_lib import Encoder, MaskedLM, SequenceClassifier  # noqa: E402
from tutorial_lib.interop import config_from_hf_bert, from_hf  # noqa: E402


def hf_config(**overrides):
    values = dict(vocab_size=211, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    values.update(overrides)
    return transformers.BertConfig(**values)


def padded_batch(vocab=211, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 23), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([23, 17, 9, 2]):  # unequal lengths, one very short
        mask[row, length:] = 0
        ids[row, length:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    return ids, mask, types


def enlarge_positions(hf_model):
    # Default init (std 0.02) makes position embeddings small enough to hide an index
    # error; make them dominate.
    embeddings = hf_model.base_model.embeddings
    with torch.no_grad():
        embeddings.position_embeddings.weight.normal_(0, 1.0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_encoder_matches_bert_model_with_padding(attn_implementation):
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_config(), add_pooling_layer=True,
                                ).eval()
    hf.config._attn_implementation = attn_implementation
    enlarge_positions(hf)
    ours = from_hf(hf)
    assert isinstance(ours, Encoder) and not ours.training
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)
    # Padded positions too: both attend to the real tokens of their row.
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_masked_lm_matches_bert_for_masked_lm():
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(hf_config(hidden_act="gelu")).eval()
    enlarge_positions(hf)
    ours = from_hf(hf)
    assert isinstance(ours, MaskedLM)
    ids, mask, types = padded_batch(seed=1)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        got = ours(ids, mask, types, labels=labels)
    real = mask.bool()
    assert torch.allclose(got.logits[real], expected.logits[real], atol=1e-5, rtol=0)
    assert torch.allclose(got.loss, expected.loss, atol=1e-5)
    # The decoder is tied: one tensor, not a copy.
    assert ours.output_weight is None


@pytest.mark.parametrize("tied", [True, False])
def test_masked_lm_decoder_weight_and_bias_are_the_ones_hugging_face_uses(tied):
    """The logits use ``cls.predictions.decoder``'s weight and bias, tied or not.

    Untied, transformers ties neither the weight to the embeddings nor ``decoder.bias`` to
    ``cls.predictions.bias`` (which forward never reads): all three are perturbed apart so
    that copying the wrong one shows in the logits.
    """
    torch.manual_seed(4)
    hf = transformers.BertForMaskedLM(hf_config(tie_word_embeddings=tied)).eval()
    enlarge_positions(hf)
    predictions = hf.cls.predictions
    embeddings = hf.bert.embeddings.word_embeddings.weight
    assert (predictions.decoder.weight is embeddings) == tied
    assert (predictions.decoder.bias is predictions.bias) == tied
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        predictions.decoder.weight.add_(0.5 * torch.randn(embeddings.shape, generator=generator))
        predictions.decoder.bias.add_(torch.randn(predictions.bias.shape, generator=generator))
        if not tied:
            predictions.bias.add_(torch.randn(predictions.bias.shape, generator=generator))
            assert not torch.allclose(predictions.decoder.weight, embeddings, atol=0.1)
            assert not torch.allclose(predictions.decoder.bias, predictions.bias, atol=0.1)
    ours = from_hf(hf)
    assert (ours.output_weight is None) == tied
    if not tied:
        assert torch.equal(ours.output_weight, predictions.decoder.weight)
    assert torch.equal(ours.output_bias, predictions.decoder.bias)
    ids, mask, types = padded_batch(seed=4)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types).logits
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=0)


def test_a_decoder_that_differs_from_tied_embeddings_is_refused():
    torch.manual_seed(5)
    hf = transformers.BertForMaskedLM(hf_config(tie_word_embeddings=False)).eval()
    hf.config.tie_word_embeddings = True  # says tied, but the decoder has its own matrix
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        from_hf(hf)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classifier_matches(num_labels):
    torch.manual_seed(2)
    hf = transformers.BertForSequenceClassification(hf_config(num_labels=num_labels)).eval()
    enlarge_positions(hf)
    ours = from_hf(hf)
    assert isinstance(ours, SequenceClassifier) and ours.num_labels == num_labels
    ids, mask, types = padded_batch(seed=2)
    labels = torch.tensor([0, 2, 1, 0]) if num_labels > 1 else torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        got = ours(ids, mask, types, labels=labels)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5, rtol=0)
    assert torch.allclose(got.loss, expected.loss, atol=1e-5)


def test_training_mode_gradients_match():
    """Same loss and same gradients in train mode with dropout off."""
    torch.manual_seed(3)
    hf = transformers.BertForMaskedLM(hf_config(hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)).train()
    ours = from_hf(hf)
    ids, mask, types = padded_batch(seed=3)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3,
                         ids, torch.full_like(ids, -100))
    hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
    ours(ids, mask, types, labels=labels).loss.backward()
    hf_grad = hf.bert.encoder.layer[1].attention.self.query.weight.grad
    our_grad = ours.encoder.layers[1].attention.query.weight.grad
    assert torch.allclose(our_grad, hf_grad, atol=1e-6, rtol=1e-4)


def test_unsupported_inputs_are_refused():
    with pytest.raises(TypeError, match="from_hf supports"):
        from_hf(torch.nn.Linear(2, 2))
    config = hf_config(hidden_act="quick_gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf_bert(config)
