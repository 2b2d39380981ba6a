r"""Length extrapolation (chapter 5): running a model on sequences longer than it saw.

Every technique here is either a function that makes position ids or an
attention plugin (:mod:`tutorial_lib.core.attention`); each one can be switched on
through :class:`~tutorial_lib.core.config.TransformerConfig`, also at inference on a
model trained without it (:func:`tutorial_lib.core.model.set_position_options`).

**NTK-aware RoPE** (bloc97, 2023; Su, kexue.fm/archives/9675). RoPE rotates
channel pair :math:`i` by :math:`p\,b^{-2i/d}`. To run at :math:`k` times the
training length, replace the base by

.. math:: b' = b\,k^{d/(d-2)},

which leaves the fastest frequency (:math:`i = 0`) alone, extrapolating it, and
divides the slowest (:math:`i = d/2 - 1`) by exactly :math:`k`, interpolating it
(:func:`ntk_scaled_base`; config ``rotary_ntk_factor``).

**ReRoPE** (Su, 2023, kexue.fm/archives/9708; code ``bojone/rerope``). Attention
sees the relative position clipped to a window :math:`w`:

.. math:: s_{ij} = \big(R_{\min(i-j,\,w)}\,q_i\big)^\top k_j
          \quad\text{(causal)},\qquad
          \min(i-j, w) \to \mathrm{clamp}(i-j, -w, w) \quad\text{(bidirectional)},

so inside the window the scores are RoPE's and outside they are those at distance
:math:`w`, and no relative position larger than :math:`w` ever occurs. Su computes
it as two score matrices: ordinary RoPE, and :math:`q` rotated by :math:`w` against
unrotated :math:`k`, picked per entry by the mask :math:`i - j > w`. For a
bidirectional encoder we add the mirror image, :math:`q` unrotated against
:math:`k` rotated by :math:`w`, for :math:`i - j < -w` (:class:`ReRotaryEmbedding`,
through the core's ``content_scores`` hook; config ``rerope_window``). Positions
are the context's, so fractional positions work.

**ALiBi** (Press, Smith and Lewis, ICLR 2022, code
``ofirpress/attention_with_linear_biases``). No position embedding; every head
adds a linear penalty to its scores,

.. math:: B_{hij} = -m_h\,|i - j| \quad\text{(bidirectional, our choice)},\qquad
          B_{hij} = m_h\,(j - i) = -m_h\,(i - j) \quad\text{(causal)},

with slopes :math:`m_h = 2^{-8h/H}`, :math:`h = 1..H`, for :math:`H` a power of two,
and otherwise, as in the released code, the slopes of the largest power of two
:math:`P < H` followed by every other slope of :math:`2P` (:func:`alibi_slopes`).
The released causal code adds :math:`m_h\,j`, which differs from :math:`m_h(j-i)` by a
constant per row; the softmax cannot tell them apart (:class:`ALiBi`; config ``alibi``).

**Entropy-invariant (log-n) scaling** (Su, 2021, kexue.fm/archives/8823). Multiply
the logits by :math:`\log_m n`, with :math:`m` the training length and :math:`n` the
number of keys the query sees, so that the attention's entropy changes slowly
with length; the factor is 1 at :math:`n = m`. We count :math:`n` for each query as
the keys its mask allows: the real (unpadded) keys for an encoder; those at or
before it for a causal model (:math:`i + 1` without padding); within a window,
only those inside it (causal: :math:`\min(i+1, w)`; bidirectional: up to
:math:`2w - 1`, fewer at the edges). Below the training length Su uses
:math:`\max(1, \log_m n)` (kexue.fm/archives/9708, and ``clip(1)`` in his ReRoPE
code), so short sequences are never softened; we do the same by default
(``clamp=True``) and offer the plain :math:`\log_m n` (:class:`LogNScaling`;
config ``logn_training_length``).

**Random positions** (Ruoss et al., ACL 2023, code
``google-deepmind/randomized_positional_encodings``): train on :math:`N` sorted
positions drawn without replacement from :math:`[0, L)`, :math:`L \gg N`
(:func:`random_positions`); Su (post 8, kexue.fm/archives/9444) predicts with evenly
spaced positions, e.g. :math:`0, 4, 8, \dots, 2044` for 512 tokens and :math:`L = 2048`
(:func:`evenly_spaced_positions`), and proposes "equal-mean" random positions:
draw a span :math:`n` with mean :math:`N` (exponential) and use :math:`N` evenly
spaced points of :math:`[0, n]`, fractional, so for functional encodings only
(:func:`equal_mean_random_positions`). All of them feed the models'
``position_ids`` argument.
"""

