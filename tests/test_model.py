"""Shapes, padding invariance, causality, gradient flow, determinism and bad inputs."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tutorial_lib import (CausalLM, Encoder, MaskedLM, SequenceClassifier, TransformerConfig,
                          build_model)
from tutorial_lib.core.positions import sinusoidal_embedding

VOCAB = 97


def tiny(**overrides):
    return TransformerConfig.preset("tiny", vocab_size=VOCAB, **overrides)


CONFIGS = {
    "bert": tiny(),
    "pre-ln-sinusoidal": tiny(norm_position="pre", position_embedding="sinusoidal"),
    "rope-no-abs": tiny(position_embedding="none", rotary=True),
    "rope-interleaved-window": tiny(position_embedding="none", rotary=True,
                                    rotary_pairing="interleaved", attention_window=3),
}
DECODERS = {
    "gpt": tiny(causal=True, norm_position="pre", type_vocab_size=0),
    "gpt-rope-window": tiny(causal=True, norm_position="pre", type_vocab_size=0,
                            position_embedding="none", rotary=True, attention_window=4),
}


@pytest.mark.parametrize("name", list(CONFIGS) + list(DECODERS))
def test_shapes(name):
    config = {**CONFIGS, **DECODERS}[name]
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 11))
    h = Encoder(config)(ids)
    assert h.shape == (3, 11, config.hidden_size)
    head = CausalLM(config) if config.causal else MaskedLM(config)
    out = head(ids, labels=ids)
    assert out.logits.shape == (3, 11, VOCAB)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_classifier_shapes_and_regression():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (5, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    clf = SequenceClassifier(tiny(), num_labels=3)
    out = clf(ids, mask, labels=torch.tensor([0, 1, 2, 0, 1]))
    assert out.logits.shape == (5, 3) and out.loss.ndim == 0
    reg = SequenceClassifier(tiny(), num_labels=1, pooling="mean")
    out = reg(ids, mask, labels=torch.randn(5))
    assert out.logits.shape == (5, 1) and out.loss.ndim == 0


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 12), pad=st.integers(1, 6), config_name=st.sampled_from(list(CONFIGS)),
       seed=st.integers(0, 10_000))
def test_padding_never_changes_unpadded_outputs(length, pad, config_name, seed):
    torch.manual_seed(seed)
    model = Encoder(CONFIGS[config_name]).eval()
    ids = torch.randint(5, VOCAB, (1, length))
    padded = torch.cat([ids, torch.randint(0, VOCAB, (1, pad))], dim=1)
    mask = torch.cat([torch.ones(1, length), torch.zeros(1, pad)], dim=1).long()
    with torch.no_grad():
        alone = model(ids)
        with_padding = model(padded, mask)
    assert torch.allclose(with_padding[:, :length], alone, atol=1e-5)


@pytest.mark.parametrize("name", list(DECODERS))
def test_causal_output_never_depends_on_the_future(name):
    torch.manual_seed(0)
    model = CausalLM(DECODERS[name]).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, VOCAB, (2, 4))
    with torch.no_grad():
        a = model(ids).logits
        b = model(changed).logits
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)  # the future does matter later


def test_causal_gradient_reaches_only_the_past():
    torch.manual_seed(0)
    model = CausalLM(DECODERS["gpt"]).eval()
    embeds = torch.randn(1, 8, model.config.hidden_size, requires_grad=True)
    h = model.encoder(inputs_embeds=embeds)
    # A random projection: the plain sum of a LayerNorm output has zero gradient.
    (h[0, 4] * torch.randn(model.config.hidden_size)).sum().backward()
    grad_norm = embeds.grad[0].norm(dim=-1)
    assert bool((grad_norm[5:] == 0).all()) and bool((grad_norm[:5] > 0).all())


@pytest.mark.parametrize("task", ["mlm", "causal-lm", "classification"])
def test_gradients_reach_every_parameter(task):
    torch.manual_seed(0)
    config = DECODERS["gpt"] if task == "causal-lm" else tiny()
    model = build_model(task, config)
    ids = torch.randint(5, VOCAB, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if task == "classification":
        labels = torch.tensor([0, 1, 1, 0])
    else:
        labels = ids.clone()
    kwargs = {} if config.type_vocab_size == 0 else {"token_type_ids": (torch.arange(9) > 4).long().expand(4, 9)}
    model(ids, mask, labels=labels, **kwargs).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        if "word_embeddings" not in name:
            assert param.grad.abs().sum() > 0, name


def test_seeded_construction_and_training_step_are_deterministic():
    def run():
        torch.manual_seed(123)
        model = MaskedLM(tiny())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(5, VOCAB, (4, 9))
        for _ in range(3):
            loss = model(ids, labels=ids).loss  # dropout active: uses the seeded RNG
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_attention_weights_are_returned_and_normalised():
    torch.manual_seed(0)
    ids = torch.randint(5, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    h, attentions = Encoder(tiny()).eval()(ids, mask, output_attentions=True)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 6, 6)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(2, 2, 6))
    assert torch.all(attentions[1][1, :, :, 4:] == 0)  # padded keys get no weight


# -- bad input -----------------------------------------------------------------------------

def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="position_embedding"):
        TransformerConfig(position_embedding="alibi-ish")
    with pytest.raises(ValueError, match="hidden_dropout"):
        TransformerConfig(hidden_dropout=1.5)
    with pytest.raises(ValueError, match="rotary needs an even head dimension"):
        TransformerConfig(hidden_size=12, num_heads=4, rotary=True)
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.preset("bert-huge")
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.from_dict({"hidden": 3})


def test_config_round_trip_and_diff():
    config = tiny(rotary=True, position_embedding="none")
    assert TransformerConfig.from_json(config.to_json()) == config
    assert tiny().diff(tiny(num_layers=3)) == {"num_layers": (2, 3)}


def test_bad_inputs_get_clear_errors():
    model = MaskedLM(tiny()).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"input_ids must be a tensor of shape \(batch, seq\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=97\)"):
        model(torch.full((2, 5), VOCAB))
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask must contain only 0"):
        model(ids, torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids must lie"):
        model(ids, token_type_ids=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="CausalLM needs a config with causal=True"):
        CausalLM(tiny())
    with pytest.raises(ValueError, match="task must be one of"):
        build_model("seq2seq", tiny())


def test_sinusoidal_and_rotary_models_accept_long_and_fractional_positions():
    model = Encoder(CONFIGS["rope-no-abs"]).eval()
    ids = torch.randint(0, VOCAB, (1, 300))  # longer than max_position_embeddings
    assert model(ids).shape == (1, 300, 32)
    positions = torch.linspace(0, 1000, 7)[None]
    assert model(ids[:, :7], position_ids=positions).shape == (1, 7, 32)


def test_sparse_prediction_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    dense = MaskedLM(tiny()).eval()
    sparse = MaskedLM(tiny(), sparse_prediction=True).eval()
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(5, VOCAB, (3, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[2, 5], labels[2, 7] = 11, 12, 13
    a, b = dense(ids, labels=labels), sparse(ids, labels=labels)
    assert b.logits.shape == (3, VOCAB)
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    assert torch.allclose(a.logits[labels != -100], b.logits, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    assert torch.allclose(dense.transform.weight.grad, sparse.transform.weight.grad, atol=1e-6)
    assert sparse(ids).logits.shape == (3, 8, VOCAB)  # no labels: dense logits


def test_encoder_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break (e.g. a host read of a tensor value)."""
    torch.manual_seed(0)
    model = MaskedLM(tiny()).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(5, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        assert torch.allclose(compiled(ids, mask).logits, model(ids, mask).logits, atol=1e-6)


def test_scaled_word_embeddings_follow_vaswani():
    # sqrt(d) times the lookup, a table initialised at d ** -0.5: tokens enter at unit scale.
    config = TransformerConfig.preset("tiny", vocab_size=3000, hidden_size=64, num_heads=4,
                                      position_embedding="sinusoidal", scale_word_embeddings=True,
                                      type_vocab_size=0, hidden_dropout=0.0, attention_dropout=0.0,
                                      norm_position="pre")
    torch.manual_seed(0)
    encoder = Encoder(config).eval()
    table = encoder.embeddings.word_embeddings.weight.detach()
    assert abs(table[1:].std().item() - 64 ** -0.5) < 0.01 and (table[0] == 0).all()
    ids = torch.randint(1, 3000, (2, 9))
    positions = torch.arange(9)[None].expand(2, 9)
    expected = 8.0 * table[ids] + sinusoidal_embedding(positions, 64)
    assert torch.allclose(encoder.embeddings(ids, positions), expected, atol=1e-6)
    # inputs_embeds replaces the lookup and is scaled like it
    assert torch.allclose(encoder(inputs_embeds=encoder.embeddings.word_embeddings(ids)),
                          encoder(ids), atol=1e-6)
    # The default is BERT's: unscaled, at initializer_range.
    plain = Encoder(dataclasses.replace(config, scale_word_embeddings=False))
    assert abs(plain.embeddings.word_embeddings.weight[1:].std().item() - 0.02) < 0.002
    with pytest.raises(ValueError, match="scale_word_embeddings must be True or False"):
        dataclasses.replace(config, scale_word_embeddings=1)
