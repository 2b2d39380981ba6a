r"""The attention core shared by every chapter, and its one extension point.

Scaled dot-product attention (Vaswani et al., 2017) for one head:

.. math::

    \mathrm{Attn}(Q, K, V) = \mathrm{normalise}\Big(s \cdot \frac{QK^\top}{\sqrt{d}} + B,\; M\Big)\, V

where ``normalise`` is the softmax by default, :math:`s` is a score scale
(1 by default), :math:`B` an additive score bias (0 by default) and :math:`M`
the boolean "may attend" mask (padding, causal, window, ...).

The extension point
-------------------
Every later technique is an :class:`AttentionPlugin`: an ``nn.Module`` that
overrides any of five hooks, called by :class:`MultiHeadAttention` in this order:

1. ``transform_qk(attn, q, k, ctx) -> (q, k)`` rotates or rescales queries and keys
   (RoPE, :mod:`tutorial_lib.positions`);
2. ``score_bias(attn, q, k, ctx) -> Tensor | None``, added to the scaled scores,
   broadcastable to ``(batch, heads, query, key)`` (relative positions, ALiBi,
   DeBERTa's c2p/p2c). The bias is *not* multiplied by the score scale: a plugin
   that wants its bias scaled scales it itself;
3. ``score_scale(attn, ctx) -> float | Tensor | None``, multiplies the content
   score :math:`QK^\top/\sqrt{d}`; a tensor must broadcast to
   ``(batch, heads, query, 1)`` (log-n scaling, DeBERTa's :math:`1/\sqrt{3}`);
4. ``mask(attn, ctx) -> BoolTensor | None``, True where a query may attend,
   broadcastable to ``(batch, heads, query, key)``; combined by logical AND with
   the padding and causal masks (sliding windows, masks computed by another module);
5. ``normalise(scores, allowed, ctx) -> probabilities | None`` replaces the
   softmax (relu²/n, l2-normalised attention). At most one plugin may do so.

Plugins are owned by the model (``Encoder.attention_plugins``), not by the
layers, so one plugin serves every layer; ``ctx.layer_index`` tells a plugin
which layer is calling, and ``ctx.cache`` lets it reuse work across layers
within one forward pass. Parameters that belong to the model rather than to a
plugin reach it through the context (``ctx.relative_embeddings``, DeBERTa's
relative table, held by the encoder).

When no plugin replaces the normaliser and no attention weights are requested,
the core calls ``torch.nn.functional.scaled_dot_product_attention`` (the fused
fast path); otherwise it computes the same quantity explicitly. A test pins
the two paths to each other.
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
    """Base class of every attention modification. Override only what you need."""

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

    # A plugin replaces the softmax by overriding this method; the core detects the
    # override, so the base class deliberately has no implementation to call.
    normalise: Callable[..., torch.Tensor] | None = None


class SlidingWindowMask(AttentionPlugin):
    """Local attention: query ``i`` sees key ``j`` only if ``|pos_i - pos_j| < window``.

    With a causal model this keeps the ``window`` most recent keys, the query's own
    position included.
    """

    def __init__(self, window: int):
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.window = window

    def mask(self, attn, ctx):
        distance = ctx.query_positions[:, :, None] - ctx.key_positions[:, None, :]
        return (distance.abs() < self.window)[:, None]  # (batch, 1, query, key)

    def extra_repr(self) -> str:
        return f"window={self.window}"


def softmax_normalise(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys; disallowed keys get the most negative finite value.

    A finite fill (not -inf) keeps rows with no allowed key finite (uniform), as the
    fused kernel does with the same additive mask.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def _overrides_normalise(plugin: AttentionPlugin) -> bool:
    return getattr(type(plugin), "normalise", None) is not None


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (or attention to ``key_value_states``) with plugins."""

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

        scale, bias, allowed, normaliser = self._collect(q, k, ctx, plugins)
        dropout = self.dropout if self.training else 0.0

        if normaliser is None and not need_weights:
            attn_mask, is_causal = self._additive_mask(q, k, ctx, bias, allowed)
            del bias  # the mask includes it: one (batch, heads, query, key) tensor alive, not two
            context = self._fused(q, k, v, scale, attn_mask, is_causal, dropout)
            weights = None
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores * scale  # (batch, heads, query, key)
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

    def _collect(self, q, k, ctx, plugins):
        """Combine the plugins' scales, biases, masks and (at most one) normaliser."""
        scale: float | torch.Tensor = 1.0
        bias = None
        allowed = None
        normaliser = None
        if ctx.key_padding_mask is not None:
            allowed = ctx.key_padding_mask[:, None, None, :]  # (batch, 1, 1, key)
        for plugin in plugins:
            plugin_scale = plugin.score_scale(self, ctx)
            if plugin_scale is not None:
                if torch.is_tensor(plugin_scale) and plugin_scale.dim() == 4 \
                        and plugin_scale.shape[-1] != 1:
                    raise ValueError(f"{type(plugin).__name__}.score_scale must broadcast to "
                                     f"(batch, heads, query, 1), got {tuple(plugin_scale.shape)}")
                scale = scale * plugin_scale
            plugin_bias = plugin.score_bias(self, q, k, ctx)
            if plugin_bias is not None:
                bias = plugin_bias if bias is None else bias + plugin_bias
            plugin_mask = plugin.mask(self, ctx)
            if plugin_mask is not None:
                if plugin_mask.dtype != torch.bool:
                    raise TypeError(f"{type(plugin).__name__}.mask must return a bool tensor, "
                                    f"got {plugin_mask.dtype}")
                allowed = _and(allowed, plugin_mask)
            if _overrides_normalise(plugin):
                if normaliser is not None:
                    raise ValueError("two attention plugins replace the normaliser; "
                                     "at most one may")
                normaliser = plugin.normalise
        return scale, bias, allowed, normaliser

    def _additive_mask(self, q, k, ctx, bias, allowed):
        """The fused kernel's float mask (bias, and the most negative value where not
        allowed) and whether its own causal mask can be used instead."""
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
        return attn_mask, is_causal

    def _fused(self, q, k, v, scale, attn_mask, is_causal, dropout):
        base_scale = 1.0 / math.sqrt(self.head_dim)
        if torch.is_tensor(scale):
            # A per-query scale multiplies q; the fused kernel then applies 1/sqrt(d).
            q = q * scale.to(q.dtype)
            scale = 1.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
            scale=base_scale * scale)


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
