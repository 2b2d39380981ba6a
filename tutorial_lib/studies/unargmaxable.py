"""Chapter 8's study: which classes of a softmax layer can never be its argmax?

Two parts, each decided exactly by :func:`tutorial_lib.techniques.unargmaxable.certify`
(quick certificate, braid reflect, then the Chebyshev LP with HiGHS for what is left):

* ``"random"``: random low-rank layers, no bias. Rows are random directions with
  log-normal norms, :math:`\\lVert w_i\\rVert = e^{\\sigma g_i}`, :math:`g_i` standard
  normal; for every dimension ``d`` of :data:`DIMS`, ratio ``C / d`` of :data:`RATIOS`
  and norm spread ``sigma`` of :data:`SPREADS`, :data:`SEEDS` layers: how many have an
  unargmaxable class, and how many classes are;
* ``"models"``: real output layers. all-MiniLM-L6-v2's tied word embeddings (30,522 ×
  384; the sentence encoder has no MLM head, so no bias), and the book's CPU baseline's
  MLM decoder (8,000 × 256, tied, with its output bias). The head's dense + activation +
  LayerNorm transform comes before the checked matrix and is not part of the check,
  as in the authors' protocol; the features it can produce are bounded by the box.

``python -m tutorial_lib.studies unargmaxable --record`` builds it and writes the record
chapter 8 reads. CI re-computes both models and the random grid of d = 8 (under a minute).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tutorial_lib import __version__
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import RECIPES, baseline_mlm, models_cache_dir
from tutorial_lib.studies.finetune import MINILM, load_start, minilm_package_version
from tutorial_lib.studies.harness import (build_study_entry, check_workers, entry_name,
                                          write_json_atomic)
from tutorial_lib.techniques.unargmaxable import STATUS_NAMES, certify

DIMS = (4, 8, 16)
RATIOS = (2, 8, 32)  # C / d
SPREADS = (0.0, 0.25, 0.5, 1.0)  # sigma of the log-normal row norms
SEEDS = (0, 1, 2, 3, 4)
BOX = 100.0
PATIENCE = 100
SAMPLE_DIM = 8
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def study_key() -> str:
    """The cache key, from the code alone: grids, settings, models, versions."""
    minilm_package = minilm_package_version()
    payload = json.dumps({"dims": DIMS, "ratios": RATIOS, "spreads": SPREADS, "seeds": SEEDS,
                          "box": BOX, "patience": PATIENCE, "baseline": RECIPES["cpu"].key(),
                          "minilm_package": minilm_package, "tutorial_lib": __version__},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def random_layer(classes: int, dim: int, spread: float, seed: int) -> np.ndarray:
    """(classes, dim) rows: uniform random directions with norms exp(spread * N(0, 1))."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(classes, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions * np.exp(spread * rng.normal(size=(classes, 1)))


def random_grid(dim: int) -> dict[str, Any]:
    """Every ratio, spread and seed of one dimension: unargmaxable counts and stages."""
    rows = []
    for ratio in RATIOS:
        for spread in SPREADS:
            for seed in SEEDS:
                layer = random_layer(ratio * dim, dim, spread, seed)
                result = certify(layer, box=BOX, patience=PATIENCE)
                rows.append({"dim": dim, "classes": ratio * dim, "spread": spread, "seed": seed,
                             "unargmaxable": int(len(result.unargmaxable)),
                             **{f"by_{name}": count for name, count in result.counts.items()
                                if name in ("quick", "braid", "lp")}})
    return {"rows": rows}


