"""Unargmaxable classes (chapter 8) against independent references.

References written here: Qhull's convex hull (``scipy.spatial.ConvexHull``: without a
bias, class k is unargmaxable iff w_k is not a hull vertex), a brute-force grid over
the box in 2-D for the cases with a bias, and the logits recomputed at every witness.
Interior points are planted as convex combinations with positive weights of at least
d + 1 other rows, so they lie strictly inside (no point sits on the boundary).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.optimize
import torch
from scipy.optimize import nnls
from scipy.spatial import ConvexHull

from tutorial_lib.techniques.unargmaxable import (BRAID, LP, QUICK, SKIPPED, UNARGMAXABLE,
                                                  UNCHECKED, braid_reflect, certify,
                                                  chebyshev_lp, convex_hull_distance,
                                                  is_strict_argmax, quick_certificate)


def planted(d: int, count: int, inside: int, seed: int) -> np.ndarray:
    """``count`` Gaussian rows in R^d, the first ``inside`` replaced by points strictly
    inside the hull of the last ``count - inside`` rows."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((count, d))
    for k in range(inside):
        w[k] = rng.dirichlet(np.ones(count - inside)) @ w[inside:]
    return w


def hull_interior(w: np.ndarray) -> np.ndarray:
    return np.setdiff1d(np.arange(len(w)), ConvexHull(w).vertices)


def wins(w: np.ndarray, b: np.ndarray | None, z: np.ndarray, k: int) -> bool:
    """Class k is the strict argmax at z, recomputed here."""
    logits = w @ z + (0 if b is None else b)
    return bool(logits[k] > np.delete(logits, k).max())


def grid_winners(w: np.ndarray, b: np.ndarray, box: float, steps: int = 401) -> set[int]:
    """The classes that are the strict argmax somewhere on a grid over the 2-D box."""
    axis = np.linspace(-box, box, steps)
    z = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    logits = z @ w.T + b
    top = np.sort(logits, axis=1)
    strict = top[:, -1] > top[:, -2]
    return set(np.unique(logits.argmax(1)[strict]).tolist())


CASES = [(2, 20, 3, 0), (3, 30, 4, 1), (5, 40, 5, 2), (8, 60, 6, 3)]


@pytest.mark.parametrize("d, count, inside, seed", CASES)
def test_certify_matches_the_convex_hull(d, count, inside, seed):
    w = planted(d, count, inside, seed)
    interior = hull_interior(w)
    assert set(range(inside)) <= set(interior.tolist())
    certificate = certify(w)
    np.testing.assert_array_equal(certificate.unargmaxable, interior)
    assert len(certificate.uncertified) == 0
    assert set(certificate.argmaxable.tolist()) == set(ConvexHull(w).vertices.tolist())
    counts = certificate.counts
    assert sum(counts[name] for name in ("quick", "braid", "lp", "unargmaxable")) == count
    for k, z in certificate.witness.items():  # stages 2 and 3, re-checked here
        assert certificate.status[k] in (BRAID, LP) and wins(w, None, z, k)
        assert np.abs(z).max() <= 100.0 * (1 + 1e-12)
    for k in np.flatnonzero(certificate.status == QUICK):
        assert wins(w, None, w[k], k)
    assert set(certificate.seconds) == {"quick", "braid", "lp"}
    assert f"{count} classes" in certificate.summary()


@pytest.mark.parametrize("d, count, inside, seed", CASES[:3])
def test_lp_alone_agrees_with_the_hull_for_every_class(d, count, inside, seed):
    w = planted(d, count, inside, seed)
    interior = set(hull_interior(w).tolist())
    for k in range(count):
        result = chebyshev_lp(w, None, k)
        assert result.argmaxable is (k not in interior), k
        if result.argmaxable:
            assert wins(w, None, result.witness, k) and result.radius >= 1e-8
            full = chebyshev_lp(w, None, k, full=True)  # every constraint at once
            assert full.argmaxable and full.radius == pytest.approx(result.radius, rel=1e-6)


def test_the_lp_stage_certifies_what_the_braid_leaves():
    w = planted(3, 40, 4, 4)
    certificate = certify(torch.tensor(w, dtype=torch.float64), patience=0)
    assert (certificate.status == LP).sum() > 0
    assert (certificate.status == BRAID).sum() == 0  # patience 0: only x = w_k, stage 1's
    np.testing.assert_array_equal(certificate.unargmaxable, hull_interior(w))
    for k in np.flatnonzero(certificate.status == LP):
        assert wins(w, None, certificate.witness[k], k) and certificate.radius[k] > 0


def test_braid_reflect_never_certifies_an_unargmaxable_class():
    for d, count, inside, seed in CASES:
        w = planted(d, count, inside, seed)
        for k in hull_interior(w):
            result = braid_reflect(w, None, int(k), patience=2500)
            assert result.argmaxable is None and result.witness is None
        easy = [k for k in ConvexHull(w).vertices if not wins(w, None, w[k], k)]
        for k in easy:  # the vertices stage 1 misses: reflections find a witness
            result = braid_reflect(w, None, int(k), patience=100)
            assert result.argmaxable and wins(w, None, result.witness, int(k)), k
            assert 1 <= result.steps <= 100


