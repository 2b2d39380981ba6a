r"""The attention core shared by every chapter, and its one extension point.

Scaled dot-product attention (Vaswani et al., 2017) for one head:

.. math::

    \mathrm{Attn}(Q, K, V) = \mathrm{normalise}\Big(s \cdot \frac{S(Q, K)}{\sqrt{d}} + B,\; M\Big)\, V

where :math:`S(Q, K) = QK^\top` by default, ``normalise`` is the softmax by default,
:math:`s` is a score scale (1 by default), :math:`B` an additive score bias (0 by
default) and :math:`M` the boolean "may attend" mask (padding, causal, window, ...).

The extension point
-------------------
Every later technique is an :class:`AttentionPlugin`: an ``nn.Module`` that
overrides any of seven hooks, called by :class:`MultiHeadAttention` in this order:

1. ``transform_qk(attn, q, k, ctx) -> (q, k)`` rotates or rescales queries and keys
   (RoPE, :mod:`tutorial_lib.core.positions`);
2. ``content_scores(attn, q, k, ctx) -> Tensor | None`` replaces the product
   :math:`S(Q, K) = QK^\top` (before :math:`1/\sqrt{d}`) by a plugin's own
   ``(batch, heads, query, key)`` matrix: ReRoPE combines two differently rotated
   products (:mod:`tutorial_lib.techniques.extrapolation`). At most one plugin may do so, and the
   core then takes the explicit path;
3. ``score_bias(attn, q, k, ctx) -> Tensor | None``, added to the scaled scores,
   broadcastable to ``(batch, heads, query, key)`` (relative positions, ALiBi,
   DeBERTa's c2p/p2c). The bias is *not* multiplied by the score scale: a plugin
   that wants its bias scaled scales it itself;
4. ``score_scale(attn, ctx) -> float | Tensor | None``, multiplies the content
   score :math:`S(Q, K)/\sqrt{d}`; a tensor must broadcast to
   ``(batch, heads, query, 1)`` (log-n scaling, DeBERTa's :math:`1/\sqrt{3}`);
5. ``mask(attn, ctx) -> BoolTensor | None``, True where a query may attend,
   broadcastable to ``(batch, heads, query, key)``; combined by logical AND with
   the padding and causal masks (sliding windows, masks computed by another module);
6. ``mask_band(attn, ctx) -> int | None``: a promise that this plugin's mask forbids
   every key whose sequence index is ``band`` or more away from the query's
   (:class:`SlidingWindowMask`). The core may then skip those keys altogether
   (the banded path below);
7. ``normalise(scores, allowed, ctx) -> probabilities | None`` replaces the
   softmax (relu²/n, l2-normalised attention). At most one plugin may do so.

Plugins are owned by the model (``Encoder.position_plugins`` for those built from
the config, ``Encoder.attention_plugins`` for those added by a chapter), not by
the layers, so one plugin serves every layer; ``ctx.layer_index`` tells a plugin
which layer is calling, and ``ctx.cache`` lets it reuse work across layers
within one forward pass. Parameters that belong to the model rather than to a
plugin reach it through the context (``ctx.relative_embeddings``, DeBERTa's
relative table, held by the encoder).

Three paths, one result
-----------------------
* **Fused**: when no plugin replaces the scores or the normaliser and no attention
  weights are requested, the core calls
  ``torch.nn.functional.scaled_dot_product_attention`` with the bias and mask folded
  into one additive mask.
* **Banded** (linear in the length): when, in addition, a plugin declares a band
  ``w`` (``mask_band``), queries and keys have the same length, that length exceeds
  ``2w``, and every plugin that contributes a bias or a mask is ``blockwise``, the
  core cuts the queries into blocks of ``w`` and lets block ``c`` attend only to the
  keys of blocks ``c-1, c, c+1`` (``c-1, c`` when causal), which contain every key
  the band allows. Time and memory then grow as ``n·w``, not ``n²``. ``transform_qk``
  and ``score_scale`` are called once on the whole sequence (they are per position);
  ``score_bias`` and ``mask`` are called with a *block context*: an
  :class:`AttentionContext` whose batch is ``batch × blocks`` and whose query and key
  positions and padding are those of one block and its neighbourhood (keys outside
  the sequence are marked as padding). A plugin that computes its bias and mask from
  ``q``, ``k`` and the context works unchanged and says so with ``blockwise = True``;
  the default is False, so a plugin holding, say, a table for a fixed length keeps
  the dense path. The result equals the dense one at every query that sees at least
  one key (rows of padded queries with no visible key, which nothing reads, differ).
* **Explicit**: otherwise the core computes the same quantity as matrices, which
  is also how it returns attention weights.

Tests pin the three paths to each other and to a float64 reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionContext:
    """What a plugin may need to know about the current forward pass."""

    query_positions: torch.Tensor  # (batch or 1, query) position of each query
    key_positions: torch.Tensor  # (batch or 1, key)
    key_padding_mask: torch.Tensor | None  # (batch, key) bool, True = real token
    causal: bool
    layer_index: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    # A table of relative-position embeddings shared by all layers, (rows, hidden),
    # set by the model that owns it (DeBERTa's encoder-level table).
    relative_embeddings: torch.Tensor | None = None


class AttentionPlugin(nn.Module):
    """Base class of every attention modification. Override only what you need.

    ``blockwise = True`` declares that ``score_bias`` and ``mask`` compute their
    result from ``q``, ``k`` and the context alone, so the core may call them on
    block contexts (the banded path, see the module docstring).
    """

    blockwise: bool = False

    def transform_qk(self, attn: "MultiHeadAttention", q: torch.Tensor, k: torch.Tensor,
                     ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def score_bias(self, attn: "MultiHeadAttention", q: torch.Tensor, k: torch.Tensor,
                   ctx: AttentionContext) -> torch.Tensor | None:
        return None

    def score_scale(self, attn: "MultiHeadAttention",
                    ctx: AttentionContext) -> float | torch.Tensor | None:
        return None

    def mask(self, attn: "MultiHeadAttention", ctx: AttentionContext) -> torch.Tensor | None:
        return None

    def prepare(self, encoder: nn.Module, ctx: AttentionContext) -> None:
        """Called by the encoder once per forward, before the first layer: the place to
        compute what every layer shares and keep it on ``ctx`` (DeBERTa's relative table)."""

    def mask_band(self, attn: "MultiHeadAttention", ctx: AttentionContext) -> int | None:
        return None

    # A plugin replaces q·kᵀ or the softmax by overriding these methods; the core
    # detects the override, so the base class deliberately has no implementation.
    content_scores: Callable[..., torch.Tensor] | None = None
    normalise: Callable[..., torch.Tensor] | None = None


def softmax_normalise(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys; disallowed keys get the most negative finite value.

    A finite fill (not -inf) keeps rows with no allowed key finite (uniform), as the
    fused kernel does with the same additive mask.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def _overrides(plugin: AttentionPlugin, hook: str) -> bool:
    """Whether ``plugin``'s class replaces the base class's ``hook``."""
    return getattr(type(plugin), hook, None) is not getattr(AttentionPlugin, hook)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (or attention to ``key_value_states``) with plugins.

    ``banded`` (default True) lets the core use the banded path when a plugin
    offers a band; set it to False to force the dense path (to compare the two).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.output = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = dropout
        self.banded = True

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext,
                plugins: tuple[AttentionPlugin, ...] | list[AttentionPlugin] = (),
                key_value_states: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(output, weights)``; ``weights`` is None unless ``need_weights``.

        ``hidden_states``: (batch, query, hidden). ``key_value_states`` (batch, key,
        hidden) defaults to ``hidden_states``: passing it separately lets a query
        stream attend to another stream (DeBERTa's enhanced mask decoder).
        """
        source = hidden_states if key_value_states is None else key_value_states
        q = self.split_heads(self.query(hidden_states))  # (batch, heads, query, head_dim)
        k = self.split_heads(self.key(source))  # (batch, heads, key, head_dim)
        v = self.split_heads(self.value(source))

        for plugin in plugins:
            q, k = plugin.transform_qk(self, q, k, ctx)

        content_scores = _the_one_override(plugins, "content_scores")
        normaliser = _the_one_override(plugins, "normalise")
        dropout = self.dropout if self.training else 0.0
        weights = None
        fused = content_scores is None and normaliser is None and not need_weights
        band = self._band(q, k, ctx, plugins) if fused and self.banded else None

        if band is not None:
            context = self._banded(q, k, v, ctx, plugins, band, dropout)
        elif fused:
            scale = _collect_scale(self, ctx, plugins)
            # No local name for the bias: _fused folds it into the mask and drops it.
            context = self._fused(q, k, v, ctx, scale,
                                  *_collect_bias_and_mask(self, q, k, ctx, plugins), dropout)
        else:
            scale = _collect_scale(self, ctx, plugins)
            bias, allowed = _collect_bias_and_mask(self, q, k, ctx, plugins)
            if content_scores is None:
                scores = torch.matmul(q, k.transpose(-1, -2))
            else:
                scores = content_scores(self, q, k, ctx)
            scores = scores / math.sqrt(self.head_dim) * scale  # (batch, heads, query, key)
            if bias is not None:
                scores = scores + bias
            if ctx.causal:
                allowed = _and(allowed, _causal_mask(ctx, scores.device))
            if normaliser is None:
                weights = softmax_normalise(scores, allowed)
            else:
                weights = normaliser(scores, allowed, ctx)
            context = torch.matmul(F.dropout(weights, dropout), v)

        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, -1)  # (batch, query, hidden)
        return self.output(context), weights

    def _fused(self, q, k, v, ctx, scale, bias, allowed, dropout):
        base_scale = 1.0 / math.sqrt(self.head_dim)
        if torch.is_tensor(scale):
            # A per-query scale multiplies q; the fused kernel then applies 1/sqrt(d).
            q = q * scale.to(q.dtype)
            scale = 1.0
        is_causal = ctx.causal and bias is None and allowed is None \
            and q.shape[-2] == k.shape[-2]
        if ctx.causal and not is_causal:
            allowed = _and(allowed, _causal_mask(ctx, q.device))
        attn_mask = None
        if allowed is not None:  # in the masks' own (broadcast) shape, often (batch, 1, 1, key)
            attn_mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device) \
                .masked_fill(~allowed, torch.finfo(q.dtype).min)
        if bias is not None:
            # Added, not selected with torch.where: the bias's gradient then passes
            # through unchanged instead of costing a (batch, heads, query, key) pass.
            # A finite bias plus the most negative value stays the most negative value.
            bias = bias.to(q.dtype)
            attn_mask = bias if attn_mask is None else bias + attn_mask
        del bias  # the mask includes it: one (batch, heads, query, key) tensor alive, not two
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
            scale=base_scale * scale)

    # -- the banded path ---------------------------------------------------------------
    def _band(self, q, k, ctx, plugins) -> int | None:
        """The band the banded path may use, or None when it must not (or need not)."""
        length = q.shape[-2]
        if length != k.shape[-2]:
            return None
        bands = [band for band in (plugin.mask_band(self, ctx) for plugin in plugins)
                 if band is not None]
        if not bands or length <= 2 * min(bands):
            return None
        for plugin in plugins:
            if not plugin.blockwise and (_overrides(plugin, "score_bias")
                                         or _overrides(plugin, "mask")):
                return None
        return min(bands)

    def _banded(self, q, k, v, ctx, plugins, band, dropout):
        """Attention restricted to a band of ``band`` indices, block by block.

        Queries in blocks of ``band``; block ``c`` sees the keys of blocks ``c-1, c,
        c+1`` (causal: ``c-1, c``), a superset of what the band allows. Every tensor
        below is ``batch × blocks`` rows of one block: memory ``O(n · band)``.
        """
        batch, heads, length, _ = q.shape
        block_ctx, layout = _block_context(ctx, batch, length, band)
        blocks, padded, before, after, span = layout

        def query_blocks(x):  # (batch, heads, length, d) -> (batch*blocks, heads, band, d)
            x = F.pad(x, (0, 0, 0, padded - length))
            x = x.view(batch, x.shape[1], blocks, band, x.shape[-1]).transpose(1, 2)
            return x.reshape(batch * blocks, -1, band, x.shape[-1])

        def key_blocks(x):  # (batch, heads, length, d) -> (batch*blocks, heads, span, d)
            x = F.pad(x, (0, 0, before, padded - length + after))
            x = x.unfold(2, span, band)  # (batch, heads, blocks, d, span)
            return x.permute(0, 2, 1, 4, 3).reshape(batch * blocks, heads, span, x.shape[3])

        scale = _collect_scale(self, ctx, plugins)  # per query: computed on the whole sequence
        if torch.is_tensor(scale):
            scale_heads = scale.shape[-3] if scale.dim() >= 3 else 1
            scale = query_blocks(torch.broadcast_to(scale, (batch, scale_heads, length, 1)))
        q_blocks, k_blocks, v_blocks = query_blocks(q), key_blocks(k), key_blocks(v)
        block_ctx.layer_index = ctx.layer_index
        bias, allowed = _collect_bias_and_mask(self, q_blocks, k_blocks, block_ctx, plugins)
        # In a causal block the queries are the last `band` of the `2·band` keys, which
        # is the core's causal rule: _fused applies it as it does for a whole sequence.
        context = self._fused(q_blocks, k_blocks, v_blocks, block_ctx, scale, bias, allowed,
                              dropout)  # (batch*blocks, heads, band, d)
        context = context.view(batch, blocks, heads, band, -1).transpose(1, 2)
        return context.reshape(batch, heads, padded, -1)[:, :, :length]


def _block_context(ctx: AttentionContext, batch: int, length: int, band: int):
    """The context of the banded path's blocks (cached: every layer uses the same)."""
    key = ("block-context", band)
    if key not in ctx.cache:
        blocks = -(-length // band)
        padded = blocks * band
        before, after = band, (0 if ctx.causal else band)
        span = before + band + after

        def query_rows(x):  # (batch or 1, length) -> (batch*blocks, band)
            x = F.pad(x.expand(batch, length), (0, padded - length))
            return x.reshape(batch * blocks, band)

        def key_rows(x):  # (batch or 1, length) -> (batch*blocks, span)
            x = F.pad(x.expand(batch, length), (before, padded - length + after))
            return x.unfold(1, span, band).reshape(batch * blocks, span)

        real = ctx.key_padding_mask
        if real is None:
            real = torch.ones(1, length, dtype=torch.bool, device=ctx.key_positions.device)
        block_ctx = AttentionContext(
            query_positions=query_rows(ctx.query_positions),
            key_positions=key_rows(ctx.key_positions),
            key_padding_mask=key_rows(real),  # keys beyond either end count as padding
            causal=ctx.causal, layer_index=ctx.layer_index)
        ctx.cache[key] = block_ctx, (blocks, padded, before, after, span)
    return ctx.cache[key]


def _the_one_override(plugins, hook: str):
    """The bound ``hook`` of the one plugin that overrides it, or None; two is an error."""
    found = None
    for plugin in plugins:
        if _overrides(plugin, hook):
            if found is not None:
                raise ValueError(f"two attention plugins replace {hook}; at most one may")
            found = getattr(plugin, hook)
    return found


def _collect_scale(attn, ctx, plugins) -> float | torch.Tensor:
    """The product of the plugins' score scales."""
    scale: float | torch.Tensor = 1.0
    for plugin in plugins:
        plugin_scale = plugin.score_scale(attn, ctx)
        if plugin_scale is not None:
            if torch.is_tensor(plugin_scale) and plugin_scale.dim() == 4 \
                    and plugin_scale.shape[-1] != 1:
                raise ValueError(f"{type(plugin).__name__}.score_scale must broadcast to "
                                 f"(batch, heads, query, 1), got {tuple(plugin_scale.shape)}")
            scale = scale * plugin_scale
    return scale


def _collect_bias_and_mask(attn, q, k, ctx, plugins):
    """The sum of the plugins' biases and the AND of padding and the plugins' masks."""
    bias = None
    allowed = None
    if ctx.key_padding_mask is not None:
        allowed = ctx.key_padding_mask[:, None, None, :]  # (batch, 1, 1, key)
    for plugin in plugins:
        plugin_bias = plugin.score_bias(attn, q, k, ctx)
        if plugin_bias is not None:
            bias = plugin_bias if bias is None else bias + plugin_bias
        plugin_mask = plugin.mask(attn, ctx)
        if plugin_mask is not None:
            if plugin_mask.dtype != torch.bool:
                raise TypeError(f"{type(plugin).__name__}.mask must return a bool tensor, "
                                f"got {plugin_mask.dtype}")
            allowed = _and(allowed, plugin_mask)
    return bias, allowed


def _and(mask: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    return other if mask is None else mask & other


def _causal_mask(ctx: AttentionContext, device: torch.device) -> torch.Tensor:
    """True where the key is not in the query's future, by sequence index."""
    query_len = ctx.query_positions.shape[-1]
    key_len = ctx.key_positions.shape[-1]
    # Queries are the last query_len positions of the key sequence (equal when no cache).
    offset = key_len - query_len
    query_index = torch.arange(query_len, device=device)[:, None] + offset
    key_index = torch.arange(key_len, device=device)[None, :]
    return key_index <= query_index  # (query, key), broadcasts over batch and heads
