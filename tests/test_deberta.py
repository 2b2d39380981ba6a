"""DeBERTa (tutorial_lib.techniques.deberta): parity with Hugging Face DeBERTa-v2, the EMD, configs.

Hugging Face models are built from configs with random weights (no download). The
default initialisation (std 0.02) makes the position terms too small to reveal a
sign or index error, so the models here use a larger initialiser and a relative
table scaled up, and sequences longer than the buckets / clamp range.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tutorial_lib import (DisentangledAttention, Encoder, MaskedLM, TransformerConfig,
                          build_model)
from tutorial_lib.core.attention import AttentionContext, MultiHeadAttention
from tutorial_lib.techniques.deberta import (EnhancedMaskDecoder, log_bucket_position,
                                             relative_position_index)

transformers = pytest.importorskip("transformers")
hf_deberta = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")

from tutorial_lib.interop import config_from_hf_deberta, from_hf  # noqa: E402

VOCAB = 97
TOLERANCE = 1e-5


def hf_config(**overrides):
    # transformers 5.x: position_buckets, share_att_key and norm_rel_ebd are extra
    # kwargs read with getattr; relative_attention must be set explicitly.
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=0,
                  relative_attention=True, position_biased_input=False, pos_att_type="p2c|c2p",
                  position_buckets=8, max_relative_positions=24, share_att_key=True,
                  norm_rel_ebd="layer_norm", layer_norm_eps=1e-7, initializer_range=0.1)
    values.update(overrides)
    return transformers.DebertaV2Config(**values)


def enlarge_relative_table(hf_model):
    """Make the position terms dominate the scores (x10 table, or its LayerNorm's gain)."""
    encoder = hf_model.base_model.encoder
    with torch.no_grad():
        encoder.rel_embeddings.weight.mul_(10)
        if hasattr(encoder, "LayerNorm"):
            encoder.LayerNorm.weight.mul_(10)


def padded_batch(seed=0, length=40):
    """Unequal lengths, one very short row; 40 tokens reach past 24 (clamp) and 4 (buckets)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, real in enumerate([length, 29, 11, 2]):
        mask[row, real:] = 0
        ids[row, real:] = 0
    return ids, mask


def build_pair(seed=0, model="DebertaV2Model", **overrides):
    torch.manual_seed(seed)
    hf = getattr(transformers, model)(hf_config(**overrides)).eval()
    enlarge_relative_table(hf)
    return hf, from_hf(hf)


def max_diff_on_real_tokens(a, b, mask):
    # Padded rows differ by design: Hugging Face's padded queries attend uniformly to
    # every key, ours to the real keys. Nothing reads them.
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


# -- relative positions -----------------------------------------------------------------------

# (16, 1024), (26, 64), (16, 128): settings where another order of the float32 operations,
# or float64, moves a distance to the neighbouring bucket.
@pytest.mark.parametrize("buckets,max_relative", [(256, 512), (8, 24), (2, 10), (6, 100),
                                                  (16, 1024), (26, 64), (16, 128)])
def test_log_buckets_equal_hugging_face_exactly(buckets, max_relative):
    relative = torch.arange(-5000, 5001)
    ours = log_bucket_position(relative, buckets, max_relative)
    theirs = hf_deberta.make_log_bucket_position(relative, buckets, max_relative).long()
    assert torch.equal(ours, theirs)
    # Exact near zero, logarithmic (and odd) beyond.
    mid = buckets // 2
    near = relative.abs() <= mid
    assert torch.equal(ours[near], relative[near])
    assert torch.equal(ours, -ours.flip(0))


def test_relative_index_is_the_clamped_distance():
    positions = torch.arange(7)[None]
    index = relative_position_index(positions, positions, span=3)[0]  # (query, key)
    for i in range(7):
        for j in range(7):
            assert index[i, j] == min(max(i - j + 3, 0), 5)


# -- parity with DebertaV2Model -----------------------------------------------------------------

@pytest.mark.parametrize("pos_att_type", ["p2c|c2p", "c2p", "p2c"])
@pytest.mark.parametrize("position_buckets", [8, -1])
@pytest.mark.parametrize("share_att_key", [True, False])
def test_encoder_matches_deberta_v2_with_padding(share_att_key, position_buckets, pos_att_type):
    hf, ours = build_pair(share_att_key=share_att_key, position_buckets=position_buckets,
                          pos_att_type=pos_att_type)
    assert isinstance(ours, Encoder) and not ours.training
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        fused = ours(ids, mask)  # SDPA with the bias as an additive float mask
        explicit, weights = ours(ids, mask, output_attentions=True)
    assert max_diff_on_real_tokens(fused, expected, mask) <= TOLERANCE
    assert max_diff_on_real_tokens(explicit, expected, mask) <= TOLERANCE
    assert torch.allclose(weights[0].sum(-1), torch.ones(()), atol=1e-5)
    assert torch.all(weights[1][2, :, :11, 11:] == 0)  # padded keys get no weight


def test_encoder_matches_deberta_v1_style_positions_in_the_input():
    """No table LayerNorm, absolute positions added to the input, token types."""
    hf, ours = build_pair(seed=1, norm_rel_ebd="none", position_biased_input=True,
                          type_vocab_size=2, share_att_key=False, position_buckets=-1)
    assert ours.config.position_embedding == "learned"
    ids, mask = padded_batch(seed=1)
    types = (torch.arange(ids.shape[1]) >= 15).long().expand_as(ids)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
    assert max_diff_on_real_tokens(got, expected, mask) <= TOLERANCE


@pytest.mark.parametrize("share_att_key", [True, False])
def test_paper_p2c_index_does_not_match_the_released_code(share_att_key):
    """The chapter's paper-vs-code cell: p2c with delta(j, i) gives another model."""
    hf, code = build_pair(share_att_key=share_att_key)
    paper = Encoder(TransformerConfig.from_dict(
        {**code.config.to_dict(), "p2c_convention": "paper"})).eval()
    paper.load_state_dict(code.state_dict())
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        code_diff = max_diff_on_real_tokens(code(ids, mask), expected, mask)
        paper_diff = max_diff_on_real_tokens(paper(ids, mask), expected, mask)
    assert code_diff <= TOLERANCE
    assert paper_diff > 1000 * TOLERANCE


def test_training_mode_gradients_match_deberta_v2():
    """Dropout off, train mode: same loss gradients for the table and the projections."""
    torch.manual_seed(3)
    hf = transformers.DebertaV2Model(hf_config(share_att_key=False, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)).train()
    enlarge_relative_table(hf)
    ours = from_hf(hf)
    assert ours.training
    ids, mask = padded_batch(seed=3)
    weights = torch.randn(ids.shape + (32,), generator=torch.Generator().manual_seed(0))
    real = mask.bool()
    (hf(input_ids=ids, attention_mask=mask).last_hidden_state * weights)[real].sum().backward()
    (ours(ids, mask) * weights)[real].sum().backward()
    plugin = ours.attention_plugins[0]
    pairs = [
        (ours.relative_embeddings.embeddings.weight, hf.encoder.rel_embeddings.weight),
        (ours.relative_embeddings.norm.weight, hf.encoder.LayerNorm.weight),
        (plugin.position_key[1].weight, hf.encoder.layer[1].attention.self.pos_key_proj.weight),
        (plugin.position_query[0].bias, hf.encoder.layer[0].attention.self.pos_query_proj.bias),
        (ours.layers[0].attention.query.weight,
         hf.encoder.layer[0].attention.self.query_proj.weight),
    ]
    for mine, theirs in pairs:
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-4, rtol=1e-4)
        assert mine.grad.abs().sum() > 0