def test_lp_false_leaves_the_hard_classes_unchecked():
    w = planted(3, 30, 4, 1)
    certificate = certify(w, lp=False)
    np.testing.assert_array_equal(certificate.uncertified, hull_interior(w))
    assert len(certificate.unargmaxable) == 0 and "lp" not in certificate.seconds
    assert (certificate.status == UNCHECKED).sum() == certificate.counts["unchecked"]


def test_classes_selects_a_subset():
    w = planted(5, 40, 5, 2)
    whole = certify(w)
    chosen = [0, 3, 17, 39]
    part = certify(w, classes=np.array(chosen))
    assert (part.status == SKIPPED).sum() == 36
    np.testing.assert_array_equal(part.status[chosen], whole.status[chosen])


@pytest.mark.parametrize("with_bias", [False, True])
def test_quick_certificate_is_the_same_in_any_blocks(with_bias):
    rng = np.random.default_rng(5)
    w = planted(4, 50, 5, 5)
    b = rng.normal(scale=0.3, size=50) if with_bias else None
    expected = [wins(w, b, w[k], k) for k in range(50)]
    for chunk_size in (1, 7, 50, 1024):
        np.testing.assert_array_equal(quick_certificate(w, b, chunk_size), expected)
    chosen = np.array([2, 9, 30, 49])
    np.testing.assert_array_equal(quick_certificate(w, b, 3, classes=chosen),
                                  np.array(expected)[chosen])


def test_equal_norms_are_all_certified_by_the_quick_certificate():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((500, 16))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    certificate = certify(torch.tensor(w, dtype=torch.float32))
    assert (certificate.status == QUICK).all() and not certificate.witness


def triangle() -> np.ndarray:
    """Three unit rows 120 degrees apart."""
    angles = np.deg2rad([90.0, 210.0, 330.0])
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def test_a_large_negative_bias_makes_a_class_unargmaxable_in_the_box():
    w = triangle()
    # max over the box of (w_2 - w_0) . z is about 100 * (|1.5| + |0.87|) = 237 < 1000.
    b = np.array([0.0, 0.0, -1000.0])
    certificate = certify(w, b)
    np.testing.assert_array_equal(certificate.unargmaxable, [2])
    assert certificate.status[2] == UNARGMAXABLE and not is_strict_argmax(w, b, w[2], 2)
    assert grid_winners(w, b, 100.0) == {0, 1}
    assert certify(w, b, box=1000.0).unargmaxable.size == 0  # a larger box: it wins
    b = np.array([0.0, 0.0, -10.0])  # a mild bias: it still wins in the box
    certificate = certify(w, b)
    assert certificate.unargmaxable.size == 0 and grid_winners(w, b, 100.0) == {0, 1, 2}
    for k, z in certificate.witness.items():
        assert wins(w, b, z, k) and np.abs(z).max() <= 100.0


def test_a_positive_bias_makes_an_interior_class_argmaxable():
    w = np.vstack([triangle(), [[0.2, 0.1]]])  # class 3 inside the triangle
    assert list(certify(w).unargmaxable) == [3]
    for bias_3, argmaxable in [(0.5, True), (0.0, False), (-0.2, False)]:
        b = np.array([0.0, 0.0, 0.0, bias_3])
        assert (3 in grid_winners(w, b, 100.0)) is argmaxable
        assert (3 not in certify(w, b).unargmaxable) is argmaxable
        result = chebyshev_lp(w, b, 3)
        assert result.argmaxable is argmaxable
        if argmaxable:
            assert wins(w, b, result.witness, 3)


def test_duplicate_rows_cannot_both_win():
    w = planted(3, 12, 0, 7)
    w[1] = w[0]
    assert {0, 1} <= set(certify(w).unargmaxable.tolist())
    b = np.zeros(12)
    b[0] = 0.1  # the copy with the larger bias always beats the other one
    certificate = certify(w, b)
    assert 1 in certificate.unargmaxable and 0 not in certificate.unargmaxable


def test_is_strict_argmax_needs_a_strict_lead():
    w = triangle()
    assert is_strict_argmax(w, None, w[0], 0)
    assert not is_strict_argmax(w, None, np.zeros(2), 0)  # a three-way tie
    assert not is_strict_argmax(w, None, w[1], 0)


def hull_distance(w: np.ndarray, k: int) -> float:
    """min over the simplex of |sum_i a_i (w_k - w_i)|, by NNLS with the constraint
    sum a = 1 as a heavily weighted extra row."""
    v = np.delete(w[k] - w, k, axis=0)
    weight = 1e4
    system = np.vstack([v.T, np.full(len(v), weight)])
    alpha, _ = nnls(system, np.r_[np.zeros(w.shape[1]), weight])
    return float(np.linalg.norm(v.T @ alpha))


