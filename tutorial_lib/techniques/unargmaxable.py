r"""Unargmaxable classes of a low-rank softmax layer (chapter 8).

Grivas, Bogoychev and Lopez, "Low-Rank Softmax Can Have Unargmaxable Classes in
Theory but Rarely in Practice" (ACL 2022; code: andreasgrv/unargmaxable). A softmax
layer with rows :math:`w_i \in \mathbb R^d` and biases :math:`b_i` (:math:`i = 1..C`)
scores a feature vector :math:`z` by the logits :math:`w_i \cdot z + b_i`. Class
:math:`k` is *argmaxable* when some :math:`z` makes it the strict argmax:

.. math:: \exists z:\quad (w_k - w_i)\cdot z + (b_k - b_i) > 0 \quad \forall i \ne k .

Without a bias the condition is invariant under :math:`z \mapsto tz` (:math:`t > 0`)
and, by the separation theorem, :math:`k` is unargmaxable iff
:math:`w_k \in \operatorname{conv}\{w_i : i \ne k\}`, which needs :math:`C > d + 1`.
If all rows are distinct with equal norms, :math:`z = w_k` works for every class
(Cauchy–Schwarz). :func:`certify` decides every class in three stages, each cheaper
one removing classes from the next:

1. :func:`quick_certificate`: :math:`z = w_k`. All classes at once from the Gram
   matrix :math:`WW^\top` in float64, in panels of rows, using its symmetry (half the
   work); its float64 margins are the re-check of these witnesses;
2. :func:`braid_reflect` (the authors' approximate pre-check): while a class
   :math:`j` beats :math:`k` at :math:`x`, reflect :math:`x` across the hyperplane
   where the two tie, :math:`(w_k - w_j)\cdot x + (b_k - b_j) = 0`; after it
   :math:`k` leads :math:`j`. It stops at a witness or after ``patience`` steps; it
   never certifies an unargmaxable class, but may miss an argmaxable one;
3. :func:`chebyshev_lp`, exact: the Chebyshev centre of :math:`k`'s region,
   :math:`\max r` s.t. :math:`(w_i - w_k)\cdot x + \lVert w_i - w_k\rVert r \le b_k - b_i`,
   :math:`x \in [-\text{box}, \text{box}]^d`, :math:`r \ge r_{\min}`; infeasible
   means unargmaxable (or a region thinner than :math:`r_{\min}`). Solved with
   HiGHS by constraint generation (exact; the authors use Gurobi on all rows at once).

The *box* bounds the input features (the authors' CLI calls it "logit bounds").
Without a bias it does not matter (a witness is scaled into it); with one it does: a
class with a very negative bias may win only far outside the box. Every witness is
re-checked: its logits are recomputed in float64 and :math:`k` must lead every other
class by more than ``REL_TOL`` times :math:`\lVert z\rVert \max_i\lVert w_i\rVert +
\max_i |b_i|` (a bound on the logits), else a ``RuntimeError`` is raised.

Su's minimax view (kexue.fm/archives/9046), :func:`convex_hull_distance`: the
distance from :math:`w_k` to the hull of the others, :math:`\min_{\alpha \in \Delta}
\lVert \sum_{i \ne k} \alpha_i (w_k - w_i)\rVert`, is positive iff (no bias) :math:`k`
is argmaxable. With a bias, the logits at :math:`tz` are :math:`t\,w_i\cdot z + b_i`:
as :math:`t \to \infty` the bias drops out, so without a box a positive distance
still means argmaxable (a bias can only add classes that win near the origin).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Callable

import numpy as np
import torch

QUICK, BRAID, LP, UNARGMAXABLE, UNCHECKED, SKIPPED = 0, 1, 2, 3, -1, -2
STATUS_NAMES = {QUICK: "quick", BRAID: "braid", LP: "lp", UNARGMAXABLE: "unargmaxable",
                UNCHECKED: "unchecked", SKIPPED: "skipped"}
REL_TOL = 1e-12  # a winning margin must exceed this times the bound on the logits


# -- inputs ---------------------------------------------------------------------------------

def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    if torch.is_tensor(x):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers, got {x.dtype}")
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number) \
            or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must hold finite values (found NaN or infinity)")
    return x


def _layer(weight: Any, bias: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(W (C, d), b (C,), whether b is not all zero), float64 and checked."""
    w = _array(weight, "weight", 2)
    if w.shape[0] < 2 or w.shape[1] < 1:
        raise ValueError(f"weight must have shape (C, d) with C >= 2 and d >= 1, got {w.shape}")
    if bias is None:
        return w, np.zeros(len(w)), False
    b = _array(bias, "bias", 1)
    if len(b) != len(w):
        raise ValueError(f"bias must have length C={len(w)}, got {len(b)}")
    return w, b, bool(b.any())