def output_layer(name: str, cache_dir=None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """The checked matrix, its bias (or None) and the tokenizer of ``name``."""
    if name == MINILM:
        start = load_start(MINILM)
        return start.encoder_state["embeddings.word_embeddings.weight"], None, start.tokenizer
    if name == "CPU baseline":
        model = baseline_mlm("cpu", cache_dir=cache_dir)
        return (model.model.encoder.embeddings.word_embeddings.weight.detach(),
                model.model.output_bias.detach(), model.tokenizer)
    raise ValueError(f"name must be {MINILM!r} or 'CPU baseline', got {name!r}")


def hf_output_layer(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checked matrix and bias of a Hugging Face model with an output layer, as the
    authors read them: ``get_output_embeddings()`` (for BERT's MLM head the tied decoder,
    after the head's transform) and its bias, or a translation model's
    ``final_logits_bias`` (Marian / opus-mt keep it apart from ``lm_head``)."""
    layer = model.get_output_embeddings()
    if layer is None:
        raise ValueError(f"model must have an output layer (get_output_embeddings()), "
                         f"got {type(model).__name__}")
    bias = getattr(layer, "bias", None)
    if bias is None and getattr(model, "final_logits_bias", None) is not None:
        bias = model.final_logits_bias.reshape(-1)
    return layer.weight.detach(), None if bias is None else bias.detach()


def certify_model(name: str, cache_dir=None) -> dict[str, Any]:
    """Certify every class of a model's output layer; the classes stages 1 missed, named."""
    weight, bias, tokenizer = output_layer(name, cache_dir)
    result = certify(weight, bias, box=BOX, patience=PATIENCE)
    beyond_quick = [int(k) for k in np.flatnonzero(result.status != 0)]
    return {"model": name, "classes": int(weight.shape[0]), "dim": int(weight.shape[1]),
            "bias": bias is not None, "counts": result.counts,
            "unargmaxable": [int(k) for k in result.unargmaxable],
            "beyond_quick": [{"id": k, "token": tokenizer.decode([k], skip_special_tokens=False),
                              "stage": STATUS_NAMES[int(result.status[k])],
                              "steps": int(result.steps.get(k, 0))} for k in beyond_quick],
            "seconds": {stage: round(s, 2) for stage, s in result.seconds.items()}}


def _file(part: str) -> str:
    return f"{part}.json"


PARTS = [f"random-d{dim}" for dim in DIMS] + ["minilm", "cpu-baseline"]
SAMPLE = [f"random-d{SAMPLE_DIM}", "minilm", "cpu-baseline"]


def _job(part: str, cache_dir, out: Path) -> str:
    started = time.perf_counter()
    if part.startswith("random-d"):
        result = random_grid(int(part.removeprefix("random-d")))
        line = f"{sum(row['unargmaxable'] > 0 for row in result['rows'])} layers with one"
    else:
        result = certify_model(MINILM if part == "minilm" else "CPU baseline", cache_dir)
        line = f"{result['counts']}"
    result["job_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / _file(part), result)
    return f"{part}: {line} ({result['job_seconds']:.0f} s)"


def run_unargmaxable_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                           log=None) -> tuple[dict[str, Any], Path, bool]:
    """Build (or find) the study's cache entry: ``(files, entry, built now)``."""
    check_workers(workers)
    baseline_mlm("cpu", cache_dir=cache_dir)  # before the workers
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("unargmaxable", "cpu", study_key())
    jobs = [(_file(part), _job, (part, cache_dir)) for part in PARTS]
    built_now = build_study_entry(entry, jobs, lambda: {"parts": PARTS}, rebuild=rebuild,
                                  workers=workers, log=log)
    files = records.read_entry_files(entry, [_file(part) for part in PARTS])
    return files, entry, built_now


def record_unargmaxable_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                              log=None, directory=None) -> Path:
    """Build (or find) the study and write its record."""
    files, _, _ = run_unargmaxable_study(cache_dir=cache_dir, rebuild=rebuild, workers=workers,
                                         log=log)
    return records.write_record(
        "unargmaxable", "cpu", key=study_key(),
        recipe={"dims": DIMS, "ratios": RATIOS, "spreads": SPREADS, "seeds": SEEDS, "box": BOX,
                "patience": PATIENCE, "models": [MINILM, "CPU baseline"],
                "baseline": RECIPES["cpu"].name},
        data=records.data_checksums(["wikitext-2/valid.txt", "wikitext-2/test.txt"]),
        files=files, wall_seconds=sum(f["job_seconds"] for f in files.values()),
        sample=[_file(part) for part in SAMPLE], tolerance=TOLERANCE, directory=directory)


def load_unargmaxable_study(*, directory=None) -> dict[str, Any]:
    """``{part: results}`` from the committed record (refused if the code changed)."""
    record = records.read_record("unargmaxable", "cpu", key=study_key(), directory=directory)
    return {part: record["files"][_file(part)] for part in PARTS}


def check_unargmaxable_study(*, cache_dir=None, directory=None, log=None) -> list[str]:
    """Re-compute the record's sample (both models, the grid of d = 8) and compare."""
    record = records.read_record("unargmaxable", "cpu", key=study_key(), directory=directory)
    jobs = [(_file(part), _job, (part, cache_dir)) for part in SAMPLE]
    return records.check_sample(record, jobs, log)
