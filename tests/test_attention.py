"""The attention core: fused vs explicit path, every plugin hook, RoPE and windows."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tutorial_lib import (AttentionContext, AttentionPlugin, Encoder, MultiHeadAttention,
                          RotaryEmbedding, SlidingWindowMask, TransformerConfig,
                          sinusoidal_embedding)


class RandomBias(AttentionPlugin):
    def __init__(self, heads, length):
        super().__init__()
        self.table = torch.randn(heads, length, length) * 3

    def score_bias(self, attn, q, k, ctx):
        return self.table[None]


class PerQueryScale(AttentionPlugin):
    def score_scale(self, attn, ctx):
        return (1.0 + ctx.query_positions.float() / 4)[:, None, :, None]  # (batch, 1, query, 1)


class KeepEvenKeys(AttentionPlugin):
    def mask(self, attn, ctx):
        return (ctx.key_positions % 2 == 0)[:, None, None, :]


class ReluSquared(AttentionPlugin):
    calls = 0

    def normalise(self, scores, allowed, ctx):
        ReluSquared.calls += 1
        weights = torch.relu(scores) ** 2
        if allowed is not None:
            weights = weights.masked_fill(~allowed, 0.0)
        return weights / scores.shape[-1]


def make_context(batch, length, padding=None, causal=False):
    positions = torch.arange(length)[None]
    return AttentionContext(positions, positions, padding, causal)


def reference_attention(attn, x, scale=1.0, bias=None, allowed=None):
    """The same quantity in float64 straight from the formula."""
    x = x.double()
    heads, d = attn.num_heads, attn.head_dim

    def proj(linear):
        return (x @ linear.weight.double().T + linear.bias.double()).view(
            x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    q, k, v = proj(attn.query), proj(attn.key), proj(attn.value)
    scores = scale * (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    context = scores.softmax(-1) @ v
    context = context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return context @ attn.output.weight.double().T + attn.output.bias.double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_plugins", [False, True])
def test_fused_and_explicit_paths_match_float64_reference(causal, with_plugins):
    torch.manual_seed(0)
    batch, length, heads = 2, 8, 4
    attn = MultiHeadAttention(32, heads).eval()
    x = torch.randn(batch, length, 32)
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, 6:] = False
    ctx = make_context(batch, length, padding, causal)
    plugins = [RandomBias(heads, length), PerQueryScale(), KeepEvenKeys()] if with_plugins else []

    fused, none = attn(x, ctx, plugins)
    explicit, weights = attn(x, ctx, plugins, need_weights=True)
    assert none is None and weights.shape == (batch, heads, length, length)

    allowed = padding[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    scale, bias = 1.0, None
    if with_plugins:
        scale = (1.0 + torch.arange(length).double() / 4)[None, None, :, None]
        bias = plugins[0].table[None]
        allowed = allowed & (torch.arange(length) % 2 == 0)[None, None, None, :]
    expected = reference_attention(attn, x, scale, bias, allowed)
    assert torch.allclose(fused.double(), expected, atol=1e-5)
    assert torch.allclose(explicit.double(), expected, atol=1e-5)


def test_custom_normaliser_replaces_softmax():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 5, 16)
    ctx = make_context(1, 5)
    ReluSquared.calls = 0
    out, weights = attn(x, ctx, [ReluSquared()])
    assert ReluSquared.calls == 1 and weights is not None
    q = attn.split_heads(attn.query(x))
    k = attn.split_heads(attn.key(x))
    expected = torch.relu(q @ k.transpose(-1, -2) / math.sqrt(8)) ** 2 / 5
    assert torch.allclose(weights, expected, atol=1e-6)
    with pytest.raises(ValueError, match="at most one may"):
        attn(x, ctx, [ReluSquared(), ReluSquared()])


def test_plugins_with_wrong_outputs_are_refused():
    attn = MultiHeadAttention(16, 2)
    x = torch.randn(1, 5, 16)

    class FloatMask(AttentionPlugin):
        def mask(self, attn, ctx):
            return torch.ones(5, 5)

    class KeyVaryingScale(AttentionPlugin):
        def score_scale(self, attn, ctx):
            return torch.ones(1, 1, 5, 5)

    with pytest.raises(TypeError, match="FloatMask.mask must return a bool tensor"):
        attn(x, make_context(1, 5), [FloatMask()])
    with pytest.raises(ValueError, match=r"KeyVaryingScale.score_scale must broadcast"):
        attn(x, make_context(1, 5), [KeyVaryingScale()])
    with pytest.raises(TypeError, match="plugin must be an AttentionPlugin"):
        Encoder(TransformerConfig.preset("tiny")).add_attention_plugin(torch.nn.Linear(2, 2))


@settings(max_examples=30, deadline=None)
@given(length=st.integers(2, 20), window=st.integers(1, 8), causal=st.booleans())
def test_window_mask_never_lets_a_query_see_beyond_w(length, window, causal):
    torch.manual_seed(length)
    config = TransformerConfig.preset("tiny", vocab_size=50, attention_window=window,
                                      causal=causal, position_embedding="none", rotary=True)
    model = Encoder(config).eval()
    _, attentions = model(torch.randint(0, 50, (1, length)), output_attentions=True)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = (i - j).abs() < window
    if causal:
        visible &= j <= i
    for weights in attentions:
        assert torch.all(weights[0][:, ~visible] == 0)
        assert torch.all(weights[0][:, visible] > 0)


class NotBlockwiseBias(AttentionPlugin):
    """A bias that ignores the context's positions: it must keep the dense path."""

    def score_bias(self, attn, q, k, ctx):
        return torch.zeros(q.shape[-2], k.shape[-2])