@pytest.mark.parametrize("d, count, inside, seed", CASES)
def test_frank_wolfe_distance_agrees_with_the_hull(d, count, inside, seed):
    w = planted(d, count, inside, seed)
    interior = set(hull_interior(w).tolist())
    for k in range(count):
        result = convex_hull_distance(w, k, iterations=2000)
        exact = hull_distance(w, k)
        assert result.lower - 1e-6 <= exact <= result.distance + 1e-6, (k, result, exact)
        if k in interior:  # ≈ 0 (Frank–Wolfe converges linearly to an interior optimum)
            assert result.lower == 0.0 and result.distance < 1e-3, (k, result)
        else:  # > 0 (plain Frank–Wolfe is slow on a face: within a factor 2 here)
            assert 1e-3 < result.distance <= 2 * exact, (k, result, exact)
            if result.lower > 0:  # then y separates w_k from the others
                assert wins(w, None, result.direction, k)


def test_frank_wolfe_distance_of_a_simple_case():
    w = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    result = convex_hull_distance(w, 3)  # from (3, 3) to the segment (2, 0)-(0, 2)
    assert result.distance == pytest.approx(2 * np.sqrt(2))
    assert result.lower == pytest.approx(2 * np.sqrt(2))


@pytest.mark.parametrize("call, match", [
    (lambda: certify(np.ones(4)), "weight"),
    (lambda: certify(np.ones((1, 3))), "weight"),
    (lambda: certify(np.ones((3, 0))), "weight"),
    (lambda: certify(np.array([[1.0, np.nan], [0.0, 1.0]])), "weight"),
    (lambda: certify(np.eye(3), np.ones(2)), "bias"),
    (lambda: certify(np.eye(3), np.ones((3, 1))), "bias"),
    (lambda: certify(np.eye(3), box=0.0), "box"),
    (lambda: certify(np.eye(3), box=float("inf")), "box"),
    (lambda: certify(np.eye(3), min_radius=-1.0), "min_radius"),
    (lambda: certify(np.eye(3), patience=1.5), "patience"),
    (lambda: certify(np.eye(3), patience=-1), "patience"),
    (lambda: certify(np.eye(3), chunk_size=0), "chunk_size"),
    (lambda: certify(np.eye(3), classes=[0, 3]), "classes"),
    (lambda: certify(np.eye(3), classes=[0.5]), "classes"),
    (lambda: braid_reflect(np.eye(3), None, 3), "k"),
    (lambda: chebyshev_lp(np.eye(3), None, -1), "k"),
    (lambda: convex_hull_distance(np.eye(3), 0, iterations=-1), "iterations"),
    (lambda: is_strict_argmax(np.eye(3), None, np.ones(2), 0), "z"),
])
def test_validation_names_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_witness_that_fails_the_recheck_raises(monkeypatch):
    w = planted(3, 30, 4, 1)
    vertex = int(ConvexHull(w).vertices[0])

    def wrong(cost, **kwargs):  # claims the origin is the centre of a ball of radius 1
        return SimpleNamespace(status=0, x=np.r_[np.zeros(len(cost) - 1), 1.0], message="")

    monkeypatch.setattr(scipy.optimize, "linprog", wrong)
    with pytest.raises(RuntimeError, match="fails the re-check"):
        chebyshev_lp(w, None, vertex)


def test_the_study_s_random_layers_have_the_stated_norm_spread():
    from tutorial_lib.studies.unargmaxable import random_layer
    equal = random_layer(200, 8, 0.0, seed=0)
    assert np.allclose(np.linalg.norm(equal, axis=1), 1.0)
    spread = np.log(np.linalg.norm(random_layer(4000, 8, 0.5, seed=1), axis=1))
    assert abs(spread.std() - 0.5) < 0.03 and abs(spread.mean()) < 0.03
    assert not np.array_equal(random_layer(10, 4, 0.5, 0), random_layer(10, 4, 0.5, 1))


def test_hugging_face_output_layers_are_read_with_their_bias():
    transformers = pytest.importorskip("transformers")
    from tutorial_lib.studies.unargmaxable import hf_output_layer
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16)).eval()
    with torch.no_grad():
        bert.cls.predictions.decoder.bias.normal_()
    weight, bias = hf_output_layer(bert)
    assert weight.shape == (40, 8) and torch.equal(weight, bert.bert.embeddings.word_embeddings.weight)
    assert torch.equal(bias, bert.cls.predictions.decoder.bias)
    marian = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=30, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=29,
        decoder_start_token_id=29)).eval()
    with torch.no_grad():
        marian.final_logits_bias.normal_()
    weight, bias = hf_output_layer(marian)
    assert weight.shape == (30, 8) and torch.equal(bias, marian.final_logits_bias[0])
    # The layer's logits are what the model computes from its last hidden state.
    hidden = torch.randn(3, 8)
    assert torch.allclose(hidden @ weight.T + bias, marian.lm_head(hidden) + marian.final_logits_bias)
    assert certify(weight, bias).status.shape == (30,)
    with pytest.raises(ValueError, match="output layer"):
        hf_output_layer(transformers.BertModel(bert.config))
