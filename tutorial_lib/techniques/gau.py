r"""The gated attention unit (GAU; Hua, Dai, Liu and Le, "Transformer Quality in Linear
Time", ICML 2022) and GAU-α (Su et al., ZhuiyiTechnology/GAU-alpha).

Chapter 6. One GAU replaces a Transformer's attention *and* its feed-forward layer. From
the layer input :math:`X \in \mathbb R^{n\times d}`, one dense layer of width
:math:`2e + s` followed by SiLU gives three branches

.. math:: U = \phi(XW_u),\quad V = \phi(XW_v) \in \mathbb R^{n\times e},\quad
          Z = \phi(XW_z) \in \mathbb R^{n\times s},

and a per-dimension scale and offset (:class:`OffsetScale`) turns the one shared
:math:`Z` into queries and keys, :math:`Q = Z\odot\gamma_q + \beta_q`,
:math:`K = Z\odot\gamma_k + \beta_k`. With one attention map :math:`A` (one head)

.. math:: O = (U \odot AV)\,W_o,\qquad A = \tfrac1n\,\mathrm{relu}^2\!\big(QK^\top/\sqrt s\big).

The paper's text divides by :math:`n` after :math:`1/\sqrt s`; its appendix code
computes ``relu(qk / seq_len) ** 2``, i.e. :math:`1/n^2` and no :math:`1/\sqrt s`.
GAU-α replaces the normaliser by the "softmax plus" of Su's entropy argument,
:math:`\mathrm{softmax}\big(\tfrac{\log \max(\ell, 16)}{\log 512}\, QK^\top/\sqrt s\big)`
with :math:`\ell` the number of keys a query sees. All four are options
(``normaliser``, see :data:`NORMALISERS`).

In the library a GAU is a block (:class:`GAUBlock`), registered with the core as
``config.block = "gau"``; its options live in ``config.extra["gau"]`` (:class:`GAUOptions`).
Conventions this module fixes and the tests pin:

* :math:`s` is ``config.head_dim`` (``hidden_size // num_heads``): the GAU has one
  head of that width, so the core's position plugins (RoPE, windows, log-n scaling)
  serve it unchanged. The paper's :math:`s = 128` at :math:`d = 768` is ``num_heads=6``;
  :math:`e` is ``expansion · hidden_size`` (paper: 2).
* :math:`n` of the relu² normalisers is, for each query, the number of keys it may
  attend to: real (unpadded) keys, and under a causal mask the keys up to the query
  (the paper's code divides by the padded length and, causally, still by the full
  length; Su points both out). ``normaliser_length`` fixes :math:`n` instead, e.g. to
  the training length; with it set to the padded length the layer reproduces
  ``flash-pytorch``'s ``GAU`` (tests/test_gau.py).
* The block follows ``config.norm_position`` (pre: FLASH; post: GAU-α) and ``norm``
  (LayerNorm; FLASH's ScaleNorm :math:`g\,x/\mathrm{rms}(x)`; GAU-α's RMS norm with no
  gain). ``bias=False`` is GAU-α's: no biases anywhere, so OffsetScale only scales.
* γ is initialised :math:`\mathcal N(0, \text{initializer\_range})` as in the paper's
  pseudo-code (``offset_scale_init="normal"``) or to 1 as in GAU-α (``"ones"``);
  β to 0.

Which parts of the released code this follows: the single dense layer and split of
GAU-α's ``GatedAttentionUnit`` (bert4keras), the OffsetScale of the paper's pseudo-code,
the relu² of the paper's text by default. ``chunk_size`` turns the unit into FLASH's
mixed chunk attention (:meth:`GAUBlock.flash_attention`: quadratic relu² within chunks of
``c``, linear attention across them). Not here: the T5 relative bias, token shift and
scaled sinusoids of ``flash-pytorch``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin, softmax_normalise
from tutorial_lib.core.config import TransformerConfig, is_number
from tutorial_lib.core.model import EXTENSIONS

BLOCK = "gau"
# "relu2": relu²(QKᵀ/√s)/n, the paper's text (= Su's 1/(ns) form);
# "relu2_code": relu²(QKᵀ/n) = relu²(QKᵀ)/n², the paper's appendix code and flash-pytorch;
# "softmax": softmax(QKᵀ/√s); "softmax_plus": GAU-α's softmax(log(max(ℓ,16))/log(base)·QKᵀ/√s).
NORMALISERS = ("relu2", "relu2_code", "softmax", "softmax_plus")
NORMS = ("layer_norm", "scale_norm", "rms")
OFFSET_SCALE_INITS = ("normal", "ones")
SOFTMAX_PLUS_FLOOR = 16  # GAU-α counts at least 16 keys


@dataclass(frozen=True)
class GAUOptions:
    """The GAU's own options, read from ``config.extra["gau"]`` (all optional)."""

    expansion: float = 2.0  # e = expansion * hidden_size
    normaliser: str = "relu2"
    normaliser_length: int | None = None  # relu²'s n, fixed; None: the keys a query sees
    logn_base: int = 512  # softmax_plus divides log ℓ by log(logn_base)
    norm: str = "layer_norm"
    bias: bool = True
    offset_scale_init: str = "normal"
    # FLASH's mixed chunk attention: None is the quadratic GAU; an integer c cuts the
    # sequence into chunks of c (see flash_attention).
    chunk_size: int | None = None

    def __post_init__(self):
        if not is_number(self.expansion) or self.expansion <= 0:
            raise ValueError(f"gau expansion must be a number > 0, got {self.expansion!r}")
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"gau normaliser must be one of {NORMALISERS}, "
                             f"got {self.normaliser!r}")
        if self.normaliser_length is not None:
            if not isinstance(self.normaliser_length, int) \
                    or isinstance(self.normaliser_length, bool) or self.normaliser_length < 1:
                raise ValueError(f"gau normaliser_length must be None or an integer >= 1, "
                                 f"got {self.normaliser_length!r}")
            if not self.normaliser.startswith("relu2"):
                raise ValueError(f"gau normaliser_length fixes the n of the relu2 "
                                 f"normalisers; normaliser is {self.normaliser!r}")
        if not isinstance(self.logn_base, int) or isinstance(self.logn_base, bool) \
                or self.logn_base < 2:
            raise ValueError(f"gau logn_base must be an integer >= 2, got {self.logn_base!r}")
        if self.norm not in NORMS:
            raise ValueError(f"gau norm must be one of {NORMS}, got {self.norm!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"gau bias must be True or False, got {self.bias!r}")
        if self.chunk_size is not None:
            if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) \
                    or self.chunk_size < 1:
                raise ValueError(f"gau chunk_size must be None or an integer >= 1, "
                                 f"got {self.chunk_size!r}")
            if not self.normaliser.startswith("relu2") or self.normaliser_length is not None:
                raise ValueError("gau chunk_size (FLASH) works with the relu2 or relu2_code "
                                 "normaliser and no normaliser_length: a chunk's n is c")
        if self.offset_scale_init not in OFFSET_SCALE_INITS:
            raise ValueError(f"gau offset_scale_init must be one of {OFFSET_SCALE_INITS}, "
                             f"got {self.offset_scale_init!r}")

    @classmethod
    def of(cls, config: TransformerConfig) -> "GAUOptions":
        """The options of ``config`` (defaults for those it does not set)."""
        values = config.extra.get("gau", {})
        if not isinstance(values, dict):
            raise ValueError(f"extra['gau'] must be a dict of GAU options, "
                             f"got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GAU option(s) in extra['gau']: {unknown}; "
                             f"known: {sorted(known)}")
        return cls(**values)

    def expanded_size(self, hidden_size: int) -> int:
        return int(round(self.expansion * hidden_size))


