"""Chapter 4's scale study: what one perturbation size means in models of different scale.

Chapter 1's methods perturb raw embeddings; SiFT perturbs the normalised embedding sum
(:mod:`tutorial_lib.techniques.sift`). This study measures, for three encoders, how big
the embeddings are and how much a perturbation of a given size moves the encoder's
output:

* ``"minilm"``: all-MiniLM-L6-v2 (offline, from its package);
* ``"minilm-x10"``: the same model with its word, position and token-type tables
  multiplied by 10. The embedding LayerNorm undoes the factor, so it computes the same
  function (the study records how closely), yet its raw embeddings are 10 times longer;
* ``"cpu-baseline"``: the book's small CPU baseline, pre-trained from scratch.

On a fixed random subset of SST-2 development sentences, with the model in evaluation
mode, it records the median norms of the word embeddings and of the embedding sum, and
for each size the mean relative change of the mean-pooled output
``‖pool(h') − pool(h)‖ / ‖pool(h)‖`` under

* an FGM-style perturbation of the word embeddings: a random direction with L2 norm ε
  per sentence (:data:`RAW_EPSILONS`), the norm FGM's ε bounds;
* SiFT's initial noise on the normalised sum: ``clamp(N(0, σ²), ±2σ)`` per coordinate
  (:data:`SIFT_SIGMAS`).

``python -m tutorial_lib.studies sift-scale --record`` writes the record; CI re-computes
all of it (seconds).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from tutorial_lib import __version__, data
from tutorial_lib.data.batching import ClassificationCollator, classification_examples, model_inputs
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import RECIPES, baseline_mlm, models_cache_dir
from tutorial_lib.studies.finetune import MINILM, load_start, minilm_package_version
from tutorial_lib.studies.harness import (build_study_entry, check_workers, entry_name,
                                          write_json_atomic)
from tutorial_lib.techniques.adversarial import ascent_direction, forward_with, token_mask
from tutorial_lib.techniques.sift import forward_at, initial_delta, normalised_forward

MODELS = ("minilm", "minilm-x10", "cpu-baseline")
SCALE = 10.0  # the factor of "minilm-x10"
SENTENCES = 128
MAX_LENGTH = 64
RAW_EPSILONS = (0.03, 0.1, 0.3, 1.0)
SIFT_SIGMAS = (0.003, 0.01, 0.03, 0.1)
SEED = 0
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def study_key() -> str:
    """The cache key, from the code alone: models, sizes, sentences, versions."""
    payload = json.dumps({"models": MODELS, "scale": SCALE, "sentences": SENTENCES,
                          "max_length": MAX_LENGTH, "raw": RAW_EPSILONS, "sift": SIFT_SIGMAS,
                          "seed": SEED, "baseline": RECIPES["cpu"].key(),
                          "minilm_package": minilm_package_version(),
                          "data": data.REGISTRY["sst-2/dev.tsv"].sha256,
                          "tutorial_lib": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_model(name: str, cache_dir=None):
    """``(model, tokenizer)``: the encoder of ``name`` under a mean-pooling classifier
    (its head is not used), in evaluation mode."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    start = load_start(MINILM if name.startswith("minilm") else "cpu", cache_dir)
    torch.manual_seed(SEED)  # the unused head
    model = start.classifier("mean").eval()
    if name == "minilm-x10":
        scale_embeddings(model, SCALE)
    return model, start.tokenizer


@torch.no_grad()
def scale_embeddings(model, factor: float) -> None:
    """Multiply the word, position and token-type tables by ``factor``, in place."""
    embeddings = model.encoder.embeddings
    for table in (embeddings.word_embeddings, embeddings.position_embeddings,
                  embeddings.token_type_embeddings):
        if table is not None:
            table.weight.mul_(factor)


def sentences_batch(tokenizer) -> dict[str, torch.Tensor]:
    """:data:`SENTENCES` SST-2 development sentences (a fixed random subset), one batch."""
    pairs = data.load_sst2("dev")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SEED))[:SENTENCES]
    chosen = [pairs[i] for i in sorted(order.tolist())]
    examples = classification_examples([t for t, _ in chosen], [y for _, y in chosen],
                                       tokenizer, MAX_LENGTH)
    return ClassificationCollator(tokenizer.pad_id)(examples)


def _pooled(model, batch, hidden: torch.Tensor) -> torch.Tensor:
    return model.pool(hidden, batch["attention_mask"])


def _relative_change(model, batch, clean: torch.Tensor, output) -> float:
    moved = _pooled(model, batch, output.hidden_states)
    return ((moved - clean).norm(dim=-1) / clean.norm(dim=-1)).mean().item()