from __future__ import annotations

import math

import torch

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin
from tutorial_lib.core.config import is_number
from tutorial_lib.core.positions import RotaryEmbedding

# -- NTK-aware RoPE --------------------------------------------------------------------


def ntk_scaled_base(base: float, factor: float, head_dim: int) -> float:
    """The RoPE base for running at ``factor`` times the training length: ``base·k^(d/(d-2))``."""
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 4 \
            or head_dim % 2:
        raise ValueError(f"head_dim must be an even integer >= 4 for NTK scaling, got {head_dim!r}")
    if not factor >= 1.0:
        raise ValueError(f"factor must be >= 1 (target length / training length), got {factor!r}")
    if not base > 1.0:
        raise ValueError(f"base must be > 1, got {base!r}")
    return float(base) * float(factor) ** (head_dim / (head_dim - 2))


# -- ReRoPE ----------------------------------------------------------------------------


class ReRotaryEmbedding(RotaryEmbedding):
    """ReRoPE: RoPE whose relative position is clipped to ``[-window, window]``.

    Causal: ``min(i - j, window)`` (Su's definition; future keys keep RoPE's scores and
    are masked anyway). Bidirectional: ``clamp(i - j, -window, window)``. Positions are
    ``ctx``'s, ``window`` is in the same units. The plugin rotates nothing in
    ``transform_qk``: it builds the whole score matrix in ``content_scores``. Cost: two
    (causal) or three (bidirectional) ``q·kᵀ`` products, and the explicit path.
    """

    def __init__(self, head_dim: int, window: int, base: float = 10000.0,
                 pairing: str = "half"):
        super().__init__(head_dim, base=base, pairing=pairing)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = window

    def transform_qk(self, attn, q, k, ctx):
        return q, k

    def content_scores(self, attn, q: torch.Tensor, k: torch.Tensor,
                       ctx: AttentionContext) -> torch.Tensor:
        (q_cos, q_sin), (k_cos, k_sin) = self.query_key_angles(ctx)
        near = self.rotate(q, q_cos, q_sin) @ self.rotate(k, k_cos, k_sin).transpose(-1, -2)
        w_cos, w_sin = self.cos_sin(torch.full((1, 1), float(self.window), device=q.device))
        # q rotated by w against an unrotated k: relative position +w.
        far_past = self.rotate(q, w_cos, w_sin) @ k.transpose(-1, -2)
        past, future = self._beyond_window(ctx)
        scores = torch.where(past, far_past, near)  # (batch, heads, query, key)
        if future is not None:
            # The mirror image, relative position -w: q unrotated, k rotated by w.
            far_future = q @ self.rotate(k, w_cos, w_sin).transpose(-1, -2)
            scores = torch.where(future, far_future, scores)
        return scores

    def _beyond_window(self, ctx):
        """Masks (batch or 1, 1, query, key) of ``i - j > w`` and (bidirectional) ``< -w``."""
        key = ("rerope-regions", id(self))
        if key not in ctx.cache:
            relative = ctx.query_positions[:, :, None] - ctx.key_positions[:, None, :]
            relative = relative[:, None]  # (batch or 1, 1, query, key), i - j
            future = None if ctx.causal else relative < -self.window
            ctx.cache[key] = (relative > self.window, future)
        return ctx.cache[key]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"