def gau_config(preset: str = "tiny", *, gau: dict | None = None, **overrides) -> TransformerConfig:
    """A config whose stack is GAUs: ``block="gau"`` and ``extra={"gau": gau}``."""
    extra = dict(overrides.pop("extra", {}))
    extra["gau"] = dict(gau or {})
    return TransformerConfig.preset(preset, block=BLOCK, extra=extra, **overrides)


def check_config(config: TransformerConfig) -> None:
    """The config checks of the GAU's options (registered by :mod:`tutorial_lib.assembly`)."""
    if config.block != BLOCK:
        if "gau" in config.extra:
            raise ValueError(f"extra['gau'] sets GAU options but block is {config.block!r}; "
                             f"use block='gau'")
        return
    GAUOptions.of(config)
    if config.alibi:
        raise ValueError("alibi draws one slope per head of num_heads; the GAU has one head "
                         "(num_heads only sets its width s), so alibi is not supported")


# -- the pieces ------------------------------------------------------------------------


class OffsetScale(nn.Module):
    r"""``heads`` per-dimension affine maps of one input: :math:`x\odot\gamma_h + \beta_h`.

    ``(..., dim)`` -> a tuple of ``heads`` tensors ``(..., dim)`` (GAU: two, Q and K).
    """

    def __init__(self, dim: int, heads: int = 2, offset: bool = True, init: str = "normal",
                 std: float = 0.02):
        super().__init__()
        if init not in OFFSET_SCALE_INITS:
            raise ValueError(f"init must be one of {OFFSET_SCALE_INITS}, got {init!r}")
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        if init == "normal":
            nn.init.normal_(self.gamma, std=std)
        self.beta = nn.Parameter(torch.zeros(heads, dim)) if offset else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = x[..., None, :] * self.gamma  # (..., heads, dim)
        if self.beta is not None:
            out = out + self.beta
        return out.unbind(dim=-2)