@torch.no_grad()
def measure(model, batch) -> dict[str, Any]:
    """Norms and output changes of one model on one batch (see the module's docstring)."""
    mask = token_mask(batch)
    real = batch["attention_mask"].bool()
    embeddings = model.encoder.embeddings
    words = embeddings.word_embeddings(batch["input_ids"])
    sums = []
    handle = embeddings.embedding_sum.register_forward_hook(lambda m, i, o: sums.append(o))
    try:
        clean_output = model(**model_inputs(batch))
    finally:
        handle.remove()
    clean = _pooled(model, batch, clean_output.hidden_states)
    normalised_output, x_hat = normalised_forward(model, batch)
    generator = torch.Generator().manual_seed(SEED)
    raw = []
    for epsilon in RAW_EPSILONS:
        direction = ascent_direction(torch.randn(words.shape, generator=generator) * mask, "l2")
        output = forward_with(model, batch, epsilon * direction, "word_embeddings")
        sentence_norms = (words * mask).flatten(1).norm(dim=1)
        raw.append({"epsilon": epsilon,
                    "relative_size": (epsilon / sentence_norms).median().item(),
                    "output_change": _relative_change(model, batch, clean, output)})
    sift = []
    for sigma in SIFT_SIGMAS:
        delta = initial_delta(x_hat.shape, sigma, generator=generator) * mask
        output = forward_at(model, batch, x_hat, delta)
        sift.append({"sigma": sigma,
                     "relative_size": (delta.norm(dim=-1)[real] / x_hat.norm(dim=-1)[real])
                     .median().item(),
                     "output_change": _relative_change(model, batch, clean, output)})
    return {"hidden_size": int(words.shape[-1]), "tokens": int(real.sum()),
            "word_norm_median": words.norm(dim=-1)[real].median().item(),
            "sum_norm_median": sums[0].norm(dim=-1)[real].median().item(),
            "x_hat_norm_median": x_hat.norm(dim=-1)[real].median().item(),
            "normalised_clean_max_diff": (normalised_output.hidden_states
                                          - clean_output.hidden_states).abs().max().item(),
            "raw": raw, "sift": sift}


def _file(name: str) -> str:
    return f"{name}.json"


def _job(name: str, cache_dir, out: Path) -> str:
    started = time.perf_counter()
    model, tokenizer = load_model("minilm" if name == "minilm-x10" else name, cache_dir)
    batch = sentences_batch(tokenizer)
    extra = {}
    if name == "minilm-x10":  # how closely the scaled copy computes the same function
        with torch.no_grad():
            before = model(**model_inputs(batch)).hidden_states
            scale_embeddings(model, SCALE)
            after = model(**model_inputs(batch)).hidden_states
        extra["max_diff_to_minilm"] = (after - before).abs().max().item()
    result = {"model": name, **measure(model, batch), **extra}
    result["job_seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / _file(name), result)
    return (f"{name}: word norm {result['word_norm_median']:.3f}, sum norm "
            f"{result['sum_norm_median']:.3f} ({result['job_seconds']:.0f} s)")


def run_scale_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                    log=None) -> tuple[dict[str, Any], Path, bool]:
    """Build (or find) the study's cache entry: ``(files, entry, built now)``."""
    check_workers(workers)
    baseline_mlm("cpu", cache_dir=cache_dir)  # before the workers
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("sift-scale", "cpu", study_key())
    jobs = [(_file(name), _job, (name, cache_dir)) for name in MODELS]
    built_now = build_study_entry(entry, jobs, lambda: {"models": list(MODELS)},
                                  rebuild=rebuild, workers=workers, log=log)
    return records.read_entry_files(entry, [_file(name) for name in MODELS]), entry, built_now


def record_scale_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2, log=None,
                       directory=None) -> Path:
    """Build (or find) the study and write its record."""
    files, _, _ = run_scale_study(cache_dir=cache_dir, rebuild=rebuild, workers=workers, log=log)
    return records.write_record(
        "sift-scale", "cpu", key=study_key(),
        recipe={"models": MODELS, "scale": SCALE, "sentences": SENTENCES,
                "max_length": MAX_LENGTH, "raw_epsilons": RAW_EPSILONS,
                "sift_sigmas": SIFT_SIGMAS, "seed": SEED, "baseline": RECIPES["cpu"].name},
        data=records.data_checksums(["sst-2/dev.tsv", "wikitext-2/valid.txt",
                                     "wikitext-2/test.txt"]),
        files=files, wall_seconds=sum(f["job_seconds"] for f in files.values()),
        sample=[_file(name) for name in MODELS], tolerance=TOLERANCE, directory=directory)


def load_scale_study(*, directory=None) -> dict[str, dict[str, Any]]:
    """``{model: measurements}`` from the committed record (refused if the code changed)."""
    record = records.read_record("sift-scale", "cpu", key=study_key(), directory=directory)
    return {name: record["files"][_file(name)] for name in MODELS}


def check_scale_study(*, cache_dir=None, directory=None, log=None) -> list[str]:
    """Re-compute the whole record (three models, seconds) and compare."""
    record = records.read_record("sift-scale", "cpu", key=study_key(), directory=directory)
    jobs = [(_file(name), _job, (name, cache_dir)) for name in MODELS]
    return records.check_sample(record, jobs, log)