# -- from_hf: masked LM --------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [True, False])
def test_masked_lm_matches_deberta_v2_for_masked_lm(legacy):
    """legacy=True: BERT-style cls.predictions.*; False: lm_predictions.lm_head.* (checkpoints)."""
    hf, ours = build_pair(seed=4, model="DebertaV2ForMaskedLM", legacy=legacy)
    assert isinstance(ours, MaskedLM) and ours.output_weight is None
    ids, mask = padded_batch(seed=4)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    labels[0, 30] = ids[0, 30]
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(ids, mask, labels=labels)
    assert max_diff_on_real_tokens(got.logits, expected.logits, mask) <= TOLERANCE
    assert torch.allclose(got.loss, expected.loss, atol=TOLERANCE)


def test_from_hf_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="relative_attention"):
        config_from_hf_deberta(hf_config(relative_attention=False))
    with pytest.raises(ValueError, match="embedding_size"):
        config_from_hf_deberta(hf_config(embedding_size=16))
    with pytest.raises(ValueError, match="conv_kernel_size"):
        config_from_hf_deberta(hf_config(conv_kernel_size=3))


def test_preset_is_the_deberta_v3_base_configuration():
    """The values of microsoft/deberta-v3-base's config.json map onto the preset."""
    v3_base = transformers.DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=0,
        initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True,
        max_relative_positions=-1, pad_token_id=0, position_biased_input=False,
        pos_att_type="p2c|c2p", position_buckets=256, share_att_key=True,
        norm_rel_ebd="layer_norm")
    preset = TransformerConfig.preset("deberta-v3-base")
    assert config_from_hf_deberta(v3_base).diff(preset) == {}
    assert preset.relative_span == 256 and preset.resolved_max_relative_positions == 512