class ScaleNorm(nn.Module):
    r"""FLASH's ScaleNorm, :math:`g\,x/\mathrm{rms}(x)` with one learned scalar :math:`g`;
    with ``gain=False`` GAU-α's RMS normalisation (no gain, no bias)."""

    def __init__(self, eps: float, gain: bool = True):
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(1)) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return x if self.gain is None else x * self.gain


def make_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if kind == "scale_norm":
        return ScaleNorm(eps, gain=True)
    if kind == "rms":
        return ScaleNorm(eps, gain=False)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def visible_keys(allowed: torch.Tensor | None, key_length: int) -> torch.Tensor | int:
    """The number of keys each query may attend to: ``allowed.sum(-1)`` kept as
    ``(..., query, 1)``, at least 1; without a mask, ``key_length``."""
    if allowed is None:
        return key_length
    return allowed.sum(-1, keepdim=True).clamp(min=1)


def relu2_normalise(scores: torch.Tensor, allowed: torch.Tensor | None,
                    length: torch.Tensor | int, power: int = 1) -> torch.Tensor:
    r""":math:`\mathrm{relu}^2(\text{scores})/n^{\text{power}}`, zero on disallowed keys.

    ``power=1`` is the paper's text (scores already divided by :math:`\sqrt s`);
    ``power=2`` with unscaled scores is its code, ``relu(scores / n) ** 2``.
    """
    weights = F.relu(scores).square()
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    return weights / length ** power


def softmax_plus_normalise(scores: torch.Tensor, allowed: torch.Tensor | None,
                           length: torch.Tensor | int, base: int = 512,
                           floor: int = SOFTMAX_PLUS_FLOOR) -> torch.Tensor:
    r"""GAU-α: :math:`\mathrm{softmax}\big(\tfrac{\log\max(\ell, \text{floor})}{\log
    \text{base}}\cdot\text{scores}\big)`, ℓ the keys a query sees."""
    if torch.is_tensor(length):
        factor = length.clamp(min=floor).to(scores.dtype).log() / math.log(base)
    else:
        factor = math.log(max(length, floor)) / math.log(base)
    return softmax_normalise(scores * factor, allowed)


