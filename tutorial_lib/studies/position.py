"""Chapter 3's pre-training study: four ways to tell a BERT where its tokens are.

Every variant is chapter 0's CPU baseline model (4 layers, hidden 256) trained by
the baseline's own recipe (:data:`tutorial_lib.studies.baseline.RECIPES` ``"cpu"``: 200
updates of 32 sequences of 64 tokens from WikiText-2's ``valid.txt``, masked-LM loss
and accuracy on 256 sequences of ``test.txt``; the offline copy of the data set has
no ``train.txt``), with the baseline's tokenizer, data order and seed. Only the way
positions enter differs:

* ``"absolute"``: learned absolute position embeddings added to the input (BERT).
  This *is* the cached baseline; it is not trained again.
* ``"relative bias"``: no input positions; a learned scalar per head and relative
  distance added to the scores (:class:`~tutorial_lib.techniques.deberta.RelativePositionBias`).
* ``"disentangled"``: no input positions; DeBERTa-v3's disentangled attention (c2p
  and p2c, shared keys, normalised relative table).
* ``"disentangled + EMD"``: the same, pre-trained through the enhanced mask decoder.

Both relative schemes use the same relative index: log buckets (``POSITION_BUCKETS``
over ``MAX_RELATIVE``), so distances up to 16 are exact and longer ones share rows.

``python -m tutorial_lib.studies.position`` runs the three new variants (in three worker
processes of one thread each: on two cores they finish together, sooner than two
workers followed by one) and caches their metrics and weights next to the
baseline, like :mod:`tutorial_lib.studies.finetune`; each finished variant is kept, so an
interrupted study resumes. :func:`position_study` returns the cached result.

The chapters do not build it: :func:`load_position_study` reads the variants' histories
from the committed record, and loads a variant's weights only when asked, from the
entry, from the weights CI's check keeps (it re-trains the disentangled variant, the one
chapter 3 and lab 3 load), or by training that one variant now.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutorial_lib import __version__
from tutorial_lib.training.checkpoint import load_weights
from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.techniques.deberta import EnhancedMaskDecoder, RelativePositionBias
from tutorial_lib.core.model import MaskedLM
from tutorial_lib.studies.baseline import (Baseline, BaselineRecipe, RECIPES, baseline_mlm, models_cache_dir,
                         pretrain_mlm)
from tutorial_lib.studies import records
from tutorial_lib.studies.harness import build_study_entry, check_workers, entry_name, safe_name
from tutorial_lib.training.loop import seed_everything

VARIANTS = ("absolute", "relative bias", "disentangled", "disentangled + EMD")
POSITION_BUCKETS = 32
MAX_RELATIVE = 64


def variant_config(variant: str, base: TransformerConfig) -> TransformerConfig:
    """The model config of ``variant``, from the baseline's ``base`` config."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "absolute":
        return base
    if variant == "relative bias":
        return dataclasses.replace(base, position_embedding="none")
    return dataclasses.replace(base, position_embedding="none", relative_attention=True,
                               pos_att_type=("c2p", "p2c"), position_buckets=POSITION_BUCKETS,
                               max_relative_positions=MAX_RELATIVE, share_att_key=True,
                               norm_rel_ebd="layer_norm")


def build_variant(variant: str, base: TransformerConfig) -> MaskedLM:
    """A fresh (randomly initialised) masked LM of ``variant``."""
    config = variant_config(variant, base)
    model = MaskedLM(config, sparse_prediction=True,
                     decoder=EnhancedMaskDecoder if variant == "disentangled + EMD" else None)
    if variant == "relative bias":
        model.encoder.add_attention_plugin(RelativePositionBias(
            config.num_heads, POSITION_BUCKETS, POSITION_BUCKETS, MAX_RELATIVE))
    return model


