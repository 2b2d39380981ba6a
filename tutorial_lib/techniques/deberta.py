r"""DeBERTa: disentangled attention and the enhanced mask decoder (chapter 3).

He, Liu, Gao and Chen, "DeBERTa: Decoding-enhanced BERT with Disentangled
Attention" (ICLR 2021), and He, Gao and Chen, "DeBERTaV3" (2021), which keeps
the v2 architecture. A token is represented by two vectors, its content
:math:`H_i` and its position relative to every other token, and the attention
score between query :math:`i` and key :math:`j` is the sum of three terms:

.. math::

    \tilde A_{ij} = \underbrace{Q^c_i {K^c_j}^\top}_{\text{content}\to\text{content}}
                  + \underbrace{Q^c_i {K^r_{\delta(i,j)}}^\top}_{\text{c2p}}
                  + \underbrace{K^c_j {Q^r_{\delta(i,j)}}^\top}_{\text{p2c}},
    \qquad A = \mathrm{softmax}\Big(\frac{\tilde A}{\sqrt{(1 + n)\,d}}\Big)

with :math:`Q^c = HW_q`, :math:`K^c = HW_k` the layer's content projections,
:math:`Q^r = PW_{q,r}`, :math:`K^r = PW_{k,r}` projections of a table
:math:`P` of :math:`2k` relative-position embeddings, :math:`n \in \{0,1,2\}`
the number of position terms used (``pos_att_type``; the paper's
:math:`\sqrt{3d}` is :math:`n = 2`) and

.. math:: \delta(i, j) = \mathrm{clamp}\big(b(i - j) + k,\; 0,\; 2k - 1\big),

where :math:`b` is the identity in v1 and the log bucketing of v2/v3
(:func:`log_bucket_position`; then :math:`k` is ``position_buckets``, else
``max_relative_positions``).

Paper vs. code (the p2c index)
------------------------------
The paper indexes the p2c term with :math:`\delta(j, i)`. The released code
(microsoft/DeBERTa ``DeBERTa/deberta/disentangled_attention.py``) and Hugging Face's
``DebertaV2Model`` index it with :math:`\delta(i, j)`, the same index as c2p,
and every checkpoint was trained that way. ``p2c_convention="code"`` (the
default) follows the code; ``"paper"`` gives the paper's form, so the chapter
can show that the two differ (``tests/test_deberta.py`` pins both).

How it plugs into the library
-----------------------------
* :class:`DisentangledAttention` is an attention plugin
  (:mod:`tutorial_lib.core.attention`): its ``score_scale`` is :math:`1/\sqrt{1+n}`
  (the core multiplies :math:`QK^\top/\sqrt d` by it) and its ``score_bias`` is
  (c2p + p2c) :math:`/\sqrt{(1+n)d}`, gathered from the
  (query, table row) and (key, table row) products, so the attention itself
  (masking, softmax, the fused kernel) is the shared core's.
* The relative table :math:`P` (with its LayerNorm when
  ``norm_rel_ebd="layer_norm"``) is :class:`RelativePositionTable`, held by the
  :class:`~tutorial_lib.core.model.Encoder` as in Hugging Face; the encoder passes the
  (normalised) table to every layer through ``AttentionContext.relative_embeddings``.
* With ``share_att_key=True`` (v2/v3) the layer's own :math:`W_q, W_k` (biases
  included) project the table; otherwise the plugin holds one pair of position
  projections per layer and picks them by ``ctx.layer_index``.
* :class:`EnhancedMaskDecoder` is the EMD of the released code
  (``apps/models/masked_language_model.py``): absolute positions enter only
  here, just before the masked-LM head.

Relative positions are :math:`i - j` of the position ids (the sequence index by
default), so queries and keys of different lengths are handled by the same
formula. (Hugging Face takes another route when they differ; no model of theirs
exercises it.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin
from tutorial_lib.core.config import P2C_CONVENTIONS, POSITION_TERMS, REL_NORMS


def log_bucket_position(relative: torch.Tensor, buckets: int, max_relative: int) -> torch.Tensor:
    r"""DeBERTa-v2's log buckets: exact up to ``buckets // 2``, logarithmic beyond.

    .. math:: b(r) = r \text{ if } |r| \le m, \text{ else }
              \mathrm{sign}(r)\Big(m + \Big\lceil \frac{\ln(|r|/m)}{\ln((R-1)/m)}(m-1)\Big\rceil\Big)

    with :math:`m` = ``buckets // 2`` and :math:`R` = ``max_relative``. The ceiling
    makes the last bit matter at bucket boundaries, so this is computed as Hugging
    Face does (float32, in this order; a test pins equality). The released code uses
    NumPy float64; in the settings we checked the two differ only far beyond
    ``max_relative``, where both are clamped to the table's end (for 256 buckets over
    512, first at :math:`|r|` = 65317).
    """
    mid = buckets // 2
    magnitude = relative.abs()
    near = magnitude <= mid
    # Near positions keep r; give them a harmless value so the log stays finite.
    far_magnitude = torch.where(near, torch.full_like(magnitude, mid), magnitude)
    log_ratio = torch.log(far_magnitude.to(torch.float32) / mid) \
        / torch.log(torch.tensor((max_relative - 1) / mid, dtype=torch.float32))
    far_bucket = (torch.ceil(log_ratio * (mid - 1)) + mid).to(relative.dtype)
    return torch.where(near, relative, far_bucket * relative.sign())


def relative_position_index(query_positions: torch.Tensor, key_positions: torch.Tensor,
                            span: int, buckets: int = 0, max_relative: int = 0) -> torch.Tensor:
    r""":math:`\delta(i, j)`: the row of the relative table used by query ``i`` and key ``j``.

    ``query_positions`` (batch or 1, query), ``key_positions`` (batch or 1, key) ->
    (batch or 1, query, key) integer indices in ``[0, 2 * span)``.
    """
    relative = query_positions[:, :, None] - key_positions[:, None, :]  # (batch, query, key)
    if buckets > 0:
        relative = log_bucket_position(relative, buckets, max_relative)
    return (relative + span).clamp(0, 2 * span - 1)


class RelativePositionTable(nn.Module):
    """The :math:`2k` relative-position embeddings shared by all layers (+ LayerNorm in v2/v3)."""

    def __init__(self, span: int, hidden_size: int, norm: str = "none", eps: float = 1e-7):
        super().__init__()
        if norm not in REL_NORMS:
            raise ValueError(f"norm_rel_ebd must be one of {REL_NORMS}, got {norm!r}")
        self.embeddings = nn.Embedding(2 * span, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps) if norm == "layer_norm" else None

    def forward(self) -> torch.Tensor:
        """(2 * span, hidden)."""
        table = self.embeddings.weight
        return table if self.norm is None else self.norm(table)


class DisentangledAttention(AttentionPlugin):
    """DeBERTa's c2p and p2c terms as a score bias, and the :math:`1/\\sqrt{1+n}` scale.

    One instance serves every layer of an encoder. ``ctx.relative_embeddings`` must
    hold the table, of ``2 * span`` rows (the encoder sets it).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int, span: int, *,
                 pos_att_type=POSITION_TERMS, position_buckets: int = 0,
                 max_relative_positions: int = 0, share_att_key: bool = False,
                 p2c_convention: str = "code", dropout: float = 0.0):
        super().__init__()
        terms = tuple(pos_att_type)
        if any(term not in POSITION_TERMS for term in terms) or len(set(terms)) != len(terms):
            raise ValueError(f"pos_att_type must be distinct entries of {POSITION_TERMS}, "
                             f"got {pos_att_type!r}")
        if p2c_convention not in P2C_CONVENTIONS:
            raise ValueError(f"p2c_convention must be one of {P2C_CONVENTIONS}, "
                             f"got {p2c_convention!r}")
        if position_buckets > 0 and max_relative_positions - 1 <= position_buckets // 2:
            raise ValueError(f"max_relative_positions ({max_relative_positions}) must exceed "
                             f"position_buckets // 2 + 1 ({position_buckets // 2 + 1})")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.span = span
        self.c2p = "c2p" in terms
        self.p2c = "p2c" in terms
        self.position_buckets = position_buckets
        self.max_relative_positions = max_relative_positions
        self.share_att_key = share_att_key
        self.p2c_convention = p2c_convention
        self.dropout = nn.Dropout(dropout)  # on the table, in every layer (as released)

        def per_layer() -> nn.ModuleList:
            return nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))

        # Without shared keys each layer has its own W_{k,r} (c2p) and W_{q,r} (p2c).
        self.position_key = per_layer() if self.c2p and not share_att_key else None
        self.position_query = per_layer() if self.p2c and not share_att_key else None

    def prepare(self, encoder, ctx: AttentionContext) -> None:
        """The relative table, computed once per forward for every layer."""
        table = getattr(encoder, "relative_embeddings", None)
        if table is not None:
            ctx.relative_embeddings = table()

    @classmethod
    def from_config(cls, config) -> "DisentangledAttention":
        return cls(config.hidden_size, config.num_heads, config.num_layers,
                   config.relative_span, pos_att_type=config.pos_att_type,
                   position_buckets=config.position_buckets,
                   max_relative_positions=config.resolved_max_relative_positions,
                   share_att_key=config.share_att_key, p2c_convention=config.p2c_convention,
                   dropout=config.hidden_dropout)

    @property
    def num_terms(self) -> int:
        return int(self.c2p) + int(self.p2c)

    def score_scale(self, attn, ctx):
        return 1.0 / math.sqrt(1 + self.num_terms) if self.num_terms else None

    def score_bias(self, attn, q, k, ctx: AttentionContext):
        if not self.num_terms:
            return None
        c2p, p2c = self.score_terms(attn, q, k, ctx)
        if c2p is None:
            return p2c
        # In place: gather keeps no output for its backward, and a (batch, heads,
        # query, key) tensor less is a large part of this layer's peak memory.
        return c2p if p2c is None else c2p.add_(p2c)

    def score_terms(self, attn, q, k, ctx: AttentionContext):
        r"""``(c2p, p2c)``, each (batch, heads, query, key) and already divided by
        :math:`\sqrt{(1+n)d}`, or None for a term not in ``pos_att_type``.

        ``q`` and ``k`` are the layer's content queries and keys (batch, heads, len,
        head_dim); the chapter reads the terms one by one to draw them.
        """
        table = ctx.relative_embeddings
        if table is None or table.shape[0] != 2 * self.span:
            raise ValueError(f"DisentangledAttention needs ctx.relative_embeddings of "
                             f"{2 * self.span} rows (the encoder's relative table), got "
                             f"{None if table is None else tuple(table.shape)}")
        first_row, rows_used, c2p_index, p2c_index = self._indices(ctx)
        table = self.dropout(table[first_row:first_row + rows_used])  # (rows, hidden)
        # Fold 1/sqrt((1+n) d) into the small projected table, not the (query, key) scores.
        table_scale = 1.0 / math.sqrt(self.head_dim * (1 + self.num_terms))
        batch, heads, query_len, _ = q.shape
        key_len = k.shape[-2]
        c2p = p2c = None
        if self.c2p:
            keys = attn.key if self.share_att_key else self.position_key[ctx.layer_index]
            position_keys = self._heads(keys(table)) * table_scale  # (heads, rows, head_dim)
            c2p = torch.matmul(q, position_keys.transpose(-1, -2))  # (batch, heads, query, rows)
            c2p = c2p.gather(-1, c2p_index[:, None].expand(batch, heads, query_len, key_len))
        if self.p2c:
            queries = attn.query if self.share_att_key else self.position_query[ctx.layer_index]
            position_queries = self._heads(queries(table)) * table_scale
            p2c = torch.matmul(k, position_queries.transpose(-1, -2))  # (batch, heads, key, rows)
            p2c = p2c.gather(-1, p2c_index[:, None].expand(batch, heads, key_len, query_len))
            p2c = p2c.transpose(-1, -2)  # (batch, heads, query, key)
        return c2p, p2c

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        rows = projected.shape[0]
        return projected.view(rows, self.num_heads, self.head_dim).transpose(0, 1)

    def _indices(self, ctx: AttentionContext):
        """Table rows used and the c2p/p2c gather indices; once per forward pass.

        c2p reads row :math:`\\delta(i,j)` for (query i, key j), shaped (batch, query, key);
        p2c reads, for (key j, query i), row :math:`\\delta(i,j)` (code) or
        :math:`\\delta(j,i)` (paper), shaped (batch, key, query). Only the rows between
        the smallest and largest index are projected: at short sequences that is far
        fewer than the ``2 * span`` rows of the table.
        """
        cache_key = ("disentangled_attention", id(self))
        if cache_key in ctx.cache:
            return ctx.cache[cache_key]
        query_positions, key_positions = ctx.query_positions, ctx.key_positions
        if query_positions.is_floating_point() or key_positions.is_floating_point():
            raise TypeError("DeBERTa's relative positions need integer position_ids")

        def index(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
            return relative_position_index(rows.long(), columns.long(), self.span,
                                           self.position_buckets, self.max_relative_positions)

        c2p_index = index(query_positions, key_positions)  # (batch, query, key)
        if self.p2c_convention == "code":
            p2c_index = c2p_index.transpose(-1, -2)
        else:
            p2c_index = index(key_positions, query_positions)  # delta(j, i): (batch, key, query)
        first_row, rows_used = 0, 2 * self.span
        if not torch.compiler.is_compiling():  # reading the range back would break a graph
            lowest = int(torch.minimum(c2p_index.min(), p2c_index.min()))
            highest = int(torch.maximum(c2p_index.max(), p2c_index.max()))
            first_row, rows_used = lowest, highest - lowest + 1
            c2p_index, p2c_index = c2p_index - lowest, p2c_index - lowest
        ctx.cache[cache_key] = (first_row, rows_used, c2p_index, p2c_index.contiguous())
        return ctx.cache[cache_key]

    def extra_repr(self) -> str:
        terms = [t for t in POSITION_TERMS if getattr(self, t)]
        return (f"span={self.span}, pos_att_type={terms}, position_buckets="
                f"{self.position_buckets}, share_att_key={self.share_att_key}, "
                f"p2c_convention={self.p2c_convention!r}")


class EnhancedMaskDecoder(nn.Module):
    r"""DeBERTa's EMD: absolute positions enter just before the masked-LM head.

    Following the released code (microsoft/DeBERTa, ``EnhancedMaskDecoder``): with
    :math:`H_{L-1}` the input of the last encoder layer and :math:`P_{abs}` absolute
    position embeddings, the query stream starts at :math:`P_{abs} + H_{L-1}` and the
    last layer is applied ``passes`` times (2, weights shared), each time attending
    with keys and values :math:`H_{L-1}`; the last query stream feeds the MLM head.
    The released checkpoints store :math:`P_{abs}` as
    ``deberta.embeddings.position_embeddings`` (Hugging Face drops it on loading).
    """

    def __init__(self, config, passes: int = 2):
        super().__init__()
        if config.position_embedding != "none":
            raise ValueError(
                "the enhanced mask decoder adds absolute positions before the head, so it "
                f"needs position_embedding='none', got {config.position_embedding!r} (the "
                "released code uses the plain head when positions are already in the input)")
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {passes!r}")
        self.passes = passes
        self.max_positions = config.max_position_embeddings
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)

    def forward(self, encoder: nn.Module, state) -> torch.Tensor:
        """(batch, seq, hidden) query stream after the last pass, for an
        :class:`~tutorial_lib.core.model.EncoderState` of ``encoder`` (a head decoder:
        ``MaskedLM(config, decoder=EnhancedMaskDecoder)``)."""
        last_layer, last_layer_input, ctx = encoder.layers[-1], state.last_layer_input, state.ctx
        plugins = tuple(encoder.attention_plugins)
        positions = ctx.query_positions
        if positions.is_floating_point():
            raise TypeError("the enhanced mask decoder needs integer position_ids")
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.max_positions:
            raise ValueError(f"position {int(positions.max())} is beyond the decoder's "
                             f"max_position_embeddings={self.max_positions}")
        query = self.position_embeddings(positions.long()) + last_layer_input
        ctx.layer_index = len(encoder.layers) - 1
        for _ in range(self.passes):
            query, _ = last_layer(query, ctx, plugins, key_value_states=last_layer_input)
        return query if encoder.final_norm is None else encoder.final_norm(query)

    def extra_repr(self) -> str:
        return f"passes={self.passes}"