def _and(mask, other):
    return other if mask is None else mask & other


# -- the block -------------------------------------------------------------------------


class GAUBlock(nn.Module):
    """One gated attention unit with its norm and residual: the layer of ``block="gau"``.

    Called like every block, ``block(h, ctx, plugins, key_value_states, need_weights)``
    -> ``(h, weights or None)``; ``weights`` is ``(batch, 1, query, key)``. The plugins
    are the core's: ``transform_qk`` (RoPE), ``content_scores``, ``score_bias``,
    ``score_scale``, ``mask`` are honoured on the one head of width ``s``; a plugin that
    replaces the normaliser is refused (the GAU's normaliser is its ``normaliser`` option).
    """

    num_heads = 1  # what a plugin reading attn.num_heads sees

    def __init__(self, config: TransformerConfig, layer_index: int = 0):
        super().__init__()
        options = GAUOptions.of(config)
        self.options = options
        self.layer_index = layer_index
        self.hidden_size = config.hidden_size
        self.expanded_size = options.expanded_size(config.hidden_size)  # e
        self.head_dim = config.head_dim  # s
        self.pre_norm = config.norm_position == "pre"
        self.norm = make_norm(options.norm, config.hidden_size, config.layer_norm_eps)
        # One dense layer for U, V and Z (as GAU-α's i_dense), split after the SiLU.
        self.project = nn.Linear(config.hidden_size, 2 * self.expanded_size + self.head_dim,
                                 bias=options.bias)
        # FLASH: four maps of Z, in the order quad_q, lin_q, quad_k, lin_k (flash-pytorch's).
        self.offset_scale = OffsetScale(self.head_dim, heads=2 if options.chunk_size is None else 4,
                                        offset=options.bias,
                                        init=options.offset_scale_init,
                                        std=config.initializer_range)
        self.output = nn.Linear(self.expanded_size, config.hidden_size, bias=options.bias)
        self.attention_dropout = config.attention_dropout
        self.dropout = nn.Dropout(config.hidden_dropout)

    def branches(self, x: torch.Tensor):
        """(batch, n, d) -> U, V (batch, n, e) and Z (batch, n, s), all after SiLU."""
        return F.silu(self.project(x)).split(
            [self.expanded_size, self.expanded_size, self.head_dim], dim=-1)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext,
                          plugins=()) -> torch.Tensor:
        """q (batch, 1, query, s), k (batch, 1, key, s) -> A (batch, 1, query, key)."""
        options = self.options
        for plugin in plugins:
            q, k = plugin.transform_qk(self, q, k, ctx)
        content, scale, bias, allowed = None, 1.0, None, None
        if ctx.key_padding_mask is not None:
            allowed = ctx.key_padding_mask[:, None, None, :]  # (batch, 1, 1, key)
        for plugin in plugins:
            if _overrides(plugin, "normalise"):
                raise ValueError(f"{type(plugin).__name__} replaces the normaliser; a GAU's "
                                 f"normaliser is its 'normaliser' option")
            if _overrides(plugin, "content_scores"):
                if content is not None:
                    raise ValueError("two attention plugins replace content_scores; at most one may")
                content = plugin.content_scores(self, q, k, ctx)
            plugin_scale = plugin.score_scale(self, ctx)
            if plugin_scale is not None:
                scale = scale * plugin_scale
            plugin_bias = plugin.score_bias(self, q, k, ctx)
            if plugin_bias is not None:
                bias = plugin_bias if bias is None else bias + plugin_bias
            plugin_mask = plugin.mask(self, ctx)
            if plugin_mask is not None:
                allowed = _and(allowed, plugin_mask)
        if ctx.causal:
            query_len, key_len = q.shape[-2], k.shape[-2]
            index = torch.arange(query_len, device=q.device)[:, None] + (key_len - query_len)
            allowed = _and(allowed, torch.arange(key_len, device=q.device)[None, :] <= index)
        scores = q @ k.transpose(-1, -2) if content is None else content  # (batch, 1, q, k)
        if options.normaliser != "relu2_code":
            scores = scores / math.sqrt(self.head_dim)
        if not (isinstance(scale, float) and scale == 1.0):  # skip an n x n pass when unscaled
            scores = scores * scale
        if bias is not None:
            scores = scores + bias
        if options.normaliser.startswith("relu2"):
            length = options.normaliser_length or visible_keys(allowed, k.shape[-2])
            power = 2 if options.normaliser == "relu2_code" else 1
            return relu2_normalise(scores, allowed, length, power)
        if options.normaliser == "softmax":
            return softmax_normalise(scores, allowed)
        return softmax_plus_normalise(scores, allowed, visible_keys(allowed, k.shape[-2]),
                                      base=options.logn_base)

    def unit(self, x: torch.Tensor, ctx: AttentionContext, plugins=(),
             source: torch.Tensor | None = None, need_weights: bool = False):
        """The GAU itself, without norm and residual: (batch, n, d) -> (batch, n, d)."""
        u, v, z = self.branches(x)
        if self.options.chunk_size is not None:
            if source is not None or need_weights:
                raise ValueError("a FLASH block (chunk_size set) attends to its own stream only "
                                 "and has no attention matrix to return")
            attended = self.flash_attention(z, v, ctx, plugins)
            return self.output(u * attended), None
        if source is not None:  # attend to another stream: its keys and values
            _, v, z_source = self.branches(source)
            q, _ = self.offset_scale(z)
            _, k = self.offset_scale(z_source)
        else:
            q, k = self.offset_scale(z)
        weights = self.attention_weights(q[:, None], k[:, None], ctx, plugins)
        dropped = weights
        if self.training and self.attention_dropout > 0:
            dropped = F.dropout(weights, self.attention_dropout)
        attended = dropped[:, 0] @ v
        return self.output(u * attended), (weights if need_weights else None)

    def flash_attention(self, z: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                        plugins=()) -> torch.Tensor:
        r"""FLASH's mixed chunk attention: (batch, n, s), (batch, n, e) -> (batch, n, e).

        The sequence is cut into chunks of ``c`` (the last one padded). Within a chunk, the
        quadratic relu² attention with n = c (``relu2``: :math:`\mathrm{relu}^2(qk^\top/\sqrt s)/c`;
        ``relu2_code``: :math:`\mathrm{relu}^2(qk^\top/c)`), causal within the chunk when
        the model is; across chunks, linear attention :math:`Q^{lin}\sum_j K^{lin\top}_j
        V_j / N`, over every real key (bidirectional) or the real keys of the earlier
        chunks (causal), ``N`` the number of keys summed (Su's remark: a causal prefix is
        divided by its own length; flash-pytorch divides by n, causally by c).
        """
        batch, length, _ = z.shape
        c = self.options.chunk_size
        quad_q, lin_q, quad_k, lin_k = (t[:, None] for t in self.offset_scale(z))
        for plugin in plugins:
            if _overrides(plugin, "normalise") or _overrides(plugin, "content_scores") \
                    or plugin.score_bias(self, quad_q, quad_k, ctx) is not None \
                    or plugin.mask(self, ctx) is not None or plugin.score_scale(self, ctx) is not None:
                raise ValueError(f"{type(plugin).__name__} changes scores, masks or the "
                                 f"normaliser; FLASH (chunk_size) takes only RoPE-like plugins")
            quad_q, quad_k = plugin.transform_qk(self, quad_q, quad_k, ctx)
            lin_q, lin_k = plugin.transform_qk(self, lin_q, lin_k, ctx)
        quad_q, lin_q, quad_k, lin_k = (t[:, 0] for t in (quad_q, lin_q, quad_k, lin_k))
        real = ctx.key_padding_mask
        if real is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=z.device)
        lin_k = lin_k * real[..., None].to(lin_k.dtype)
        chunks = -(-length // c)
        pad = chunks * c - length

        def chunked(t):  # (batch, n, dim) -> (batch, chunks, c, dim)
            return F.pad(t, (0, 0, 0, pad)).view(batch, chunks, c, t.shape[-1])

        quad_q, quad_k, lin_q, lin_k, values = map(chunked, (quad_q, quad_k, lin_q, lin_k, v))
        allowed = F.pad(real, (0, pad)).view(batch, chunks, 1, c)  # (batch, chunks, 1, key)
        if ctx.causal:
            allowed = allowed & torch.ones(c, c, dtype=torch.bool, device=z.device).tril()
        scores = quad_q @ quad_k.transpose(-1, -2)  # (batch, chunks, c, c)
        if self.options.normaliser == "relu2":
            weights = relu2_normalise(scores / math.sqrt(self.head_dim), allowed, c)
        else:
            weights = relu2_normalise(scores, allowed, c, power=2)
        if self.training and self.attention_dropout > 0:
            weights = F.dropout(weights, self.attention_dropout)
        local = weights @ values  # (batch, chunks, c, e)
        summaries = lin_k.transpose(-1, -2) @ values  # (batch, chunks, s, e), one per chunk
        counts = allowed[..., 0, :].sum(-1) if not ctx.causal \
            else F.pad(real, (0, pad)).view(batch, chunks, c).sum(-1)  # real keys per chunk
        if ctx.causal:  # the chunks before this one: an exclusive cumulative sum
            summaries = F.pad(summaries.cumsum(1), (0, 0, 0, 0, 1, 0))[:, :-1]
            counts = F.pad(counts.cumsum(1), (1, 0))[:, :-1]
        else:
            summaries = summaries.sum(1, keepdim=True)
            counts = counts.sum(1, keepdim=True)
        divisor = counts.clamp(min=1).to(z.dtype)[..., None, None]  # (batch, chunks or 1, 1, 1)
        glob = lin_q @ summaries / divisor  # (batch, chunks, c, e)
        return (local + glob).reshape(batch, chunks * c, -1)[:, :length]

    def forward(self, h: torch.Tensor, ctx: AttentionContext,
                plugins: tuple[AttentionPlugin, ...] = (),
                key_value_states: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            source = None if key_value_states is None else self.norm(key_value_states)
            out, weights = self.unit(self.norm(h), ctx, plugins, source, need_weights)
            return h + self.dropout(out), weights
        out, weights = self.unit(h, ctx, plugins, key_value_states, need_weights)
        return self.norm(h + self.dropout(out)), weights


def _overrides(plugin: AttentionPlugin, hook: str) -> bool:
    return getattr(type(plugin), hook, None) is not getattr(AttentionPlugin, hook)


EXTENSIONS.register_block(BLOCK, GAUBlock)


# -- parameter counts ------------------------------------------------------------------


def gau_parameter_count(hidden_size: int, expanded_size: int, key_size: int,
                        bias: bool = True, norm: str = "layer_norm", maps: int = 2) -> int:
    """Parameters of one GAU block: dense d→2e+s, OffsetScale, dense e→d, its norm
    (``maps``: OffsetScale's maps of Z, 2 for the GAU, 4 for FLASH)."""
    d, e, s = hidden_size, expanded_size, key_size
    count = d * (2 * e + s) + e * d + maps * s  # the two dense layers and γ
    if bias:
        count += (2 * e + s) + d + maps * s  # their biases and β
    count += {"layer_norm": 2 * d, "scale_norm": 1, "rms": 0}[norm]
    return count


def transformer_parameter_count(hidden_size: int, intermediate_size: int) -> int:
    """Parameters of one Transformer block (MHA + FFN, biases, two LayerNorms)."""
    d, f = hidden_size, intermediate_size
    return 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d


def options_dict(options: GAUOptions) -> dict:
    """The options as the plain dict ``config.extra["gau"]`` holds."""
    return asdict(options)
