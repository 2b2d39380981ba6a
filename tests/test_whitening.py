"""BERT-whitening (chapter 7) against an independent float64 NumPy rebuild.

References written here: the β, γ formula from its definition (the second moment
about βμ, ``np.linalg.eigh``), the authors' ``compute_kernel_bias`` (``np.cov`` and
``np.linalg.svd``), PCA by the SVD of the centred data, ``scipy.stats.spearmanr``.
Eigenvectors are defined up to sign, so columns are compared after aligning signs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tutorial_lib import Encoder, TransformerConfig
from tutorial_lib.data.tokenization import train_wordpiece
from tutorial_lib.techniques.whitening import (POOLINGS, Whitening, WhiteningStats,
                                               cosine_scores, encode_sentences, fit_whitening,
                                               pool, spearman)

N, D = 300, 6


@pytest.fixture(scope="module")
def x():
    """Anisotropic vectors with a large common mean, like BERT's."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(D, D)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.05])[:, None]
    return rng.normal(size=(N, D)) @ mixing + rng.normal(loc=4.0, size=D)


def aligned(got, expected):
    """``got`` with each column's sign flipped to agree with ``expected``'s."""
    got = np.asarray(got)
    return got * np.sign((got * expected).sum(axis=0))


def reference(x, beta, gamma, k):
    """x̃ = (x - βμ) U Λ^(-γ/2), first k columns, from the definition."""
    centred = x - beta * x.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(x))
    values, vectors = values[::-1], vectors[:, ::-1]
    return centred @ (vectors * values ** (-gamma / 2))[:, :k], values


def authors(x, k):
    """bojone/BERT-whitening compute_kernel_bias + transform (before normalising)."""
    mu = x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(np.cov(x.T))
    return (x - mu) @ (u @ np.diag(1 / np.sqrt(s)))[:, :k]


# -- the map ----------------------------------------------------------------------------------

def test_whitening_gives_identity_covariance(x):
    w = fit_whitening(x)
    assert isinstance(w, Whitening) and (w.beta, w.gamma, w.k, w.dim, w.count) == (1, 1, D, D, N)
    y = w.transform(torch.from_numpy(x))
    assert y.dtype == torch.float64 and y.shape == (N, D)
    y = y.numpy()
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(y.T @ y / N, np.eye(D), atol=1e-8)
    np.testing.assert_allclose(w.mean, x.mean(axis=0), atol=1e-12)


@pytest.mark.parametrize("k", [D, 3])
def test_ddof_1_reproduces_the_authors_code(x, k):
    expected = authors(x, k)
    got = fit_whitening(x, k=k, ddof=1).transform(x).numpy()
    np.testing.assert_allclose(aligned(got, expected), expected, atol=1e-9)
    normalised = fit_whitening(x, k=k, ddof=1).transform(x, normalize=True).numpy()
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(aligned(normalised, unit), unit, atol=1e-9)
    # The paper's 1/N differs by a global scale only: Σ shrinks by (N - 1) / N, so the
    # output grows by sqrt(N / (N - 1)).
    paper = fit_whitening(x, k=k).transform(x).numpy()
    np.testing.assert_allclose(paper, got * np.sqrt(N / (N - 1)), atol=1e-9)


def test_beta_gamma_zero_is_a_rotation(x):
    w = fit_whitening(x, beta=0.0, gamma=0.0)
    np.testing.assert_allclose(w.mean, 0)
    np.testing.assert_allclose(w.kernel.T @ w.kernel, np.eye(D), atol=1e-12)
    y = w.transform(x).numpy()
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    cosines = lambda v: (v / np.linalg.norm(v, axis=1, keepdims=True)) @ \
        (v / np.linalg.norm(v, axis=1, keepdims=True)).T  # noqa: E731
    np.testing.assert_allclose(cosines(y), cosines(x), atol=1e-12)
    # ... onto the eigenvectors of the raw second moment E[xᵀx].
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(aligned(w.kernel, vt.T), vt.T, atol=1e-9)


@pytest.mark.parametrize("k", [D, 2])
def test_beta_1_gamma_0_is_pca(x, k):
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:k].T
    got = fit_whitening(x, beta=1.0, gamma=0.0, k=k).transform(x).numpy()
    np.testing.assert_allclose(aligned(got, expected), expected, atol=1e-9)


@pytest.mark.parametrize("beta, gamma, k", [(0.5, 0.5, D), (0.5, 0.5, 3), (0.0, 1.0, D),
                                            (2.0, -0.5, 4), (1.0, 2.0, D)])