def _positive(value: Any, name: str, minimum: float = 0.0, strict: bool = True) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) \
            or (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} "
                         f"{minimum}, got {value!r}")
    return float(value)


def _count(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _class(k: Any, count: int) -> int:
    if not isinstance(k, Integral) or isinstance(k, bool) or not 0 <= k < count:
        raise ValueError(f"k must be a class index in [0, {count}), got {k!r}")
    return int(k)


def _classes(classes: Any, count: int) -> np.ndarray:
    if classes is None:
        return np.arange(count)
    values = np.asarray(classes.cpu() if torch.is_tensor(classes) else classes)
    if values.ndim != 1 or (len(values) and not np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"classes must be a 1-D sequence of class indices, got {classes!r}")
    values = np.unique(values.astype(np.int64))
    if len(values) and (values[0] < 0 or values[-1] >= count):
        raise ValueError(f"classes must be a subset of range({count}), got {classes!r}")
    return values


# -- the witness check ----------------------------------------------------------------------

def _largest_norm(w: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", w, w).max()))


def _lead(w: np.ndarray, b: np.ndarray, z: np.ndarray, k: int,
          largest_norm: float | None = None) -> tuple[float, int, float]:
    """(k's smallest lead over another class at z, that class, the tolerance)."""
    logits = w @ z + b
    rivals = logits.copy()
    rivals[k] = -np.inf
    j = int(rivals.argmax())
    largest_norm = _largest_norm(w) if largest_norm is None else largest_norm
    bound = float(np.linalg.norm(z)) * largest_norm + np.abs(b).max()
    return float(logits[k] - logits[j]), j, REL_TOL * bound


def is_strict_argmax(weight: Any, bias: Any, z: Any, k: int) -> bool:
    """Whether class ``k`` wins at ``z`` by more than the tolerance (module docstring)."""
    w, b, _ = _layer(weight, bias)
    z = _array(z, "z", 1)
    if len(z) != w.shape[1]:
        raise ValueError(f"z must have length d={w.shape[1]}, got {len(z)}")
    lead, _, tolerance = _lead(w, b, z, _class(k, len(w)))
    return lead > tolerance


def _recheck(w: np.ndarray, b: np.ndarray, z: np.ndarray, k: int, box: float, stage: str,
             largest_norm: float | None = None) -> None:
    lead, j, tolerance = _lead(w, b, z, k, largest_norm)
    if not lead > tolerance or np.abs(z).max() > box * (1 + 1e-12):
        raise RuntimeError(f"{stage}: the witness of class {k} fails the re-check (lead "
                           f"{lead:.3e} over class {j}, tolerance {tolerance:.3e}, largest "
                           f"|feature| {np.abs(z).max():.3e}, box {box})")


def _into_box(z: np.ndarray, box: float) -> np.ndarray:
    """Without a bias a witness may be scaled by t > 0: the largest |feature| <= box."""
    largest = np.abs(z).max()
    return z * (box / largest) if largest > box else z


# -- stage 1 --------------------------------------------------------------------------------

def _quick(w, b, has_bias, box, chunk_size, classes) -> np.ndarray:
    count, t, bias = len(w), torch.from_numpy(w), torch.from_numpy(b)
    best = torch.full((count,), -math.inf, dtype=torch.float64)  # max_{i != k} w_i.w_k + b_i
    if len(classes) == count:  # every class: the rows s:e of W Wᵀ from column s on
        for s in range(0, count, chunk_size):
            e = min(count, s + chunk_size)
            panel = t[s:e] @ t[s:].T  # its transpose stands for the rows below
            diagonal = torch.arange(e - s)
            panel[diagonal, diagonal] = -math.inf
            if has_bias:
                panel += bias[s:]
            torch.maximum(best[s:e], panel.amax(1), out=best[s:e])
            if e < count:  # rows s:e as rivals of the classes e:, the columns
                below = panel[:, e - s:]
                if has_bias:  # swap the columns' biases for the rows'
                    below.sub_(bias[e:]).add_(bias[s:e, None])
                torch.maximum(best[e:], below.amax(0), out=best[e:])
        best = best[classes].numpy()
    else:  # some classes: their rows of W Wᵀ
        best = best[:len(classes)]
        for s in range(0, len(classes), chunk_size):
            ks = torch.from_numpy(classes[s:s + chunk_size])
            panel = t[ks] @ t.T + bias
            panel[torch.arange(len(ks)), ks] = -math.inf
            best[s:s + len(ks)] = panel.amax(1)
        best = best.numpy()
    own = (w[classes] ** 2).sum(1) + b[classes]
    bound = np.sqrt((w[classes] ** 2).sum(1)) * _largest_norm(w) + np.abs(b).max()
    certified = own - best > REL_TOL * bound
    if has_bias:  # the witness z = w_k must lie in the box
        certified &= np.abs(w[classes]).max(1) <= box
    return certified


def quick_certificate(weight: Any, bias: Any = None, chunk_size: int = 1024,
                      classes: Any = None, box: float = 100.0) -> np.ndarray:
    r"""Which ``classes`` (default all) win strictly at :math:`z = w_k`: a bool array.

    The logits :math:`w_i \cdot w_k + b_i` are the Gram matrix :math:`WW^\top` plus
    the bias, computed in float64 ``chunk_size`` rows at a time (for all classes, each
    panel from the diagonal on only: the transpose gives the rows below it, half the
    work; a panel holds at most ``chunk_size`` × C floats). With a bias :math:`w_k` must
    also lie in the box. A ``False`` decides nothing; the later stages do.
    """
    w, b, has_bias = _layer(weight, bias)
    return _quick(w, b, has_bias, _positive(box, "box"), _count(chunk_size, "chunk_size", 1),
                  _classes(classes, len(w)))


# -- stages 2 and 3 -------------------------------------------------------------------------

@dataclass
class Attempt:
    """One class through stage 2 or 3: ``argmaxable`` is True (with ``witness``), False
    (stage 3: unargmaxable) or None (stage 2 gave up). ``steps``: reflections (stage 2)
    or LP solves (stage 3); ``radius``: the Chebyshev radius (stage 3)."""

    argmaxable: bool | None
    witness: np.ndarray | None = field(default=None, repr=False)
    steps: int = 0
    radius: float | None = None


def _braid(w, b, has_bias, k, patience, box, largest_norm=None) -> Attempt:
    x = w[k].copy()
    largest_norm = _largest_norm(w) if largest_norm is None else largest_norm
    for step in range(patience + 1):
        lead, j, tolerance = _lead(w, b, x, k, largest_norm)
        if lead > tolerance:
            if not has_bias:
                x = _into_box(x, box)
            elif np.abs(x).max() > box:
                break
            _recheck(w, b, x, k, box, "braid_reflect", largest_norm)
            return Attempt(True, x, step)
        normal = w[k] - w[j]
        squared = normal @ normal
        if step == patience or squared == 0:  # out of patience, or a duplicate of w_k
            break
        x = x - 2 * (normal @ x + b[k] - b[j]) / squared * normal  # now k leads j
    return Attempt(None, steps=step)


def braid_reflect(weight: Any, bias: Any, k: int, patience: int = 100,
                  box: float = 100.0) -> Attempt:
    """Stage 2 for class ``k``: reflections from :math:`x = w_k` (module docstring)."""
    w, b, has_bias = _layer(weight, bias)
    return _braid(w, b, has_bias, _class(k, len(w)), _count(patience, "patience", 0),
                  _positive(box, "box"))


def _lp(w, b, k, box, min_radius, full) -> Attempt:
    from scipy.optimize import linprog

    d = w.shape[1]
    normals = w - w[k]  # constraint i: normals_i . x + |normals_i| r <= b_k - b_i
    lengths = np.sqrt((normals ** 2).sum(1))
    rhs = b[k] - b
    others = np.arange(len(w)) != k
    if (others & (lengths == 0) & (rhs <= 0)).any():  # a copy of w_k with as large a bias
        return Attempt(False)
    rows = np.flatnonzero(others & (lengths > 0))
    if not len(rows):  # only copies of w_k with smaller biases: k wins everywhere
        return Attempt(True, np.zeros(d), 0, math.inf)
    unit, rhs = normals[rows] / lengths[rows, None], rhs[rows] / lengths[rows]
    # Constraint generation: solve on the rows nearest to winning at w_k, add the rows
    # the optimum violates, repeat. Dropping rows only enlarges the region, so an
    # infeasible subproblem is exact, and an optimum that meets every row is the optimum.
    batch = len(rows) if full else min(len(rows), max(64, 2 * (d + 1)))
    active = np.argsort(unit @ np.clip(w[k], -box, box) - rhs)[-batch:]
    options = {"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9}
    bounds = [(-box, box)] * d + [(min_radius, None)]
    cost = np.zeros(d + 1)
    cost[-1] = -1.0  # maximise r
    for solves in range(1, len(rows) + 1):
        a = np.hstack([unit[active], np.ones((len(active), 1))])
        result = linprog(cost, A_ub=a, b_ub=rhs[active], bounds=bounds, method="highs",
                         options=options)
        if result.status == 2:
            return Attempt(False, steps=solves)
        if result.status != 0:
            raise RuntimeError(f"chebyshev_lp: HiGHS failed on class {k}: {result.message}")
        x, radius = result.x[:d], float(result.x[d])
        if radius <= 0:  # min_radius = 0: a region without interior has no strict winner
            return Attempt(False, steps=solves, radius=radius)
        slack = rhs - unit @ x - radius
        slack[active] = np.inf
        violated = np.flatnonzero(slack < 0)
        if not len(violated):
            _recheck(w, b, x, k, box, "chebyshev_lp")
            return Attempt(True, x, solves, radius)
        worst = violated[np.argsort(slack[violated])[:batch]]
        active = np.concatenate([active, worst])
    raise AssertionError("unreachable: every row is active after len(rows) solves")


def chebyshev_lp(weight: Any, bias: Any, k: int, box: float = 100.0,
                 min_radius: float = 1e-8, full: bool = False) -> Attempt:
    """Stage 3 for class ``k``: the exact LP with HiGHS (module docstring).

    The LP is solved by constraint generation (a few hundred of the ``C - 1`` rows at
    a time; ``full=True`` solves it with every row at once, the slow reference). A copy
    of :math:`w_k` with a bias at least :math:`b_k` makes :math:`k` unargmaxable outright.
    """
    w, b, _ = _layer(weight, bias)
    return _lp(w, b, _class(k, len(w)), _positive(box, "box"),
               _positive(min_radius, "min_radius", strict=False), bool(full))


# -- the whole layer ------------------------------------------------------------------------

@dataclass(eq=False)
class Certificate:
    """The outcome of :func:`certify`: ``status[k]`` is one of ``QUICK`` (0), ``BRAID``
    (1), ``LP`` (2): argmaxable by that stage; ``UNARGMAXABLE`` (3, by the LP);
    ``UNCHECKED`` (-1: ``lp=False`` and stage 2 gave up); ``SKIPPED`` (-2: not in
    ``classes``). ``witness``: a point where k wins, for stages 2 and 3 (stage 1's is
    w_k); ``steps``/``radius``: per class of stages 2 and 3; ``seconds``: per stage."""

    status: np.ndarray
    witness: dict[int, np.ndarray] = field(repr=False)
    steps: dict[int, int] = field(repr=False)
    radius: dict[int, float] = field(repr=False)
    seconds: dict[str, float]
    box: float

    @property
    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in STATUS_NAMES.items()}

    @property
    def unargmaxable(self) -> np.ndarray:
        return np.flatnonzero(self.status == UNARGMAXABLE)

    @property
    def uncertified(self) -> np.ndarray:
        return np.flatnonzero(self.status == UNCHECKED)

    @property
    def argmaxable(self) -> np.ndarray:
        return np.flatnonzero((self.status >= QUICK) & (self.status <= LP))

    def summary(self) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in self.counts.items() if n)
        seconds = ", ".join(f"{name} {s:.2f}s" for name, s in self.seconds.items())
        return f"{len(self.status)} classes: {counts} ({seconds})"


def certify(weight: Any, bias: Any = None, *, box: float = 100.0, min_radius: float = 1e-8,
            patience: int = 100, classes: Any = None, chunk_size: int = 1024, lp: bool = True,
            log: Callable[[str], None] | None = None) -> Certificate:
    """Decide which classes of a softmax layer can be its strict argmax: stages 1-3 of the
    module docstring, each on the classes the previous one left. ``weight`` (C, d) and
    ``bias`` (C,) or None: tensors or arrays. ``lp=False`` stops after stage 2."""
    w, b, has_bias = _layer(weight, bias)
    box, min_radius = _positive(box, "box"), _positive(min_radius, "min_radius", strict=False)
    patience, chunk_size = _count(patience, "patience", 0), _count(chunk_size, "chunk_size", 1)
    classes = _classes(classes, len(w))
    status = np.full(len(w), SKIPPED, dtype=np.int8)
    status[classes] = UNCHECKED
    out = Certificate(status, {}, {}, {}, {}, box)
    say = log or (lambda message: None)

    start = time.perf_counter()
    status[classes[_quick(w, b, has_bias, box, chunk_size, classes)]] = QUICK
    out.seconds["quick"] = time.perf_counter() - start
    say(f"quick certificate: {(status == QUICK).sum()} of {len(classes)} classes "
        f"({out.seconds['quick']:.1f}s)")
    largest_norm = _largest_norm(w)
    stages = [("braid", BRAID, lambda k: _braid(w, b, has_bias, k, patience, box, largest_norm))]
    if lp:
        stages.append(("lp", LP, lambda k: _lp(w, b, k, box, min_radius, False)))
    for name, code, attempt in stages:
        start = time.perf_counter()
        for k in map(int, np.flatnonzero(status == UNCHECKED)):
            result = attempt(k)
            out.steps[k] = result.steps
            if result.argmaxable:
                status[k], out.witness[k] = code, result.witness
            elif result.argmaxable is False:
                status[k] = UNARGMAXABLE
            if result.radius is not None:
                out.radius[k] = result.radius
        out.seconds[name] = time.perf_counter() - start
        say(f"{name}: {(status == code).sum()} argmaxable, {(status == UNARGMAXABLE).sum()} "
            f"unargmaxable, {(status == UNCHECKED).sum()} left ({out.seconds[name]:.1f}s)")
    return out


# -- Su's minimax view ----------------------------------------------------------------------

@dataclass
class HullDistance:
    """``distance``: Frank–Wolfe's :math:`\\lVert y\\rVert` (an upper bound on the distance
    from w_k to the hull of the others); ``lower``: :math:`\\max(0, \\min_i v_i\\cdot y)
    /\\lVert y\\rVert`, a lower bound (positive: z = y is a no-bias witness)."""

    distance: float
    lower: float
    iterations: int
    direction: np.ndarray = field(repr=False)


def convex_hull_distance(weight: Any, k: int, iterations: int = 1000) -> HullDistance:
    r"""Su's :math:`\min_{\alpha \in \Delta} \lVert \sum_{i \ne k} \alpha_i v_i \rVert`,
    :math:`v_i = w_k - w_i`, by Frank–Wolfe: from the nearest :math:`v_i`, step towards
    :math:`v_s`, :math:`s = \arg\min_i v_i \cdot y`, with the exact line search
    :math:`\gamma = \operatorname{clip}(y\cdot(y - v_s) / \lVert y - v_s\rVert^2, 0, 1)`;
    it stops early when the gap :math:`y\cdot(y - v_s)` is not positive (optimal)."""
    w, _, _ = _layer(weight, None)
    k, iterations = _class(k, len(w)), _count(iterations, "iterations", 0)
    v = np.delete(w[k] - w, k, axis=0)
    y = v[int((v * v).sum(1).argmin())].copy()
    done = 0
    while done < iterations:
        step = y - v[int((v @ y).argmin())]
        gap, squared = y @ step, step @ step
        if gap <= 0 or squared == 0:
            break
        y = y - min(1.0, gap / squared) * step
        done += 1
    distance = float(np.linalg.norm(y))
    lower = max(0.0, float((v @ y).min()) / distance) if distance > 0 else 0.0
    return HullDistance(distance, lower, done, y)