def padded_window_case(seed, length, pad, causal):
    torch.manual_seed(seed)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, length, 16)
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, length - min(pad, length - 1):] = False  # row 1 keeps at least one token
    return attn, x, padding


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 40), window=st.integers(1, 9), causal=st.booleans(),
       pad=st.integers(0, 12), seed=st.integers(0, 10_000))
def test_banded_window_path_equals_the_dense_path(length, window, causal, pad, seed):
    attn, x, padding = padded_window_case(seed, length, pad, causal)
    plugins = [RotaryEmbedding(8), SlidingWindowMask(window), PerQueryScale()]

    ctx = make_context(2, length, padding, causal)
    banded, _ = attn(x, ctx, plugins)
    assert (("block-context", window) in ctx.cache) == (length > 2 * window)
    _, weights = attn(x, make_context(2, length, padding, causal), plugins, need_weights=True)
    attn.banded = False
    dense, _ = attn(x, make_context(2, length, padding, causal), plugins)
    # Padded queries see no key in some rows; nothing reads them, so compare real tokens.
    assert torch.allclose(banded[padding], dense[padding], atol=1e-6)
    explicit = (weights @ attn.split_heads(attn.value(x))).transpose(1, 2).reshape(2, length, 16)
    assert torch.allclose(banded[padding], attn.output(explicit)[padding], atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(6, 40), window=st.integers(1, 6), causal=st.booleans(),
       query=st.integers(0, 39), seed=st.integers(0, 10_000))
def test_banded_path_never_lets_a_query_see_beyond_w(length, window, causal, query, seed):
    """Changing every token the window hides from one query leaves its output alone."""
    query = query % length
    attn, x, _ = padded_window_case(seed, length, 0, causal)
    plugins = [RotaryEmbedding(8), SlidingWindowMask(window)]
    hidden = (torch.arange(length) - query).abs() >= window
    if causal:
        hidden |= torch.arange(length) > query
    changed = x.clone()
    changed[:, hidden] = torch.randn(2, int(hidden.sum()), 16) * 5
    before, _ = attn(x, make_context(2, length, causal=causal), plugins)
    after, _ = attn(changed, make_context(2, length, causal=causal), plugins)
    assert torch.allclose(before[:, query], after[:, query], atol=1e-5)


