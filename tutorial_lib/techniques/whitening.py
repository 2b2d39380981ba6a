r"""BERT-whitening and its β, γ generalisation (chapter 7).

Su, Cao, Liu and Ou, "Whitening Sentence Representations for Better Semantics and
Faster Retrieval" (2021), and Su's follow-up with two hyperparameters
(kexue.fm/archives/9079). Sentence vectors of a pretrained BERT are anisotropic: they
share a large common component and fill a narrow cone, so their cosines say little.
Whitening maps them, with statistics of the vectors alone (no training), to vectors
whose covariance is the identity. Given :math:`N` sentence vectors
:math:`x_i \in \mathbb R^d` (rows) with mean :math:`\mu = \frac1N \sum_i x_i`,

.. math::

    \tilde x = (x - \beta\mu)\, U \Lambda^{-\gamma/2}, \qquad
    \Sigma_\beta = \frac1N \sum_i (x_i - \beta\mu)^\top (x_i - \beta\mu) = U \Lambda U^\top,

with the eigenvalues :math:`\Lambda` sorted in decreasing order. Keeping the first
:math:`k` columns of the kernel :math:`W = U\Lambda^{-\gamma/2}` reduces the vectors
to :math:`k` dimensions, the directions of largest second moment. For
:math:`\beta \ne 1`, :math:`\Sigma_\beta` is the second moment about
:math:`\beta\mu`, not the covariance (:math:`\beta = 0`: the raw second moment
:math:`E[x^\top x]`). Special cases:

* :math:`\beta = \gamma = 1`: whitening proper, the output's covariance is :math:`I`;
* :math:`\beta = 1, \gamma = 0`: PCA (centre, then rotate onto the principal axes);
* :math:`\beta = \gamma = 0`: :math:`\tilde x = xU`, a rotation (at :math:`k = d`
  every cosine is unchanged: the original vectors).

Any real β and γ are allowed (the formula is defined for them, γ < 0 even stretches
the large directions); they must be finite. With γ > 0 an eigenvalue is inverted,
so the kept directions must have a positive one: :func:`fit_whitening` refuses a
``k`` that reaches into the null space of rank-deficient vectors (fewer vectors
than dimensions, say) rather than divide by a rounding error.

Paper vs. code
--------------
The authors' code (bojone/BERT-whitening, ``compute_kernel_bias``) takes the SVD of
``np.cov(vecs.T)``, the covariance with the denominator :math:`N - 1`:
``ddof=1`` here reproduces it, the paper's :math:`1/N` is ``ddof=0`` (the default).
The code's :math:`\Sigma` is the paper's times :math:`N/(N-1)`, so its output is the
paper's times :math:`((N-1)/N)^{\gamma/2}`: a global scale, which no cosine sees. Its
``first_last_avg`` pooling averages the first layer's token mean and the last one's
(keras' ``Average``), as here. "First layer" is the first
Transformer layer's output, ``all_hidden_states[1]``, not the embeddings ``[0]``.

Statistics are accumulated in float64 over batches (:class:`WhiteningStats`), so a
corpus need not fit in memory; :func:`encode_sentences` and :func:`pool` turn
sentences into vectors with a library encoder, and :func:`spearman` with
:func:`cosine_scores` scores them on STS the way the paper does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.data.batching import pad_batch

POOLINGS = ("cls", "mean", "first-last-avg")


def _check_real(value: Any, name: str) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _matrix(x: Any, name: str) -> np.ndarray:
    """``x`` (a tensor or an array of shape (n, d)) as a float64 NumPy array, checked."""
    if torch.is_tensor(x):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got {x.dtype}")
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) \
            or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, d) with d >= 1, got {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must hold finite values (found NaN or infinity)")
    return x


class WhiteningStats:
    r"""Streaming float64 statistics of sentence vectors: :math:`N`, the sum and the sum
    of outer products, all about a fixed point :math:`c` (the first batch's mean).

    With :math:`y = x - c`, :math:`s = \sum y`, :math:`S = \sum y^\top y` and
    :math:`\delta = \beta\mu - c`, the second moment about :math:`\beta\mu` is exact:

    .. math:: \sum_i (x_i - \beta\mu)^\top (x_i - \beta\mu)
              = S - s^\top\delta - \delta^\top s + N\,\delta^\top\delta .

    With :math:`c = 0` this is :math:`\sum x^\top x - N(2\beta - \beta^2)\mu^\top\mu`;
    the shift only spares the subtraction of two large, nearly equal matrices (BERT
    vectors have a large mean), which would cost digits.
    """

    def __init__(self):
        self.count = 0
        self.shift: np.ndarray | None = None  # c, (d,)
        self.sum: np.ndarray | None = None  # s = Σ (x - c), (d,)
        self.outer: np.ndarray | None = None  # S = Σ (x - c)ᵀ(x - c), (d, d)

    @property
    def dim(self) -> int | None:
        return None if self.shift is None else len(self.shift)

    def update(self, batch: Any) -> WhiteningStats:
        """Add a batch of vectors (tensor or array, shape (n, d)); returns ``self``."""
        x = _matrix(batch, "batch")
        if self.shift is None:
            if len(x) == 0:
                return self
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self.dim:
            raise ValueError(f"batch must have d={self.dim} columns like the earlier "
                             f"batches, got shape {x.shape}")
        y = x - self.shift
        self.count += len(x)
        self.sum += y.sum(axis=0)
        self.outer += y.T @ y
        return self

    @property
    def mean(self) -> np.ndarray:
        """μ, (d,) float64."""
        self._check_count(1)
        return self.shift + self.sum / self.count

    def second_moment(self, beta: float = 1.0, ddof: int = 0) -> np.ndarray:
        r"""The second moment about βμ, (d, d) float64:
        :math:`\frac{1}{N - \mathrm{ddof}} \sum_i (x_i - \beta\mu)^\top (x_i - \beta\mu)`,
        the covariance at ``beta=1`` (``ddof=1``: ``np.cov``'s)."""
        beta = _check_real(beta, "beta")
        if not isinstance(ddof, Integral) or isinstance(ddof, bool) or ddof < 0:
            raise ValueError(f"ddof must be an int >= 0, got {ddof!r}")
        self._check_count(max(2, ddof + 1))
        delta = beta * self.mean - self.shift
        cross = np.outer(self.sum, delta)
        moment = self.outer - cross - cross.T + self.count * np.outer(delta, delta)
        moment = (moment + moment.T) / 2  # exactly symmetric for eigh
        return moment / (self.count - ddof)

    def _check_count(self, needed: int) -> None:
        if self.count < needed:
            raise ValueError(f"the statistics need at least {needed} vectors, got {self.count}")


@dataclass(eq=False)
class Whitening:
    r"""A fitted map :math:`x \mapsto (x - \beta\mu) W_{:, :k}`; see the module docstring."""

    mean: np.ndarray = field(repr=False)  # βμ, the point subtracted (μ when beta = 1), (d,)
    kernel: np.ndarray = field(repr=False)  # W[:, :k] = U Λ^(-γ/2), (d, k) float64
    eigenvalues: np.ndarray = field(repr=False)  # all of Λ, decreasing, (d,)
    beta: float
    gamma: float
    ddof: int
    count: int  # N, the number of vectors fitted on
    rcond: float | None = None  # the zero-eigenvalue cutoff of the fit (numerical_rank)

    @property
    def dim(self) -> int:
        return self.kernel.shape[0]

    @property
    def k(self) -> int:
        return self.kernel.shape[1]

    @property
    def rank(self) -> int:
        """The dimension the fitted vectors span about βμ (:func:`numerical_rank`)."""
        return numerical_rank(self.eigenvalues, self.rcond)

    def transform(self, x: Any, normalize: bool = False) -> torch.Tensor:
        """Whitened ``x`` (tensor or array, shape (..., d)) -> tensor (..., k).

        Computed in float64 on ``x``'s device; returned in ``x``'s floating dtype
        (float32 for integer input). ``normalize=True`` scales each output to unit
        L2 norm, so dot products are cosines (the paper's last step).
        """
        x = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., d={self.dim}), got {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"x must hold real numbers, got {x.dtype}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean, kernel = (torch.from_numpy(a).to(x.device) for a in (self.mean, self.kernel))
        y = (x.to(torch.float64) - mean) @ kernel
        if normalize:
            y = F.normalize(y, dim=-1)
        return y.to(dtype)


def fit_whitening(vectors: WhiteningStats | Any, beta: float = 1.0, gamma: float = 1.0,
                  k: int | None = None, ddof: int = 0, rcond: float | None = None) -> Whitening:
    r"""Fit :math:`\tilde x = (x - \beta\mu) U \Lambda^{-\gamma/2}`, keeping ``k`` columns.

    ``vectors``: a :class:`WhiteningStats` or the sentence vectors (n, d). ``k=None``
    keeps all ``d``. ``ddof`` divides by ``N - ddof`` instead of ``N`` (``ddof=1``
    with ``beta=1`` is the authors' ``np.cov``; for other β it is the same scale
    ``N/(N-1)`` of :math:`\Sigma_\beta`). Eigenvectors are signed so that each
    column's largest entry (in absolute value) is positive. ``rcond``: eigenvalues at
    or below ``rcond`` times the largest count as zero (:func:`numerical_rank`); with
    ``gamma > 0`` a ``k`` that keeps one of them is refused.
    """
    beta, gamma = _check_real(beta, "beta"), _check_real(gamma, "gamma")
    stats = vectors if isinstance(vectors, WhiteningStats) \
        else WhiteningStats().update(_matrix(vectors, "vectors"))
    moment = stats.second_moment(beta, ddof)  # checks ddof and N
    d = stats.dim
    if k is None:
        k = d
    if not isinstance(k, Integral) or isinstance(k, bool) or not 1 <= k <= d:
        raise ValueError(f"k must be an int in [1, d={d}] or None (all), got {k!r}")
    values, axes = np.linalg.eigh(moment)  # Λ and the columns of U
    values, axes = values[::-1].clip(min=0.0), axes[:, ::-1]  # decreasing
    largest = np.abs(axes).argmax(axis=0)
    axes = axes * np.sign(axes[largest, np.arange(d)])
    rcond = None if rcond is None else _check_rcond(rcond)
    if gamma > 0:
        rank = numerical_rank(values, rcond)
        if k > rank:
            smaller_k = f"k <= {rank}, " if rank else ""
            raise ValueError(
                f"k={k} keeps {k - rank} direction(s) with a zero eigenvalue (the vectors "
                f"span only {rank} dimension(s) about beta*mu), which gamma={gamma} > 0 "
                f"would invert: use {smaller_k}more vectors or gamma <= 0")
    kernel = axes[:, :k] * values[:k] ** (-gamma / 2)  # 0 ** 0 = 1 when gamma = 0
    return Whitening(beta * stats.mean, np.ascontiguousarray(kernel), values.copy(), beta,
                     gamma, int(ddof), stats.count, rcond)


def numerical_rank(eigenvalues: Any, rcond: float | None = None) -> int:
    """How many ``eigenvalues`` are not zero: those above ``rcond`` times the largest.

    The default ``rcond`` is ``d * eps`` of float64, below which an eigenvalue is what
    float64 rounding leaves of a zero one. Vectors computed in float32 carry far larger
    rounding: a direction in which they are exactly constant (a LayerNorm's constraint,
    say) can show an eigenvalue of 1e-13 of the largest; pass a larger ``rcond`` for them.
    """
    values = np.asarray(eigenvalues, dtype=np.float64)
    rcond = len(values) * np.finfo(np.float64).eps if rcond is None else _check_rcond(rcond)
    tolerance = rcond * max(values.max(initial=0.0), np.finfo(np.float64).tiny)
    return int((values > tolerance).sum())


def _check_rcond(rcond: Any) -> float:
    value = _check_real(rcond, "rcond")
    if not 0 <= value < 1:
        raise ValueError(f"rcond must be a number in [0, 1), got {rcond!r}")
    return value


def _masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask[..., None].to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * weights).sum(1) / weights.sum(1)


def pool(all_hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None,
         pooling: str = "mean") -> torch.Tensor:
    """Sentence vectors (batch, hidden) from an encoder's layer outputs.

    ``all_hidden_states``: the embedding output then every layer's output, each
    (batch, seq, hidden) (``EncoderState.all_hidden_states``); ``attention_mask``:
    (batch, seq), 1 for tokens, 0 for padding (None: no padding). ``pooling``:

    * ``"cls"``: the last layer at position 0 ([CLS]), without BERT's pooler;
    * ``"mean"``: the mean of the last layer over the real tokens (the paper's
      "last-avg", sentence-transformers' mean pooling);
    * ``"first-last-avg"``: the average of the token means of the first layer's output
      (``all_hidden_states[1]``, not the embeddings) and of the last layer's.
    """
    if not isinstance(pooling, str) or pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    states = list(all_hidden_states)
    needed = 2 if pooling == "first-last-avg" else 1
    if len(states) < needed or not all(torch.is_tensor(h) and h.dim() == 3 for h in states):
        raise ValueError(f"all_hidden_states must be a list of at least {needed} tensors "
                         f"(batch, seq, hidden) for pooling={pooling!r}")
    last = states[-1]
    if attention_mask is None:
        attention_mask = torch.ones(last.shape[:2], dtype=torch.long, device=last.device)
    if tuple(attention_mask.shape) != tuple(last.shape[:2]):
        raise ValueError(f"attention_mask must have shape (batch, seq) = "
                         f"{tuple(last.shape[:2])}, got {tuple(attention_mask.shape)}")
    if not bool(attention_mask.bool().any(dim=-1).all()):
        raise ValueError("attention_mask must have at least one token (1) in every row")
    if pooling == "cls":
        return last[:, 0]
    if pooling == "mean":
        return _masked_mean(last, attention_mask)
    return (_masked_mean(states[1], attention_mask) + _masked_mean(last, attention_mask)) / 2


def encode_sentences(encoder: nn.Module, tokenizer: Any, sentences: Sequence[str],
                     pooling: str = "mean", batch_size: int = 64, max_length: int = 128,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Sentence vectors (n, hidden), float32 on the CPU, in the order of ``sentences``.

    Each sentence is tokenised alone (``[CLS] ... [SEP]``, at most ``max_length``
    tokens); batches of ``batch_size`` sentences of similar lengths (sorted, so
    little padding) run through ``encoder.encode`` in eval mode without gradients on
    ``device`` (default: the encoder's), and are pooled by :func:`pool`. The
    encoder's training mode is restored afterwards.
    """
    return encode_poolings(encoder, tokenizer, sentences, (pooling,), batch_size, max_length,
                           device)[pooling]


def encode_poolings(encoder: nn.Module, tokenizer: Any, sentences: Sequence[str],
                    poolings: Sequence[str] = POOLINGS, batch_size: int = 64,
                    max_length: int = 128,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Like :func:`encode_sentences`, with several poolings of one pass through the
    encoder: ``{pooling: (n, hidden) vectors}``."""
    poolings = tuple(poolings) if not isinstance(poolings, str) else (poolings,)
    for pooling in poolings:
        if not isinstance(pooling, str) or pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if tokenizer.pad_id is None:
        raise ValueError("tokenizer must have a pad token to batch sentences")
    ids = tokenizer.encode_batch(sentences, max_length=max_length)
    parameter = next(encoder.parameters())
    device = parameter.device if device is None else torch.device(device)
    out = {pooling: torch.empty(len(ids), encoder.config.hidden_size) for pooling in poolings}
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = pad_batch([{"input_ids": ids[i]} for i in rows], tokenizer.pad_id)
                mask = batch["attention_mask"].to(device)
                state = encoder.encode(batch["input_ids"].to(device), mask,
                                       output_hidden_states=True)
                for pooling in poolings:
                    out[pooling][rows] = pool(state.all_hidden_states, mask,
                                              pooling).float().cpu()
    finally:
        encoder.train(was_training)
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first of each tie
    ends = np.r_[starts[1:], len(x)]
    run = np.repeat(np.arange(len(starts)), ends - starts)  # tie group of each position
    ranks = np.empty(len(x))
    ranks[order] = ((starts + ends - 1) / 2 + 1)[run]
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two score lists (Pearson's r of their ranks)."""
    a, b = (np.asarray(v.detach().cpu() if torch.is_tensor(v) else v, dtype=np.float64)
            for v in (a, b))
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"a and b must be 1-D of the same length >= 2, got shapes "
                         f"{a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a and b must hold finite values")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2  # centred ranks
    for name, r in (("a", ra), ("b", rb)):
        if not r.any():
            raise ValueError(f"{name} is constant: its rank correlation is undefined")
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def cosine_scores(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise cosines of two (n, dim) tensors, (n,) (0 where a row is zero)."""
    if not (torch.is_tensor(u) and torch.is_tensor(v)) or u.shape != v.shape or u.dim() != 2:
        raise ValueError(f"u and v must be tensors of the same shape (n, dim), got "
                         f"{getattr(u, 'shape', type(u))} and {getattr(v, 'shape', type(v))}")
    return (F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1)