# -- the enhanced mask decoder ------------------------------------------------------------------

def emd_reference(hf, position_table, ids, mask):
    """The released code's EMD rebuilt from Hugging Face's layers (which take query_states)."""
    encoder = hf.deberta.encoder
    out = hf.deberta(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    last_layer_input = out.hidden_states[-2]  # H_{L-1}
    query = position_table[: ids.shape[1]][None] + last_layer_input
    attention_mask = encoder.get_attention_mask(mask)
    relative_pos = encoder.get_rel_pos(last_layer_input)
    rel_embeddings = encoder.get_rel_embedding()
    for _ in range(2):  # the last layer twice, shared weights
        query, _ = encoder.layer[-1](last_layer_input, attention_mask, query_states=query,
                                     relative_pos=relative_pos, rel_embeddings=rel_embeddings)
    return hf.lm_predictions(query, hf.deberta.embeddings.word_embeddings)


@pytest.mark.parametrize("share_att_key", [True, False])
def test_enhanced_mask_decoder_matches_a_reference_built_from_hf_layers(share_att_key):
    hf, plain = build_pair(seed=5, model="DebertaV2ForMaskedLM", legacy=False,
                           share_att_key=share_att_key)
    for sparse in (False, True):
        emd = build_model("mlm", plain.config, decoder=EnhancedMaskDecoder,
                          sparse_prediction=sparse).eval()
        missing, unexpected = emd.load_state_dict(plain.state_dict(), strict=False)
        assert missing == ["decoder.position_embeddings.weight"] and not unexpected
        with torch.no_grad():
            emd.decoder.position_embeddings.weight.normal_(0, 1.0)
        ids, mask = padded_batch(seed=5)
        labels = torch.full_like(ids, -100)
        labels[:, 0] = ids[:, 0]
        labels[0, 33] = ids[0, 33]
        with torch.no_grad():
            expected = emd_reference(hf, emd.decoder.position_embeddings.weight,
                                     ids, mask)
            got = emd(ids, mask, labels=labels)
            plain_logits = plain(ids, mask).logits
        if sparse:
            assert got.logits.shape == (5, VOCAB)
            assert torch.allclose(got.logits, expected[labels != -100], atol=TOLERANCE, rtol=0)
        else:
            assert max_diff_on_real_tokens(got.logits, expected, mask) <= TOLERANCE
            # The decoder matters: without it the logits are clearly different.
            assert max_diff_on_real_tokens(plain_logits, expected, mask) > 1e-2
        # hidden_states stays the encoder's output (what fine-tuning uses).
        assert torch.allclose(got.hidden_states, plain(ids, mask).hidden_states, atol=1e-6)


def test_enhanced_mask_decoder_needs_positions_off_in_the_input():
    config = TransformerConfig.preset("tiny", vocab_size=VOCAB, relative_attention=True)
    with pytest.raises(ValueError, match="position_embedding='none'"):
        build_model("mlm", config, decoder=EnhancedMaskDecoder)


# -- library behaviour --------------------------------------------------------------------------

def tiny_deberta(**overrides):
    values = dict(vocab_size=VOCAB, position_embedding="none", type_vocab_size=0,
                  relative_attention=True, position_buckets=8, max_relative_positions=16,
                  share_att_key=True, norm_rel_ebd="layer_norm")
    values.update(overrides)
    return TransformerConfig.preset("tiny", **values)


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("share_att_key", [True, False])
def test_gradients_reach_every_parameter(share_att_key, decoder):
    torch.manual_seed(0)
    model = build_model("mlm", tiny_deberta(share_att_key=share_att_key),
                        decoder=EnhancedMaskDecoder if decoder else None)
    ids = torch.randint(5, VOCAB, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    model(ids, mask, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        if "word_embeddings" not in name:
            assert param.grad.abs().sum() > 0, name


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 24), pad=st.integers(1, 8), seed=st.integers(0, 10_000),
       share_att_key=st.booleans(), buckets=st.sampled_from([0, 4, 8]))
def test_padding_never_changes_unpadded_outputs(length, pad, seed, share_att_key, buckets):
    torch.manual_seed(seed)
    model = Encoder(tiny_deberta(share_att_key=share_att_key, position_buckets=buckets)).eval()
    ids = torch.randint(5, VOCAB, (1, length))
    padded = torch.cat([ids, torch.randint(0, VOCAB, (1, pad))], dim=1)
    mask = torch.cat([torch.ones(1, length), torch.zeros(1, pad)], dim=1).long()
    with torch.no_grad():
        alone = model(ids)
        with_padding = model(padded, mask)
    assert torch.allclose(with_padding[:, :length], alone, atol=1e-5)


def test_the_plugin_reuses_the_layer_projections_when_keys_are_shared():
    model = Encoder(tiny_deberta(share_att_key=True))
    plugin = model.attention_plugins[0]
    assert isinstance(plugin, DisentangledAttention)
    assert plugin.position_key is None and plugin.position_query is None
    assert not any("attention_plugins" in name for name, _ in model.named_parameters())
    separate = Encoder(tiny_deberta(share_att_key=False, pos_att_type=("c2p",)))
    names = [name for name, _ in separate.named_parameters() if "attention_plugins" in name]
    assert names == [f"attention_plugins.0.position_key.{i}.{kind}"
                     for i in range(2) for kind in ("weight", "bias")]


def test_plugin_refuses_a_missing_relative_table():
    config = tiny_deberta()
    plugin = DisentangledAttention.from_config(config)
    attention = MultiHeadAttention(config.hidden_size, config.num_heads)
    positions = torch.arange(5)[None]
    ctx = AttentionContext(positions, positions, None, causal=False)
    with pytest.raises(ValueError, match="relative_embeddings"):
        attention(torch.randn(1, 5, config.hidden_size), ctx, [plugin])


def test_encoder_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = build_model("mlm", tiny_deberta(), decoder=EnhancedMaskDecoder).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(5, VOCAB, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        assert torch.allclose(compiled(ids, mask).logits, model(ids, mask).logits, atol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("pos_att_type", ("c2p", "p2p"), "pos_att_type"),
    ("pos_att_type", ("c2p", "c2p"), "pos_att_type"),
    ("position_buckets", -1, "position_buckets"),
    ("position_buckets", 1, "position_buckets"),
    ("max_relative_positions", 0, "max_relative_positions"),
    ("position_buckets", 64, "max_relative_positions"),  # 64 // 2 + 1 >= 16
    ("share_att_key", "yes", "share_att_key"),
    ("relative_attention", 1, "relative_attention"),
    ("norm_rel_ebd", "rms_norm", "norm_rel_ebd"),
    ("p2c_convention", "transposed", "p2c_convention"),
])
def test_bad_configs_raise_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_deberta(**{field: value})


def test_config_accepts_hugging_face_strings_and_survives_json():
    config = tiny_deberta(pos_att_type="P2C|c2p")
    assert config.pos_att_type == ("p2c", "c2p")
    assert TransformerConfig.from_json(config.to_json()) == config
    assert TransformerConfig.preset("tiny").relative_attention is False  # BERT by default