@dataclass
class PositionStudy:
    """Histories (the training loop's rows) and trained models of every variant."""

    histories: dict[str, list[dict[str, Any]]]
    path: Path
    recipe: BaselineRecipe
    built_now: bool
    baseline: Baseline

    def series(self, variant: str, key: str, event: str = "eval") -> tuple[list[int], list[float]]:
        rows = [r for r in self.histories[variant] if r.get("event") == event and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def final(self, variant: str) -> dict[str, float]:
        return [r for r in self.histories[variant] if r.get("event") == "eval"][-1]

    cache_dir: str | Path | None = None

    def model(self, variant: str) -> MaskedLM:
        """The trained model of ``variant`` (eval mode): from the study's entry where it
        was built, else from the weights CI's check keeps (:func:`variant_weights`), else
        trained now (a minute or two) and kept."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "absolute":
            return self.baseline.model
        model = build_variant(variant, self.baseline.model.config)
        path = self.path / _folder(variant) / "model.safetensors"
        if not path.exists():
            path = variant_weights(self.recipe, variant, self.cache_dir)
            if not path.exists():
                with tempfile.TemporaryDirectory() as scratch:
                    _train_variant(self.recipe, self.cache_dir, variant, Path(scratch))
                    _keep_weights(Path(scratch), self.recipe, variant, self.cache_dir)
        load_weights(path, model)
        return model.eval()


def _folder(variant: str) -> str:
    return safe_name(variant)


def _entry(recipe: BaselineRecipe, cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    return root / entry_name("positions", recipe.name, study_key(recipe))


def variant_weights(recipe: str | BaselineRecipe, variant: str, cache_dir=None) -> Path:
    """Where one variant's weights are kept outside a full build of the study (CI's check
    leaves the sampled variant's there, for chapter 3 and lab 3)."""
    entry = _entry(_baseline_recipe(recipe), cache_dir)
    return entry.with_name(entry.name + "-weights") / f"{_folder(variant)}.safetensors"


def _keep_weights(out: Path, recipe: BaselineRecipe, variant: str, cache_dir) -> None:
    # Move the weights a job wrote under ``out`` to variant_weights, in one rename.
    target = variant_weights(recipe, variant, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(out / _folder(variant) / "model.safetensors", staging)
    os.replace(staging, target)


def study_key(recipe: BaselineRecipe) -> str:
    """The study's cache key, computed from the code alone (no training)."""
    payload = json.dumps({"recipe": dataclasses.asdict(recipe), "baseline": recipe.key(),
                          "variants": VARIANTS, "buckets": POSITION_BUCKETS,
                          "max_relative": MAX_RELATIVE, "tutorial_lib": __version__},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def position_study(recipe: str | BaselineRecipe = "cpu", *,
                   cache_dir: str | Path | None = None, rebuild: bool = False, workers: int = 3,
                   log=None) -> PositionStudy:
    """Run (or load from the cache) the study for the baseline ``recipe`` (a name of
    :data:`~tutorial_lib.studies.baseline.RECIPES` or a recipe)."""
    if isinstance(recipe, str) and recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or a BaselineRecipe, "
                         f"got {recipe!r}")
    check_workers(workers)
    baseline = baseline_mlm(recipe, cache_dir=cache_dir)
    entry = _entry(baseline.recipe, cache_dir)
    jobs = [(f"{_folder(variant)}/DONE", _train_variant, (recipe, cache_dir, variant))
            for variant in VARIANTS[1:]]
    built_now = build_study_entry(entry, jobs, lambda: {"variants": list(VARIANTS)},
                                  rebuild=rebuild, workers=workers, log=log)
    histories = {"absolute": baseline.history}
    for variant in VARIANTS[1:]:
        lines = (entry / _folder(variant) / "metrics.jsonl").read_text().splitlines()
        histories[variant] = [json.loads(line) for line in lines if line.strip()]
    return PositionStudy(histories, entry, baseline.recipe, built_now, baseline, cache_dir)


def load_position_study(recipe: str | BaselineRecipe = "cpu", *, cache_dir=None,
                        directory=None) -> PositionStudy:
    """The study as the chapters use it: every variant's history from the committed
    record (refused if the code's recipe changed), the baseline from its cache (built
    if missing), and each variant's weights when :meth:`PositionStudy.model` asks."""
    recipe = _baseline_recipe(recipe)
    record = records.read_record("positions", recipe.name, key=study_key(recipe),
                                 directory=directory)
    baseline = baseline_mlm(recipe, cache_dir=cache_dir)
    histories = {"absolute": baseline.history}
    for variant in VARIANTS[1:]:
        histories[variant] = record["files"][f"{_folder(variant)}/metrics.jsonl"]
    return PositionStudy(histories, _entry(recipe, cache_dir), recipe, False, baseline,
                         cache_dir)


def _train_variant(recipe: str | BaselineRecipe, cache_dir, variant: str, staging: Path) -> str:
    """Train one variant (the study runs it with one CPU thread, in any worker layout;
    with more threads its numbers move by less than 1e-6)."""
    baseline = baseline_mlm(recipe, cache_dir=cache_dir)
    out = staging / _folder(variant)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    seed_everything(baseline.recipe.seed)
    model = build_variant(variant, baseline.model.config)
    pretrain_mlm(baseline.recipe, model, baseline.tokenizer, out)
    seconds = time.perf_counter() - started
    (out / "DONE").write_text(json.dumps({"seconds": round(seconds, 1)}))
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line][-1]
    return (f"{variant:20s}: test MLM loss {last['mlm_loss']:.3f}, accuracy "
            f"{last['mlm_accuracy']:.3f} ({seconds:.0f} s)")


# -- the committed record, and CI's check of it ----------------------------------------

# CI re-trains the variant chapter 3 and lab 3 load, disentangled attention, at full
# length (about 75 s on two threads), compares its history with the record and keeps
# its weights; the absolute variant is the baseline, which CI checks in full.
SAMPLE = ["disentangled"]
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def _baseline_recipe(recipe: str | BaselineRecipe) -> BaselineRecipe:
    if isinstance(recipe, BaselineRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or a BaselineRecipe, "
                         f"got {recipe!r}")
    return RECIPES[recipe]


def _record_files() -> list[str]:
    return [f"{_folder(variant)}/metrics.jsonl" for variant in VARIANTS[1:]]


def record_position_study(recipe: str | BaselineRecipe = "cpu", *, cache_dir=None,
                          rebuild: bool = False, workers: int = 3, log=None,
                          directory=None) -> Path:
    """Build (or find) the study and write its record."""
    recipe = _baseline_recipe(recipe)
    study = position_study(recipe, cache_dir=cache_dir, rebuild=rebuild, workers=workers,
                           log=log)
    names = _record_files()
    files = records.read_entry_files(study.path, names)
    seconds = sum(json.loads((study.path / _folder(v) / "DONE").read_text())["seconds"]
                  for v in VARIANTS[1:])
    return records.write_record(
        "positions", recipe.name, key=study_key(recipe),
        recipe={"recipe": dataclasses.asdict(recipe), "variants": list(VARIANTS),
                "position_buckets": POSITION_BUCKETS, "max_relative": MAX_RELATIVE},
        data=records.data_checksums([f"wikitext-2/{recipe.train_split}.txt",
                                     f"wikitext-2/{recipe.eval_split}.txt"]),
        files=files, wall_seconds=seconds,
        sample=[f"{_folder(variant)}/metrics.jsonl" for variant in SAMPLE], tolerance=TOLERANCE,
        directory=directory)


def check_position_study(recipe: str | BaselineRecipe = "cpu", *, cache_dir=None, log=None,
                         directory=None) -> list[str]:
    """Re-train the record's sample, compare its history with the record, keep its weights."""
    recipe = _baseline_recipe(recipe)
    record = records.read_record("positions", recipe.name, key=study_key(recipe),
                                 directory=directory)
    baseline_mlm(recipe, cache_dir=cache_dir)
    jobs = [(f"{_folder(variant)}/metrics.jsonl", _train_and_keep, (recipe, cache_dir, variant))
            for variant in SAMPLE]
    return records.check_sample(record, jobs, log)


def _train_and_keep(recipe: BaselineRecipe, cache_dir, variant: str, out: Path) -> str:
    line = _train_variant(recipe, cache_dir, variant, out)
    _keep_weights(out, recipe, variant, cache_dir)
    return line