def test_general_beta_gamma_match_the_formula(x, beta, gamma, k):
    expected, values = reference(x, beta, gamma, k)
    w = fit_whitening(x, beta=beta, gamma=gamma, k=k)
    np.testing.assert_allclose(w.eigenvalues, values, rtol=1e-10)
    np.testing.assert_allclose(w.mean, beta * x.mean(axis=0), atol=1e-12)
    got = w.transform(x).numpy()
    np.testing.assert_allclose(aligned(got, expected), expected, rtol=1e-8, atol=1e-9)


def test_eigenvector_signs_are_fixed(x):
    kernel = fit_whitening(x, gamma=0.0).kernel
    largest = np.abs(kernel).argmax(axis=0)
    assert (kernel[largest, np.arange(D)] > 0).all()


def test_transform_dtypes_and_shapes(x):
    w = fit_whitening(x, k=4)
    as32 = torch.from_numpy(x).float()
    assert w.transform(as32).dtype == torch.float32
    assert w.transform(x).dtype == torch.float64  # NumPy float64
    assert w.transform(np.round(x).astype(np.int64)).dtype == torch.float32
    batched = w.transform(torch.from_numpy(x).reshape(3, N // 3, D))
    np.testing.assert_allclose(batched.reshape(N, 4).numpy(), w.transform(x).numpy())
    # Computed in float64, rounded once: within float32 rounding of the float64 result.
    np.testing.assert_allclose(w.transform(as32).numpy(),
                               w.transform(as32.double()).numpy(), rtol=1e-6, atol=1e-6)


# -- streaming statistics -----------------------------------------------------------------------

def test_streaming_statistics_equal_the_batch_ones(x):
    stats = WhiteningStats()
    pieces = []
    for index, (start, stop) in enumerate([(0, 1), (1, 8), (8, 8), (8, 150), (150, N)]):
        chunk = x[start:stop]
        if index % 2:  # float32 tensors: the statistics see the rounded values
            chunk = torch.from_numpy(chunk).float()
            pieces.append(chunk.double().numpy())
        else:
            pieces.append(chunk)
        assert stats.update(chunk) is stats
    seen = np.concatenate(pieces)
    assert stats.count == N and stats.dim == D
    np.testing.assert_allclose(stats.mean, seen.mean(axis=0), rtol=1e-13, atol=1e-13)
    for beta in (1.0, 0.0, 0.5, -1.5):
        centred = seen - beta * seen.mean(axis=0)
        np.testing.assert_allclose(stats.second_moment(beta), centred.T @ centred / N,
                                   rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(stats.second_moment(ddof=1), np.cov(seen.T), rtol=1e-11,
                               atol=1e-12)
    from_stats = fit_whitening(stats, beta=0.5, gamma=0.5, k=4)
    from_vectors = fit_whitening(seen, beta=0.5, gamma=0.5, k=4)
    np.testing.assert_allclose(from_stats.kernel, from_vectors.kernel, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="batch must have d=6"):
        stats.update(np.zeros((2, D + 1)))


def test_statistics_keep_their_digits_under_a_large_mean():
    """Raw sums would subtract two ~1e12 numbers to get an O(1) covariance."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 3)) + 1e6
    stats = WhiteningStats()
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    np.testing.assert_allclose(stats.second_moment(), np.cov(x.T, ddof=0), rtol=1e-8)


# -- pooling and encoding -------------------------------------------------------------------------

VOCAB = 60


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return Encoder(TransformerConfig.preset("tiny", vocab_size=VOCAB)).eval()


def mean_by_hand(hidden, lengths):
    return torch.stack([hidden[row, :length].mean(0) for row, length in enumerate(lengths)])


def padded_batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def test_mean_pooling_excludes_padding(encoder):
    lengths = [7, 3, 5]
    ids, mask = padded_batch(lengths)
    with torch.no_grad():
        state = encoder.encode(ids, mask, output_hidden_states=True)
        pooled = pool(state.all_hidden_states, mask, "mean")
        for row, length in enumerate(lengths):
            alone = encoder.encode(ids[row:row + 1, :length], output_hidden_states=True)
            expected = alone.hidden_states[0].mean(0)
            assert torch.allclose(pooled[row], expected, atol=1e-5)
            assert torch.allclose(pool(alone.all_hidden_states)[0], expected, atol=1e-6)


def test_first_last_avg_uses_the_first_layer_not_the_embeddings(encoder):
    lengths = [6, 2, 4]
    ids, mask = padded_batch(lengths, seed=1)
    with torch.no_grad():
        state = encoder.encode(ids, mask, output_hidden_states=True)
    hidden = state.all_hidden_states
    assert len(hidden) == encoder.config.num_layers + 1 == 3
    got = pool(hidden, mask, "first-last-avg")
    expected = (mean_by_hand(hidden[1], lengths) + mean_by_hand(hidden[-1], lengths)) / 2
    with_embeddings = (mean_by_hand(hidden[0], lengths) + mean_by_hand(hidden[-1], lengths)) / 2
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, with_embeddings, atol=1e-2)


def test_cls_pooling_takes_position_0_of_the_last_layer(encoder):
    ids, mask = padded_batch([4, 6])
    with torch.no_grad():
        state = encoder.encode(ids, mask, output_hidden_states=True)
    assert torch.equal(pool(state.all_hidden_states, mask, "cls"), state.hidden_states[:, 0])


def test_pool_refuses_bad_arguments(encoder):
    ids, mask = padded_batch([4, 6])
    with torch.no_grad():
        hidden = encoder.encode(ids, mask, output_hidden_states=True).all_hidden_states
    with pytest.raises(ValueError, match=r"pooling must be one of \('cls', 'mean', "
                                         r"'first-last-avg'\), got 'max'"):
        pool(hidden, mask, "max")
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        pool(hidden, mask[:, :3], "mean")
    with pytest.raises(ValueError, match="all_hidden_states"):
        pool(hidden[-1:], mask, "first-last-avg")
    with pytest.raises(ValueError, match="at least one token"):
        pool(hidden, torch.zeros_like(mask), "mean")


SENTENCES = ["the cat sat on the mat", "a dog", "the dog ate the hat on the mat today",
             "cats and dogs", "a cat"]


def test_encode_sentences_batches_by_length_and_keeps_the_order():
    tokenizer = train_wordpiece(SENTENCES * 2, vocab_size=80, min_frequency=1)
    torch.manual_seed(0)
    model = Encoder(TransformerConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    model.train()
    for pooling in POOLINGS:
        got = encode_sentences(model, tokenizer, SENTENCES, pooling=pooling, batch_size=2)
        assert got.dtype == torch.float32 and got.shape == (len(SENTENCES), 32)
        assert model.training  # restored
        model.eval()
        with torch.no_grad():
            for row, sentence in enumerate(SENTENCES):
                ids = torch.tensor([tokenizer.encode(sentence)])
                state = model.encode(ids, output_hidden_states=True)
                expected = pool(state.all_hidden_states, None, pooling)[0]
                assert torch.allclose(got[row], expected, atol=1e-5), (pooling, row)
        model.train()
    with pytest.raises(ValueError, match="batch_size"):
        encode_sentences(model, tokenizer, SENTENCES, batch_size=0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        encode_sentences(model, tokenizer, SENTENCES, pooling="pooler")


# -- scores -------------------------------------------------------------------------------------

def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    for a, b in [(rng.normal(size=40), rng.normal(size=40)),
                 (rng.integers(0, 5, 50).astype(float), rng.integers(0, 3, 50)),
                 (np.array([1.0, 2, 2, 3]), np.array([0.5, 0.5, 0.7, 0.1]))]:
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    a, b = torch.tensor([0.1, 0.4, 0.4, 0.9, 0.3]), torch.tensor([1.0, 3, 2, 5, 2])
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic)


def test_spearman_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert spearman(np.exp(a), b ** 3) == pytest.approx(spearman(a, b), abs=1e-12)
    assert spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="a is constant"):
        spearman(np.ones(4), np.arange(4))
    with pytest.raises(ValueError, match="same length"):
        spearman(np.arange(4), np.arange(5))


def test_cosine_scores():
    u, v = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(0))
    v[0] = 3 * u[0]
    got = cosine_scores(u, v)
    assert torch.allclose(got, F.cosine_similarity(u, v, dim=-1), atol=1e-6)
    assert got[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        cosine_scores(u, v[:, :2])


# -- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    (dict(beta=float("nan")), "beta must be a finite real"),
    (dict(beta=True), "beta must be a finite real"),
    (dict(beta="1"), "beta must be a finite real"),
    (dict(gamma=float("inf")), "gamma must be a finite real"),
    (dict(k=0), r"k must be an int in \[1, d=6\]"),
    (dict(k=D + 1), r"k must be an int in \[1, d=6\]"),
    (dict(k=2.0), r"k must be an int in \[1, d=6\]"),
    (dict(k=True), r"k must be an int in \[1, d=6\]"),
    (dict(ddof=-1), "ddof must be an int >= 0"),
    (dict(ddof=1.0), "ddof must be an int >= 0"),
])
def test_bad_parameters_are_refused_by_name(x, options, match):
    with pytest.raises(ValueError, match=match):
        fit_whitening(x, **options)


def test_bad_vectors_are_refused(x):
    with pytest.raises(ValueError, match=r"vectors must have shape \(n, d\)"):
        fit_whitening(x[0])
    with pytest.raises(ValueError, match=r"vectors must have shape \(n, d\) with d >= 1"):
        fit_whitening(np.zeros((5, 0)))
    with pytest.raises(ValueError, match="vectors must hold finite values"):
        fit_whitening(np.where(np.arange(D) == 2, np.nan, x))
    with pytest.raises(ValueError, match="vectors must hold real numbers"):
        fit_whitening(torch.ones(4, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="at least 2 vectors, got 1"):
        fit_whitening(x[:1])
    with pytest.raises(ValueError, match="at least 3 vectors, got 2"):
        fit_whitening(x[:2], ddof=2)
    with pytest.raises(ValueError, match="at least 1 vectors, got 0"):
        WhiteningStats().mean
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d=6\)"):
        fit_whitening(x).transform(x[:, :3])


def test_rank_deficient_vectors_need_a_smaller_k_for_gamma_above_0(x):
    few = x[:4]  # 4 centred points span 3 dimensions
    with pytest.raises(ValueError, match=r"k=6 keeps 3 direction\(s\) with a zero eigenvalue.*"
                                         r"use k <= 3"):
        fit_whitening(few)
    assert fit_whitening(few, k=3).k == 3
    assert fit_whitening(few, gamma=0.0).k == D  # nothing inverted: PCA is fine
    assert np.isfinite(fit_whitening(few, gamma=-0.5).kernel).all()
    with pytest.raises(ValueError, match="span only 0 dimension"):
        fit_whitening(np.ones((5, 3)), k=1)


def test_rcond_sets_which_eigenvalues_count_as_zero(x):
    from tutorial_lib.techniques.whitening import numerical_rank
    # A direction in which the vectors are constant up to float32-sized noise.
    noisy = np.concatenate([x, 1.0 + 1e-6 * np.random.default_rng(1).normal(size=(N, 1))], 1)
    fitted = fit_whitening(noisy, gamma=0.0)
    assert fitted.rank == D + 1  # float64's default: the noise is a real direction
    assert fit_whitening(noisy, gamma=0.0, rcond=1e-9).rank == D
    assert numerical_rank(fitted.eigenvalues, 1e-9) == D
    assert fit_whitening(noisy, k=D + 1).k == D + 1  # inverted under the default...
    with pytest.raises(ValueError, match=f"use k <= {D}"):
        fit_whitening(noisy, k=D + 1, rcond=1e-9)  # ...refused with rcond
    for bad in (-0.1, 1.0, float("nan"), "small"):
        with pytest.raises(ValueError, match="rcond"):
            fit_whitening(x, rcond=bad)


def test_encode_poolings_gives_each_pooling_of_one_pass():
    from tutorial_lib.techniques.whitening import encode_poolings
    tokenizer = train_wordpiece(SENTENCES * 2, vocab_size=80, min_frequency=1)
    torch.manual_seed(0)
    encoder = Encoder(TransformerConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    sentences = SENTENCES
    together = encode_poolings(encoder, tokenizer, sentences, POOLINGS, batch_size=3)
    for pooling in POOLINGS:
        alone = encode_sentences(encoder, tokenizer, sentences, pooling, batch_size=2)
        assert torch.allclose(together[pooling], alone, atol=1e-6), pooling
    with pytest.raises(ValueError, match="pooling"):
        encode_poolings(encoder, tokenizer, sentences, ("mean", "max"))


def test_the_study_s_evaluation_keeps_its_own_invariants():
    from tutorial_lib.data import load_stsb
    from tutorial_lib.studies import whitening as study
    pairs = len(load_stsb("test"))
    rng = np.random.default_rng(2)
    # Random vectors for the 2 x 1,379 test sentences: a cone (large mean), 40 dimensions,
    # one of them constant, as after a LayerNorm gain of zero.
    test = rng.normal(size=(2 * pairs, 40)) * np.linspace(3, 0.1, 40) + 5.0
    test[:, -1] = 0.7
    vectors = {"test": {pooling: torch.tensor(test, dtype=torch.float32) for pooling in POOLINGS}}
    results = study.evaluate(vectors, "test")
    for pooling in POOLINGS:
        r = results[pooling]
        assert r["dim"] == 40 and r["rank"] == 39
        assert np.array(r["grid"]).shape == (len(study.GRID), len(study.GRID))
        # beta = gamma = 0 keeps every cosine (the constant coordinate's direction holds
        # only the mean, which a rotation keeps too, so dropping it is the one change).
        assert abs(r["grid"][0][0] - r["none"]) < 0.5
        assert abs(r["anisotropy"]["whitened"]) < 0.05 and r["anisotropy"]["none"] > 0.5
        assert list(r["k"]["whitened"]) == ["16", "32"]  # the KS that fit in 39