class RelativePositionBias(AttentionPlugin):
    r"""A learned scalar per head and relative distance, added to the scores.

    The "relative bias" family (Shaw et al., 2018, in its scalar form; Raffel et al.,
    2020, T5): :math:`B_{hij} = b_h[\delta(i, j)]` with the same index
    :math:`\delta` as DeBERTa (:func:`relative_position_index`, optional log buckets),
    so the two can be compared on one footing. Unlike DeBERTa's c2p/p2c terms the
    bias does not depend on the content of query or key. Initialised at zero: the
    model starts with no position information at all.
    """

    def __init__(self, num_heads: int, span: int, position_buckets: int = 0,
                 max_relative_positions: int = 0):
        super().__init__()
        for name, value, minimum in (("num_heads", num_heads, 1), ("span", span, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if position_buckets and max_relative_positions - 1 <= position_buckets // 2:
            raise ValueError(f"max_relative_positions ({max_relative_positions}) must exceed "
                             f"position_buckets // 2 + 1 ({position_buckets // 2 + 1})")
        self.span = span
        self.position_buckets = position_buckets
        self.max_relative_positions = max_relative_positions
        self.bias = nn.Parameter(torch.zeros(num_heads, 2 * span))  # (heads, 2k)

    def score_bias(self, attn, q, k, ctx: AttentionContext) -> torch.Tensor:
        if attn.num_heads != self.bias.shape[0]:
            raise ValueError(f"RelativePositionBias was built for num_heads="
                             f"{self.bias.shape[0]} but the attention has {attn.num_heads}")
        cache_key = ("relative_position_bias", id(self))
        if cache_key not in ctx.cache:
            ctx.cache[cache_key] = relative_position_index(
                ctx.query_positions.long(), ctx.key_positions.long(), self.span,
                self.position_buckets, self.max_relative_positions)  # (batch or 1, q, k)
        index = ctx.cache[cache_key]
        return self.bias[:, index].transpose(0, 1)  # (batch or 1, heads, query, key)

    def extra_repr(self) -> str:
        return (f"num_heads={self.bias.shape[0]}, span={self.span}, "
                f"position_buckets={self.position_buckets}")


def attention_score_terms(model: nn.Module, layer: int, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    r"""The three scores of one layer of a DeBERTa encoder, each (batch, heads, query, key).

    ``{"c2c": ..., "c2p": ..., "p2c": ...}``, all divided by :math:`\sqrt{(1+n)d}`, so
    their sum (masked, softmaxed) is the layer's attention. ``model`` is an
    :class:`~tutorial_lib.core.model.Encoder` or holds one as ``model.encoder``; it runs in
    its current mode, without gradients.
    """
    encoder = getattr(model, "encoder", model)
    plugins = [p for p in encoder.attention_plugins if isinstance(p, DisentangledAttention)]
    if not plugins:
        raise ValueError("model has no DisentangledAttention (relative_attention=False?)")
    if not isinstance(layer, int) or not 0 <= layer < len(encoder.layers):
        raise ValueError(f"layer must be an integer in [0, {len(encoder.layers)}), got {layer!r}")
    plugin = plugins[0]
    attention = encoder.layers[layer].attention
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("hidden", args[0])
        captured.setdefault("ctx", args[1])

    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            encoder.encode(input_ids, attention_mask)
    finally:
        handle.remove()
    ctx = captured["ctx"]
    ctx.layer_index, ctx.cache = layer, {}
    with torch.no_grad():
        q = attention.split_heads(attention.query(captured["hidden"]))
        k = attention.split_heads(attention.key(captured["hidden"]))
        c2c = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) \
            / math.sqrt(1 + plugin.num_terms)
        c2p, p2c = plugin.score_terms(attention, q, k, ctx)
    zeros = torch.zeros_like(c2c)
    return {"c2c": c2c, "c2p": zeros if c2p is None else c2p,
            "p2c": zeros if p2c is None else p2c}


def extend_encoder(encoder: nn.Module, config) -> None:
    """Make ``encoder`` a DeBERTa encoder when ``config.relative_attention`` asks for it:
    the relative table, shared by every layer as in Hugging Face, lives on the encoder
    (``encoder.relative_embeddings``), and the disentangled-attention plugin holds what is
    per layer. Registered with the core by :mod:`tutorial_lib.assembly`."""
    if not config.relative_attention:
        return
    encoder.relative_embeddings = RelativePositionTable(
        config.relative_span, config.hidden_size, config.norm_rel_ebd, config.layer_norm_eps)
    encoder.attention_plugins.append(DisentangledAttention.from_config(config))


def check_config(config) -> None:
    """The config checks of disentangled attention's options (registered with the core by
    :mod:`tutorial_lib.assembly`)."""
    for name in ("relative_attention", "share_att_key"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")
    terms = config.pos_att_type
    if not isinstance(terms, tuple) or any(t not in POSITION_TERMS for t in terms) \
            or len(set(terms)) != len(terms):
        raise ValueError(f"pos_att_type must be distinct entries of {POSITION_TERMS} "
                         f"(or 'c2p|p2c'), got {terms!r}")
    buckets = config.position_buckets
    if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 0 or buckets == 1:
        raise ValueError(f"position_buckets must be 0 (no log buckets) or an integer >= 2, "
                         f"got {buckets!r}")
    maximum = config.max_relative_positions
    if maximum is not None and (not isinstance(maximum, int) or isinstance(maximum, bool)
                                or maximum < 1):
        raise ValueError(f"max_relative_positions must be None or an integer >= 1, "
                         f"got {maximum!r}")
    if buckets and config.resolved_max_relative_positions - 1 <= buckets // 2:
        raise ValueError(
            f"max_relative_positions ({config.resolved_max_relative_positions}) must exceed "
            f"position_buckets // 2 + 1 ({buckets // 2 + 1}): the log "
            f"buckets spread the distances between the two")
    if config.norm_rel_ebd not in REL_NORMS:
        raise ValueError(f"norm_rel_ebd must be one of {REL_NORMS}, got {config.norm_rel_ebd!r}")
    if config.p2c_convention not in P2C_CONVENTIONS:
        raise ValueError(f"p2c_convention must be one of {P2C_CONVENTIONS}, "
                         f"got {config.p2c_convention!r}")