def test_banded_path_needs_blockwise_plugins_and_a_long_enough_sequence():
    attn, x, padding = padded_window_case(0, 12, 3, causal=False)
    ctx = make_context(2, 12, padding)
    attn(x, ctx, [SlidingWindowMask(3), NotBlockwiseBias()])
    assert not any(key[0] == "block-context" for key in ctx.cache if isinstance(key, tuple))
    ctx = make_context(2, 12, padding)
    attn(x, ctx, [SlidingWindowMask(6)])  # 12 <= 2 * 6: a block would hold everything
    assert ("block-context", 6) not in ctx.cache
    # Positions with gaps below 1 would put allowed keys outside the band: dense path.
    half_steps = torch.arange(12)[None] / 2
    ctx = AttentionContext(half_steps, half_steps, padding, False)
    attn(x, ctx, [SlidingWindowMask(3)])
    assert ("block-context", 3) not in ctx.cache


def test_content_scores_hook_replaces_q_dot_k():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 6, 16)

    class DoubledScores(AttentionPlugin):
        def content_scores(self, attn, q, k, ctx):
            return 2 * q @ k.transpose(-1, -2)

    class TimesTwo(AttentionPlugin):
        def score_scale(self, attn, ctx):
            return 2.0

    for causal in (False, True):
        got, _ = attn(x, make_context(2, 6, causal=causal), [DoubledScores()])
        expected, _ = attn(x, make_context(2, 6, causal=causal), [TimesTwo()])
        assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="two attention plugins replace content_scores"):
        attn(x, make_context(2, 6), [DoubledScores(), DoubledScores()])


def rope_reference(x, positions, base=10000.0):
    """Interleaved RoPE in float64 with complex numbers: (x_2i + i x_2i+1) * e^{i p theta_i}."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pairs = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    rotated = pairs * torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)
    return torch.stack((rotated.real, rotated.imag), dim=-1).flatten(-2)


def test_rope_interleaved_matches_complex_reference_and_half_is_a_permutation():
    torch.manual_seed(0)
    d, length = 16, 9
    x = torch.randn(1, 1, length, d)
    positions = torch.arange(length)[None] * 7.0  # large angles expose any frequency error
    interleaved = RotaryEmbedding(d, pairing="interleaved")
    cos, sin = interleaved.cos_sin(positions)
    got = interleaved.rotate(x, cos, sin)
    assert torch.allclose(got[0, 0].double(), rope_reference(x[0, 0], positions[0]), atol=1e-5)

    # "half" pairs channel i with i + d/2: the same rotation after a channel permutation.
    half = RotaryEmbedding(d, pairing="half")
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # interleaved -> half
    got_half = half.rotate(x[..., perm], *half.cos_sin(positions))
    assert torch.allclose(got_half, got[..., perm], atol=1e-5)
    assert not torch.allclose(got_half, got, atol=1e-2)  # the conventions differ


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rope_scores_depend_only_on_relative_position(pairing):
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, pairing=pairing)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m, n):
        qm = rope.rotate(q, *rope.cos_sin(torch.tensor([[float(m)]])))
        kn = rope.rotate(k, *rope.cos_sin(torch.tensor([[float(n)]])))
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) == pytest.approx(score(3, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_sinusoidal_embedding_matches_formula():
    positions = torch.tensor([[0, 1, 50]])
    pe = sinusoidal_embedding(positions, 8)
    assert pe.shape == (1, 3, 8)
    for p_index, p in enumerate([0, 1, 50]):
        for i in range(4):
            omega = 10000 ** (-2 * i / 8)
            assert pe[0, p_index, 2 * i].item() == pytest.approx(math.sin(p * omega), abs=1e-5)
            assert pe[0, p_index, 2 * i + 1].item() == pytest.approx(math.cos(p * omega), abs=1e-5)


def test_sliding_window_rejects_bad_window():
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        SlidingWindowMask(0)
    with pytest.raises(ValueError, match="attention_window"):
        TransformerConfig(attention_window=0)
