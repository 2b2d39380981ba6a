"""Chapter 5's library: NTK-aware RoPE, ReRoPE, ALiBi, log-n scaling, random positions,
and the banded (linear) window path with all of them switched on."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tutorial_lib import (ALiBi, AttentionContext, CausalLM, Encoder, LogNScaling, MaskedLM,
                          MultiHeadAttention, ReRotaryEmbedding, RotaryEmbedding,
                          SlidingWindowMask, TransformerConfig, alibi_slopes,
                          equal_mean_random_positions, evenly_spaced_positions,
                          ntk_scaled_base, random_positions, set_position_options)

VOCAB = 61


def tiny(**overrides):
    return TransformerConfig.preset("tiny", vocab_size=VOCAB, **overrides)


def context(positions, padding=None, causal=False):
    return AttentionContext(positions, positions, padding, causal)


# -- float64 references, built from the papers' definitions ----------------------------

def complex_pairs(x, pairing):
    """Channel pairs of x as complex numbers, in float64: a + ib."""
    x = x.double()
    half = x.shape[-1] // 2
    if pairing == "interleaved":
        return torch.complex(x[..., 0::2], x[..., 1::2])
    return torch.complex(x[..., :half], x[..., half:])


def rope_score_at(q, k, relative, base, pairing):
    """<R_r q, k> for every query/key pair: Re sum_i q_i conj(k_i) e^{i r theta_i}.

    q (..., query, d), k (..., key, d), relative (query, key) float64 positions r.
    """
    d = q.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    products = complex_pairs(q, pairing)[..., :, None, :] \
        * complex_pairs(k, pairing)[..., None, :, :].conj()  # (..., query, key, d/2)
    phase = torch.polar(torch.ones(()).double(), relative[..., None] * theta)
    return (products * phase).real.sum(-1)


def projections64(attn, x):
    x = x.double()

    def project(linear):
        return (x @ linear.weight.double().T + linear.bias.double()).view(
            x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    return project(attn.query), project(attn.key), project(attn.value)


def attention64(attn, x, scores, allowed):
    """Finish attention in float64 from raw (batch, heads, query, key) logits."""
    _, _, v = projections64(attn, x)
    scores = scores.masked_fill(~allowed, float("-inf"))
    context_ = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return context_ @ attn.output.weight.double().T + attn.output.bias.double()


def visible(length, padding, causal, window=None):
    """(batch, 1, query, key) the keys each query may attend to, by index."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = padding[:, None, None, :].clone()
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & ((i - j).abs() < window)
    return allowed


