"""Chapter 9's study: ladder side-tuning against full, last-layers and LoRA fine-tuning.

On chapter 1's footing (:mod:`.finetune`: all-MiniLM-L6-v2, SST-2's CPU recipe of 120
updates of 32 phrases of at most 12 words, the whole development set, the same seeds), each
method fine-tunes MiniLM with the same :func:`~tutorial_lib.training.loop.train`:

* ``full``: every parameter, at chapter 1's rate (5e-5); its seed 0 is chapter 1's ``plain``
  run, number for number;
* ``last layers``: only the last two of six layers and the head;
* ``LoRA (peft)``: rank-8 LoRA on the query and value projections, injected into the
  library's model by the ``peft`` package (the ecosystem's reference), and the head;
* ``LST``: the paper's gated ladder, r = 8, a side block at every layer
  (:class:`~tutorial_lib.techniques.ladder.LadderSideTuning`), random or Fisher-pruned
  initialisation;
* ``Su``: Su's variant (no gate, a side block at every third layer: 3 and 6, width d/6,
  four heads), random or pruned.

Per run the record keeps the development accuracy, the trainable parameters, the memory a
training step holds (:func:`~tutorial_lib.techniques.ladder.training_memory` on the run's
first batch: weights, gradients, Adam's two moments, saved activations), the time per
update (one CPU thread) and the training losses.

``python -m tutorial_lib.studies ladder --record`` writes the record; ``--check``
re-runs the first 18 updates of the pruned LST run of seed 0 (its Fisher
importance, its memory count and its first three logged losses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tutorial_lib import __version__, data
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import models_cache_dir
from tutorial_lib.studies.finetune import (MINILM, PRETRAINED_LR, SST2_RECIPES, SST2Data, Start,
                                           fine_tune_sst2, load_start, sst2_data, start_key)
from tutorial_lib.studies.harness import (COMPLETE, build_study_entry, check_workers, entry_name,
                                          safe_name, write_json_atomic)
from tutorial_lib.techniques import ladder
from tutorial_lib.training.evaluation import classification_metrics
from tutorial_lib.training.loop import BatchLoader, seed_everything

KINDS = ("full", "last layers", "lora", "lst", "su")
# The paper's scripts train LST at 3e-3 (T5-base); full fine-tuning keeps chapter 1's 5e-5.
# LoRA's usual rate is between them (1e-4 to 1e-3); we take 1e-3 as for LST's small modules.
LST_LR = 3e-3
LORA_LR = 1e-3


@dataclass(frozen=True)
class Method:
    """How a run builds its model: ``kind`` (one of :data:`KINDS`), its learning rate and
    its settings (its ``repr`` enters the study's cache key)."""

    kind: str
    lr: float
    init: str = "random"
    last_layers: int = 2
    lora_rank: int = 8
    reduction: int = 8
    fisher_batches: int = 8

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.init not in ladder.INITS:
            raise ValueError(f"init must be one of {ladder.INITS}, got {self.init!r}")

    def build(self, start: Start, sst2: SST2Data, pooling: str) -> nn.Module:
        """The model to train, drawn from the current random state."""
        model = start.classifier(pooling)
        if self.kind == "full":
            return model
        if self.kind == "last layers":
            model.requires_grad_(False)
            for module in list(model.encoder.layers)[-self.last_layers:] + [model.classifier]:
                module.requires_grad_(True)
            return model
        if self.kind == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(r=self.lora_rank, lora_alpha=2 * self.lora_rank, lora_dropout=0.1,
                                target_modules=["query", "value"])
            model = inject_adapter_in_model(config, model)  # freezes all but the adapters
            model.classifier.requires_grad_(True)
            return model
        importance = None
        if self.init == "pruned":
            importance = ladder.fisher_importance(model, fisher_batches(sst2, self.fisher_batches))
        if self.kind == "lst":
            return ladder.LadderSideTuning(model.encoder, reduction=self.reduction,
                                           pooling=pooling, init=self.init, importance=importance)
        return ladder.su_variant(model.encoder, pooling=pooling, init=self.init,
                                 importance=importance)


def fisher_batches(sst2: SST2Data, count: int) -> list[dict[str, torch.Tensor]]:
    """The pruning's data: the first ``count`` batches of 32 training phrases, in order."""
    return [sst2.collator(sst2.train[i * 32:(i + 1) * 32]) for i in range(count)]


METHODS: tuple[tuple[str, Method], ...] = (
    ("full", Method("full", PRETRAINED_LR)),
    ("last layers", Method("last layers", PRETRAINED_LR)),
    ("LoRA (peft)", Method("lora", LORA_LR)),
    ("LST", Method("lst", LST_LR)),
    ("LST pruned", Method("lst", LST_LR, init="pruned")),
    ("Su", Method("su", LST_LR)),
    ("Su pruned", Method("su", LST_LR, init="pruned")),
)
SEEDS = (0, 1, 2)
RECIPE = SST2_RECIPES["cpu"]  # chapter 1's; each method brings its own learning rate
NAME = "ladder"
SAMPLE = ("LST pruned", 0, 18)  # (method, seed, updates) that --check re-runs
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def study_key() -> str:
    """The cache key, from the code alone."""
    files = [data.REGISTRY[f"sst-2/{split}.tsv"] for split in ("train", "dev")]
    payload = json.dumps({"methods": [(name, repr(method)) for name, method in METHODS],
                          "seeds": SEEDS, "recipe": dataclasses.asdict(RECIPE),
                          "start": start_key(MINILM),
                          "data": [f.sha256 or f.git_blob_sha1 for f in files],
                          "tutorial_lib": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _run_file(method: str, seed: int) -> str:
    return f"{safe_name(method.lower())}-seed{seed}.json"


_LOADED: dict[str, Any] = {}


def _loaded() -> tuple[Start, SST2Data]:
    if not _LOADED:
        start = load_start(MINILM)
        _LOADED.update(start=start, sst2=sst2_data(RECIPE, start.tokenizer))
    return _LOADED["start"], _LOADED["sst2"]


def build(name: str, seed: int) -> nn.Module:
    """The model of ``(method name, seed)`` before training."""
    methods = dict(METHODS)
    if name not in methods:
        raise ValueError(f"method must be one of {list(methods)}, got {name!r}")
    start, sst2 = _loaded()
    seed_everything(seed)
    return methods[name].build(start, sst2, RECIPE.pooling)


def first_batch(seed: int) -> dict[str, torch.Tensor]:
    """The run's first training batch (its shape is SST-2's CPU batch: 32 phrases)."""
    _, sst2 = _loaded()
    batch = BatchLoader(sst2.train, RECIPE.batch_size, sst2.collator, seed=seed).next_batch()[0]
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _measure_and_train(name: str, seed: int, stop_after: int | None = None):
    """Build the run's model, count its step's memory, then train it. The count leaves
    the weights as they are, and :func:`train` seeds its own random state, so the
    training is that of a model never measured."""
    model = build(name, seed)
    memory = ladder.training_memory(model, first_batch(seed))
    _, sst2 = _loaded()
    recipe = dataclasses.replace(RECIPE, lr=dict(METHODS)[name].lr)
    trained = fine_tune_sst2(model, sst2, recipe, seed=seed, stop_after=stop_after)
    return model, memory, trained


def _run_one(name: str, seed: int, out: Path) -> str:
    model, memory, trained = _measure_and_train(name, seed)
    _, sst2 = _loaded()
    accuracy = classification_metrics(model, sst2.dev_batches)["accuracy"]
    run = {"method": name, "seed": seed, "accuracy": accuracy,
           "trainable_parameters": ladder.trainable_parameters(model),
           "parameters": sum(p.numel() for p in model.parameters()),
           "memory_bytes": memory, "seconds_per_step": trained["seconds_per_step"],
           "train_loss": [row["loss"] for row in trained["history"] if row.get("event") == "train"]}
    write_json_atomic(out / "runs" / _run_file(name, seed), run)
    return (f"{name:12s} seed {seed}: dev accuracy {accuracy:.3f}, "
            f"{memory['total'] / 2**20:.0f} MiB, {trained['seconds_per_step'] * 1000:.0f} ms/step")


def _entry(cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    return root / entry_name(NAME, RECIPE.name, study_key())


def run_ladder_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2, log=None):
    """Build (or find) every method × seed; return ``(runs, entry, built_now)``."""
    check_workers(workers)
    entry = _entry(cache_dir)
    names = [_run_file(name, seed) for seed in SEEDS for name, _ in METHODS]
    jobs = [(f"runs/{_run_file(name, seed)}", _run_one, (name, seed))
            for seed in SEEDS for name, _ in METHODS]

    def summary():
        return {"runs": names, "majority_rate": _loaded()[1].majority_rate}

    built_now = build_study_entry(entry, jobs, summary, rebuild=rebuild, workers=workers, log=log)
    runs = [json.loads((entry / "runs" / name).read_text()) for name in names]
    return runs, entry, built_now


def record_ladder_study(*, cache_dir=None, rebuild: bool = False, workers: int = 2, log=None,
                        directory=None) -> Path:
    runs, entry, _ = run_ladder_study(cache_dir=cache_dir, rebuild=rebuild, workers=workers,
                                      log=log)
    names = [f"runs/{_run_file(run['method'], run['seed'])}" for run in runs]
    files = records.read_entry_files(entry, names + [COMPLETE])
    seconds = sum(run["seconds_per_step"] * RECIPE.steps for run in runs)
    return records.write_record(
        NAME, RECIPE.name, key=study_key(),
        recipe={"methods": [(name, repr(method)) for name, method in METHODS],
                "seeds": list(SEEDS), "recipe": dataclasses.asdict(RECIPE)},
        data=records.data_checksums([f"sst-2/{split}.tsv" for split in ("train", "dev")]),
        files=files, wall_seconds=seconds, sample=[f"runs/{_run_file(*SAMPLE[:2])}"],
        tolerance=TOLERANCE, directory=directory)


def load_ladder_study(*, directory=None) -> dict[str, Any]:
    """The committed record: ``{"runs": [...], "majority_rate": ...}`` (refused if stale)."""
    record = records.read_record(NAME, RECIPE.name, key=study_key(), directory=directory)
    summary = record["files"][COMPLETE]
    return {"runs": [record["files"][f"runs/{name}"] for name in summary["runs"]],
            "majority_rate": summary["majority_rate"], "record": record}


def check_ladder_study(*, cache_dir=None, directory=None, log=None) -> list[str]:
    """Re-run the sample's first updates and its memory count; compare with the record."""
    record = records.read_record(NAME, RECIPE.name, key=study_key(), directory=directory)
    name, seed, updates = SAMPLE
    relpath = f"runs/{_run_file(name, seed)}"
    model, memory, trained = _measure_and_train(name, seed, stop_after=updates)
    every = max(RECIPE.steps // 20, 1)
    losses = [row["loss"] for row in trained["history"] if row.get("event") == "train"]
    expected = record["files"][relpath]
    if log:
        log(f"{name} seed {seed}, first {updates} updates: training losses "
            + " ".join(f"{loss:.4f}" for loss in losses)
            + f", {trained['seconds_per_step'] * 1000:.0f} ms/step")
    return records.check_files(
        {"files": {relpath: {"train_loss": expected["train_loss"][:updates // every],
                             "memory_bytes": expected["memory_bytes"],
                             "trainable_parameters": expected["trainable_parameters"]}},
         "tolerance": record["tolerance"]},
        {relpath: {"train_loss": losses, "memory_bytes": memory,
                   "trainable_parameters": ladder.trainable_parameters(model)}})