# -- ALiBi -----------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (float32, shape (num_heads,)), as in the released code.

    For a power of two ``H``: ``2^(-8h/H)``, ``h = 1..H`` (8 heads: 1/2, 1/4, ..., 1/256).
    Otherwise: the slopes of ``P = 2^floor(log2 H)`` heads, then the slopes of ``2P``
    heads with odd ``h`` (every other one), as many as needed.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
    power = 1 << (num_heads.bit_length() - 1)  # the largest power of two <= num_heads
    slopes = [2.0 ** (-8.0 * h / power) for h in range(1, power + 1)]
    slopes += [2.0 ** (-8.0 * h / (2 * power)) for h in range(1, 2 * (num_heads - power), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(AttentionPlugin):
    """Attention with linear biases: ``-slope_h·|i - j|`` (bidirectional), ``-slope_h·(i - j)``
    (causal), from the context's positions, one slope per head (:func:`alibi_slopes`)."""

    blockwise = True

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def score_bias(self, attn, q, k, ctx: AttentionContext) -> torch.Tensor:
        if attn.num_heads != self.slopes.numel():
            raise ValueError(f"ALiBi was built for num_heads={self.slopes.numel()} but the "
                             f"attention has {attn.num_heads} heads")
        key = ("alibi", id(self))
        if key not in ctx.cache:
            relative = ctx.query_positions[:, :, None] - ctx.key_positions[:, None, :]
            distance = relative.float() if ctx.causal else relative.float().abs()  # (batch, q, k)
            slopes = self.slopes.to(distance.device)[None, :, None, None]
            ctx.cache[key] = -slopes * distance[:, None]  # (batch or 1, heads, query, key)
        return ctx.cache[key]

    def extra_repr(self) -> str:
        return f"num_heads={self.slopes.numel()}"


# -- log-n scaling ---------------------------------------------------------------------


class LogNScaling(AttentionPlugin):
    """Entropy-invariant scaling: logits times ``log(n) / log(training_length)``.

    ``n`` is, for each query, the number of keys it may attend to, counted by sequence
    index: real keys only; causal: at or before the query; with ``window``: inside the
    window as :class:`~tutorial_lib.core.attention.SlidingWindowMask` draws it for the
    default positions. With ``clamp`` (the default, as in Su's released code) the factor
    is ``max(1, log_m n)``, so sequences shorter than the training length are left as
    they are; without it, they are softened (factor < 1, and 0 for a single key).
    """

    def __init__(self, training_length: int, window: int | None = None, clamp: bool = True):
        super().__init__()
        if not isinstance(training_length, int) or isinstance(training_length, bool) \
                or training_length < 2:
            raise ValueError(f"training_length must be an integer >= 2, got {training_length!r}")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                                   or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        self.training_length = training_length
        self.window = window
        self.clamp = clamp

    def visible_keys(self, ctx: AttentionContext) -> torch.Tensor:
        """(batch or 1, query) number of keys each query may attend to."""
        query_len = ctx.query_positions.shape[-1]
        key_len = ctx.key_positions.shape[-1]
        device = ctx.key_positions.device
        if ctx.key_padding_mask is None:
            real = torch.ones(1, key_len, dtype=torch.long, device=device)
        else:
            real = ctx.key_padding_mask.long()
        before = torch.nn.functional.pad(real.cumsum(-1), (1, 0))  # real keys in [0, j)
        # Queries are the last query_len keys, as in the core's causal mask.
        index = torch.arange(query_len, device=device) + (key_len - query_len)
        first = torch.zeros_like(index)
        end = (index + 1) if ctx.causal else torch.full_like(index, key_len)  # exclusive
        if self.window is not None:
            first = (index - self.window + 1).clamp(min=0)
            end = torch.minimum(end, (index + self.window).clamp(max=key_len))
        first = first.expand(before.shape[0], -1)
        end = end.expand(before.shape[0], -1)
        return before.gather(-1, end) - before.gather(-1, first)

    def score_scale(self, attn, ctx: AttentionContext) -> torch.Tensor:
        key = ("log-n", id(self))
        if key not in ctx.cache:
            visible = self.visible_keys(ctx).clamp(min=1).to(torch.float32)
            scale = visible.log() / math.log(self.training_length)
            if self.clamp:
                scale = scale.clamp(min=1.0)
            ctx.cache[key] = scale[:, None, :, None]  # (batch or 1, 1, query, 1)
        return ctx.cache[key]

    def extra_repr(self) -> str:
        return (f"training_length={self.training_length}, window={self.window}, "
                f"clamp={self.clamp}")


# -- position ids ----------------------------------------------------------------------


def _check_count(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def random_positions(batch: int, length: int, max_position: int,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, length) long: each row ``length`` distinct positions of ``[0, max_position)``,
    drawn uniformly without replacement and sorted (Ruoss et al., 2023)."""
    _check_count("batch", batch)
    _check_count("length", length)
    _check_count("max_position", max_position)
    if length > max_position:
        raise ValueError(f"max_position ({max_position}) must be >= length ({length}) to draw "
                         f"distinct positions")
    keys = torch.rand(batch, max_position, generator=generator, device=device)
    # The positions of the `length` largest of i.i.d. uniforms: a uniform random subset.
    return keys.topk(length, dim=-1).indices.sort(dim=-1).values


def evenly_spaced_positions(length: int, max_position: int,
                            fractional: bool = False) -> torch.Tensor:
    """(1, length): positions ``t · max_position / length`` (Su's evaluation positions).

    Integer (floored, so distinct and needing ``length <= max_position``) unless
    ``fractional``. The first is 0 and the last ``max_position - max_position/length``.
    """
    _check_count("length", length)
    _check_count("max_position", max_position)
    steps = torch.arange(length)
    if fractional:
        return (steps.double() * max_position / length).float()[None]
    if length > max_position:
        raise ValueError(f"max_position ({max_position}) must be >= length ({length}) for "
                         f"distinct integer positions (or pass fractional=True)")
    return (steps * max_position // length)[None]


def equal_mean_random_positions(batch: int, length: int, mean_span: float | None = None,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, length) float: Su's "equal-mean" random positions.

    Each row draws a span ``n`` from an exponential distribution with mean ``mean_span``
    (default ``length``) and places ``length`` evenly spaced points on ``[0, n]``.
    Fractional, so only for functional encodings (sinusoidal, RoPE, ALiBi).
    """
    _check_count("batch", batch)
    _check_count("length", length)
    if mean_span is None:
        mean_span = float(length)
    if not mean_span > 0:
        raise ValueError(f"mean_span must be > 0, got {mean_span!r}")
    uniform = torch.rand(batch, 1, generator=generator, dtype=torch.float64)
    span = -mean_span * torch.log1p(-uniform)  # inverse CDF of Exp(mean = mean_span)
    fraction = torch.linspace(0, 1, length, dtype=torch.float64)[None]
    return (fraction * span).float()


class SlidingWindowMask(AttentionPlugin):
    """Local attention: query ``i`` sees key ``j`` only if ``|pos_i - pos_j| < window``.

    With a causal model this keeps the ``window`` most recent keys, the query's own
    position included.

    The window is measured in positions. Whenever queries and keys share their
    positions and consecutive positions differ by at least 1 (the default
    ``0, 1, 2, ...``, or sorted random positions), every key the window allows is
    also fewer than ``window`` sequence indices away, so the plugin offers the core
    that band (``mask_band``) and the core computes windowed attention in time and
    memory linear in the length. The check reads the positions back to the host
    once per forward pass; under ``torch.compile`` it is skipped and the dense
    (quadratic) path is used.
    """

    blockwise = True

    def __init__(self, window: int):
        super().__init__()
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = window

    def mask(self, attn, ctx):
        distance = ctx.query_positions[:, :, None] - ctx.key_positions[:, None, :]
        return (distance.abs() < self.window)[:, None]  # (batch, 1, query, key)

    def mask_band(self, attn, ctx):
        if torch.compiler.is_compiling():
            return None
        key = "positions-step-at-least-one"
        if key not in ctx.cache:
            ctx.cache[key] = _positions_step_at_least_one(ctx)
        return self.window if ctx.cache[key] else None

    def extra_repr(self) -> str:
        return f"window={self.window}"


def _positions_step_at_least_one(ctx: AttentionContext) -> bool:
    """True if queries and keys share positions that grow by >= 1 from index to index."""
    query, key = ctx.query_positions, ctx.key_positions
    if query is not key and (query.shape != key.shape or not torch.equal(query, key)):
        return False
    return bool((key.diff(dim=-1) >= 1).all())


def check_config(config) -> None:
    """The config checks of the options this module owns (registered with the core by
    :mod:`tutorial_lib.assembly`): windows, ReRoPE, log-n scaling, NTK scaling, ALiBi."""
    for name, minimum in (("attention_window", 1), ("rerope_window", 1),
                          ("logn_training_length", 2)):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < minimum):
            raise ValueError(f"{name} must be None or an integer >= {minimum}, "
                             f"got {value!r}")
    factor = config.rotary_ntk_factor
    if not is_number(factor) or not factor >= 1:
        raise ValueError(f"rotary_ntk_factor must be a number >= 1 (1 = off), got {factor!r}")
    for name, active in (("rotary_ntk_factor", factor != 1),
                         ("rerope_window", config.rerope_window is not None)):
        if active and not config.rotary:
            raise ValueError(f"{name} modifies RoPE and needs rotary=True")
    if factor != 1 and config.head_dim < 4:
        raise ValueError(f"rotary_ntk_factor needs a head dimension >= 4, got hidden_size/"
                         f"num_heads = {config.head_dim}")
    if not isinstance(config.alibi, bool):
        raise ValueError(f"alibi must be True or False, got {config.alibi!r}")