def sharpen(model, factor=40.0):
    """Scale up q and k projections: BERT's init (std 0.02) gives near-uniform attention,
    under which no position scheme changes the output noticeably."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MultiHeadAttention):
                module.query.weight.mul_(factor)
                module.key.weight.mul_(factor)
    return model


def padded_batch(length, seed=0, hidden=32):
    torch.manual_seed(seed)
    x = torch.randn(2, length, hidden)
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, length - 3:] = False
    return x, padding


# -- RoPE's relative property and NTK scaling -------------------------------------------

@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("ntk_factor", [1.0, 8.0])
def test_rope_scores_are_invariant_to_shifting_all_positions_even_fractionally(
        pairing, ntk_factor):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, base=ntk_scaled_base(10000.0, ntk_factor, 16), pairing=pairing)
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    positions = torch.sort(torch.rand(1, 9) * 40).values  # fractional, unevenly spaced

    def scores(p):
        cos, sin = rope.cos_sin(p)
        return rope.rotate(q, cos, sin) @ rope.rotate(k, cos, sin).transpose(-1, -2)

    for shift in (0.37, 3.0, 250.5):
        assert torch.allclose(scores(positions + shift), scores(positions), atol=2e-4)
    # The product is RoPE at relative position m - n, whatever the pairing.
    relative = (positions[0, :, None] - positions[0, None, :]).double()
    expected = rope_score_at(q, k, relative, rope.base, pairing)
    assert torch.allclose(scores(positions).double(), expected, atol=1e-4)


RELATIVE_SCHEMES = {
    "rope": dict(rotary=True),
    "rope-ntk": dict(rotary=True, rotary_ntk_factor=4.0),
    "rerope": dict(rotary=True, rerope_window=3),
    "alibi": dict(alibi=True),
    "alibi-window-logn": dict(alibi=True, attention_window=3, logn_training_length=8),
}


@pytest.mark.parametrize("name", list(RELATIVE_SCHEMES))
@pytest.mark.parametrize("causal", [False, True])
def test_relative_schemes_see_only_position_differences(name, causal):
    """A whole model with only relative positions ignores a shift of every position."""
    torch.manual_seed(0)
    model = Encoder(tiny(position_embedding="none", causal=causal,
                         **RELATIVE_SCHEMES[name])).eval()
    ids = torch.randint(1, VOCAB, (2, 11))
    positions = torch.arange(11)[None] * 1.5  # steps >= 1 keep the banded path possible
    with torch.no_grad():
        base = model(ids, position_ids=positions)
        for shift in (0.25, 7.0, 100.5):
            assert torch.allclose(model(ids, position_ids=positions + shift), base, atol=1e-4)


def test_ntk_base_formula_and_factor_one_is_the_identity():
    d = 64
    assert ntk_scaled_base(10000.0, 1.0, d) == 10000.0
    assert ntk_scaled_base(10000.0, 8.0, d) == pytest.approx(10000.0 * 8.0 ** (64 / 62))
    # The fastest frequency stays, the slowest is divided by exactly k.
    k = 16.0
    old = RotaryEmbedding(d).inv_freq.double()
    new = RotaryEmbedding(d, base=ntk_scaled_base(10000.0, k, d)).inv_freq.double()
    assert new[0] == old[0] == 1.0
    assert (old[-1] / new[-1]).item() == pytest.approx(k, rel=1e-5)

    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (1, 9))
    plain = Encoder(tiny(position_embedding="none", rotary=True)).eval()
    same = Encoder(tiny(position_embedding="none", rotary=True, rotary_ntk_factor=1.0)).eval()
    sharpen(plain)
    same.load_state_dict(plain.state_dict())
    assert torch.equal(plain(ids), same(ids))
    assert plain.position_plugins[0].base == 10000.0
    set_position_options(same, rotary_ntk_factor=4.0)
    assert same.position_plugins[0].base == pytest.approx(ntk_scaled_base(10000.0, 4.0, 16))
    assert not torch.allclose(plain(ids), same(ids), atol=1e-4)


# -- ReRoPE ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("window", [1, 3])
def test_rerope_matches_float64_reference_from_the_definition(causal, pairing, window):
    torch.manual_seed(1)
    length = 9
    attn = MultiHeadAttention(32, 2).eval()
    x, padding = padded_batch(length)
    positions = torch.arange(length)[None] + 2.5  # fractional, so any position error shows
    rerope = ReRotaryEmbedding(16, window, base=100.0, pairing=pairing)  # large angles

    got, _ = attn(x, context(positions, padding, causal), [rerope])

    q, k, _ = projections64(attn, x)
    relative = (positions[0, :, None] - positions[0, None, :]).double()  # i - j
    clipped = relative.clamp(max=window) if causal else relative.clamp(-window, window)
    # Rotating q by the clipped relative position and leaving k alone is the definition.
    scores = rope_score_at(q, k, clipped, 100.0, pairing) / math.sqrt(16)
    expected = attention64(attn, x, scores, visible(length, padding, causal))
    assert torch.allclose(got.double()[padding], expected[padding], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_rerope_with_a_window_beyond_the_length_is_plain_rope(causal):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 2).eval()
    x, padding = padded_batch(10)
    positions = torch.arange(10)[None]
    for pairing in ("half", "interleaved"):
        rope, _ = attn(x, context(positions, padding, causal), [RotaryEmbedding(16, pairing=pairing)])
        for window in (9, 10, 50):
            rerope = ReRotaryEmbedding(16, window, pairing=pairing)
            got, _ = attn(x, context(positions, padding, causal), [rerope])
            assert torch.allclose(got, rope, atol=1e-5)
        narrow, _ = attn(x, context(positions, padding, causal),
                         [ReRotaryEmbedding(16, 2, pairing=pairing)])
        assert not torch.allclose(narrow, rope, atol=1e-4)


# -- ALiBi ----------------------------------------------------------------------------

def reference_slopes(n):
    """The ALiBi paper's get_slopes, restated: a geometric sequence starting at
    2^(-8/n) with that same ratio for a power of two n; otherwise the closest lower
    power of two's sequence, then every other element of the doubled one's."""
    def geometric(count):
        start = 2.0 ** (-(2.0 ** -(math.log2(count) - 3)))
        return [start * start ** i for i in range(count)]
    if math.log2(n).is_integer():
        return geometric(n)
    closest = 2 ** math.floor(math.log2(n))
    return geometric(closest) + reference_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [1, 2, 4, 8, 12, 16, 6])
def test_alibi_slopes_follow_the_reference_code(heads):
    slopes = alibi_slopes(heads)
    assert slopes.shape == (heads,)
    assert slopes.tolist() == pytest.approx(reference_slopes(heads), rel=1e-6)


def test_alibi_slopes_for_8_heads_are_the_papers():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64,
                                        1 / 128, 1 / 256]


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_attention_matches_float64_reference(causal):
    torch.manual_seed(0)
    length, heads = 8, 4
    attn = MultiHeadAttention(32, heads).eval()
    x, padding = padded_batch(length)
    positions = torch.arange(length)[None] * 3  # large distances expose a sign error
    got, _ = attn(x, context(positions, padding, causal), [ALiBi(heads)])

    q, k, _ = projections64(attn, x)
    relative = (positions[0, :, None] - positions[0, None, :]).double()  # i - j
    slopes = torch.tensor(reference_slopes(heads), dtype=torch.float64)[:, None, None]
    # Encoder: -m|i - j|; causal: m(j - i), equal on every visible key.
    bias = -slopes * (relative if causal else relative.abs())
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    expected = attention64(attn, x, scores, visible(length, padding, causal))
    assert torch.allclose(got.double()[padding], expected[padding], atol=1e-5)
    # Among the keys a query sees, the bias favours the nearest: itself.
    bias = ALiBi(heads).score_bias(attn, q, k, context(positions, causal=causal))
    seen = 6 if causal else length
    assert bias[0, :, 5, :seen].argmax(-1).tolist() == [5] * heads


# -- log-n scaling ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_logn_counts_exactly_the_keys_each_query_may_see(causal, window):
    torch.manual_seed(0)
    config = tiny(position_embedding="none", rotary=True, causal=causal,
                  attention_window=window, logn_training_length=4)
    model = Encoder(config).eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    _, attentions = model(ids, mask, output_attentions=True)
    seen = (attentions[0] > 0).sum(-1)[:, 0]  # (batch, query) keys with weight
    positions = torch.arange(9)[None]
    ctx = AttentionContext(positions, positions, mask.bool(), causal)
    counted = model.position_plugins[-1].visible_keys(ctx)
    real = mask.bool()
    assert torch.equal(counted[real], seen[real])
    if causal and window is not None:
        assert counted[0].tolist() == [min(i + 1, window) for i in range(9)]


def test_logn_scale_is_one_at_the_training_length_and_log_ratio_elsewhere():
    positions = torch.arange(40)[None]
    for clamp in (True, False):
        plugin = LogNScaling(16, clamp=clamp)
        for n in (1, 5, 16, 40):
            scale = plugin.score_scale(None, context(positions[:, :n]))
            assert scale.shape == (1, 1, n, 1)
            expected = math.log(n) / math.log(16)
            expected = max(expected, 1.0) if clamp else expected
            assert torch.allclose(scale, torch.tensor(expected), atol=1e-6)
        causal = plugin.score_scale(None, context(positions, causal=True))[0, 0, :, 0]
        expected = torch.log(torch.arange(1, 41).double()) / math.log(16)
        if clamp:
            expected = expected.clamp(min=1)
        assert torch.allclose(causal.double(), expected, atol=1e-6)
        assert causal[15] == pytest.approx(1.0)  # the 16th query sees 16 keys


def test_logn_multiplies_the_content_scores_but_not_alibi():
    torch.manual_seed(0)
    length, heads = 12, 4
    attn = MultiHeadAttention(32, heads).eval()
    x, padding = padded_batch(length)
    positions = torch.arange(length)[None]
    plugins = [ALiBi(heads), LogNScaling(4)]
    got, _ = attn(x, context(positions, padding), plugins)
    q, k, _ = projections64(attn, x)
    n = padding.sum(-1).double()[:, None, None, None]  # real keys, per row
    scale = (n.log() / math.log(4)).clamp(min=1)
    relative = (positions[0, :, None] - positions[0, None, :]).double().abs()
    bias = -torch.tensor(reference_slopes(heads), dtype=torch.float64)[:, None, None] * relative
    scores = scale * (q @ k.transpose(-1, -2)) / math.sqrt(8) + bias
    expected = attention64(attn, x, scores, visible(length, padding, False))
    assert torch.allclose(got.double()[padding], expected[padding], atol=1e-5)


# -- the banded window path with every chapter-5 plugin ---------------------------------

@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 30), window=st.integers(1, 6), causal=st.booleans(),
       seed=st.integers(0, 1000))
def test_banded_path_equals_dense_with_rope_alibi_and_logn(length, window, causal, seed):
    torch.manual_seed(seed)
    attn = MultiHeadAttention(32, 4).eval()
    x = torch.randn(2, length, 32)
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, max(1, length - 4):] = False
    plugins = [RotaryEmbedding(8), ALiBi(4), SlidingWindowMask(window),
               LogNScaling(5, window=window, clamp=False)]
    positions = torch.arange(length)[None]
    ctx = context(positions, padding, causal)
    banded, _ = attn(x, ctx, plugins)
    assert (("block-context", window) in ctx.cache) == (length > 2 * window)
    attn.banded = False
    dense, _ = attn(x, context(positions, padding, causal), plugins)
    assert torch.allclose(banded[padding], dense[padding], atol=1e-5)


def test_model_with_a_window_gives_the_same_outputs_and_gradients_banded_or_dense():
    torch.manual_seed(0)
    config = tiny(position_embedding="none", rotary=True, alibi=True, attention_window=4,
                  logn_training_length=8, causal=True, norm_position="pre",
                  attention_dropout=0.0, hidden_dropout=0.0)
    model = CausalLM(config)
    ids = torch.randint(1, VOCAB, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    banded = model(ids, mask, labels=labels)
    banded.loss.backward()
    banded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in model.encoder.layers:
        layer.attention.banded = False
    dense = model(ids, mask, labels=labels)
    dense.loss.backward()
    assert torch.allclose(banded.loss, dense.loss, atol=1e-6)
    for got, expected in zip(banded_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(got, expected, atol=1e-5)


# -- position ids ---------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 4), length=st.integers(1, 40), extra=st.integers(0, 200),
       seed=st.integers(0, 2**31 - 1))
def test_random_positions_are_sorted_unique_and_in_range(batch, length, extra, seed):
    max_position = length + extra
    generator = torch.Generator().manual_seed(seed)
    positions = random_positions(batch, length, max_position, generator)
    assert positions.shape == (batch, length) and positions.dtype == torch.long
    assert torch.all(positions.diff(dim=-1) > 0)  # sorted and unique
    assert positions.min() >= 0 and positions.max() < max_position
    again = random_positions(batch, length, max_position, torch.Generator().manual_seed(seed))
    assert torch.equal(positions, again)


def test_random_positions_cover_the_range_uniformly():
    generator = torch.Generator().manual_seed(0)
    positions = random_positions(4000, 8, 64, generator)
    counts = torch.bincount(positions.flatten(), minlength=64).double()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


@settings(max_examples=50, deadline=None)
@given(length=st.integers(1, 300), extra=st.integers(0, 3000))
def test_evenly_spaced_positions_cover_the_range(length, extra):
    max_position = length + extra
    positions = evenly_spaced_positions(length, max_position)[0]
    assert positions.shape == (length,) and positions.dtype == torch.long
    assert positions[0] == 0 and torch.all(positions.diff() >= 1)
    stride = max_position / length
    assert positions[-1] <= max_position - 1 and positions[-1] >= max_position - 2 * stride
    fractional = evenly_spaced_positions(length, max_position, fractional=True)[0]
    assert torch.allclose(fractional, torch.arange(length) * stride, rtol=1e-6)
    assert torch.equal(positions, fractional.double().add(1e-6).floor().long())


def test_evenly_spaced_positions_are_sus_example():
    assert evenly_spaced_positions(512, 2048)[0, :3].tolist() == [0, 4, 8]
    assert evenly_spaced_positions(512, 2048)[0, -1].item() == 2044


def test_equal_mean_random_positions_are_evenly_spaced_with_exponential_span():
    generator = torch.Generator().manual_seed(0)
    positions = equal_mean_random_positions(20000, 16, generator=generator)
    assert positions.shape == (20000, 16) and positions.is_floating_point()
    assert torch.all(positions[:, 0] == 0)
    steps = positions.diff(dim=-1)
    assert torch.allclose(steps, steps[:, :1].expand_as(steps), rtol=1e-5, atol=1e-6)
    spans = positions[:, -1].double()
    assert spans.min() >= 0
    assert spans.mean().item() == pytest.approx(16, rel=0.03)  # Exp: mean 16 ...
    assert spans.std().item() == pytest.approx(16, rel=0.05)  # ... and sd 16
    custom = equal_mean_random_positions(20000, 16, mean_span=64.0, generator=generator)
    assert custom[:, -1].double().mean().item() == pytest.approx(64, rel=0.03)


def test_models_accept_random_and_evenly_spaced_positions():
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 10))
    learned = MaskedLM(tiny()).eval()  # 128 learned positions
    generator = torch.Generator().manual_seed(0)
    for positions in (random_positions(3, 10, 128, generator),
                      evenly_spaced_positions(10, 128)):
        assert learned(ids, position_ids=positions).logits.shape == (3, 10, VOCAB)
    rope = MaskedLM(tiny(position_embedding="none", rotary=True, logn_training_length=10))
    positions = equal_mean_random_positions(3, 10, generator=generator)
    assert torch.isfinite(rope.eval()(ids, position_ids=positions).logits).all()


# -- switching options on a trained model ------------------------------------------------

def test_set_position_options_changes_a_trained_model_and_back():
    torch.manual_seed(0)
    model = sharpen(MaskedLM(tiny(position_embedding="none", rotary=True)).eval())
    extra = model.encoder.add_attention_plugin(SlidingWindowMask(64))
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    ids = torch.randint(1, VOCAB, (2, 40))
    original = model(ids).logits

    config = set_position_options(model, rerope_window=8, logn_training_length=16,
                                  alibi=True)
    assert model.config is config and model.encoder.config is config
    assert model.encoder.embeddings.config is config
    kinds = [type(plugin).__name__ for plugin in model.encoder.position_plugins]
    assert kinds == ["ReRotaryEmbedding", "ALiBi", "LogNScaling"]
    assert list(model.encoder.attention_plugins) == [extra]
    assert not torch.allclose(model(ids).logits, original, atol=1e-4)

    set_position_options(model, rerope_window=None, logn_training_length=None, alibi=False)
    assert torch.equal(model(ids).logits, original)
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())


# -- bad inputs -------------------------------------------------------------------------

def test_bad_inputs_raise_errors_naming_the_parameter():
    cases = [
        (lambda: tiny(rotary_ntk_factor=0.5, rotary=True), "rotary_ntk_factor"),
        (lambda: tiny(rotary_ntk_factor=2.0), "rotary_ntk_factor modifies RoPE"),
        (lambda: tiny(hidden_size=4, num_heads=2, rotary=True, rotary_ntk_factor=2.0),
         "rotary_ntk_factor needs a head dimension"),
        (lambda: tiny(rerope_window=0, rotary=True), "rerope_window"),
        (lambda: tiny(rerope_window=4), "rerope_window modifies RoPE"),
        (lambda: tiny(logn_training_length=1), "logn_training_length"),
        (lambda: tiny(logn_training_length=True), "logn_training_length"),
        (lambda: tiny(alibi="yes"), "alibi"),
        (lambda: ntk_scaled_base(10000.0, 2.0, 2), "head_dim"),
        (lambda: ntk_scaled_base(10000.0, 0.5, 64), "factor"),
        (lambda: ntk_scaled_base(1.0, 2.0, 64), "base"),
        (lambda: ReRotaryEmbedding(16, 0), "window"),
        (lambda: alibi_slopes(0), "num_heads"),
        (lambda: LogNScaling(1), "training_length"),
        (lambda: LogNScaling(16, window=0), "window"),
        (lambda: random_positions(2, 10, 5), "max_position"),
        (lambda: random_positions(0, 10, 50), "batch"),
        (lambda: random_positions(2, 0, 50), "length"),
        (lambda: evenly_spaced_positions(10, 5), "max_position"),
        (lambda: equal_mean_random_positions(2, 10, mean_span=0.0), "mean_span"),
        (lambda: set_position_options(MaskedLM(tiny()), hidden_size=64), "hidden_size"),
        (lambda: set_position_options(MaskedLM(tiny()), alibi=3), "alibi"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    attn = MultiHeadAttention(32, 4)
    x, _ = padded_batch(5)
    with pytest.raises(ValueError, match="ALiBi was built for num_heads=2"):
        attn(x, context(torch.arange(5)[None]), [ALiBi(2)])


def test_encoder_with_every_option_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = MaskedLM(tiny(position_embedding="none", rotary=True, rerope_window=3,
                          rotary_ntk_factor=2.0, alibi=True, attention_window=5,
                          logn_training_length=6)).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(1, VOCAB, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        assert torch.allclose(compiled(ids, mask).logits, model(ids, mask).logits, atol=1e-5)
