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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
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

    def model(self, variant: str) -> MaskedLM:
        """The trained model of ``variant`` (eval mode)."""
        if variant == "absolute":
            return self.baseline.model
        model = build_variant(variant, self.baseline.model.config)
        load_weights(self.path / _folder(variant) / "model.safetensors", model)
        return model.eval()


def _folder(variant: str) -> str:
    return safe_name(variant)


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
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("positions", baseline.recipe.name, study_key(baseline.recipe))
    jobs = [(f"{_folder(variant)}/DONE", _train_variant, (recipe, cache_dir, variant))
            for variant in VARIANTS[1:]]
    built_now = build_study_entry(entry, jobs, lambda: {"variants": list(VARIANTS)},
                                  rebuild=rebuild, workers=workers, log=log)
    histories = {"absolute": baseline.history}
    for variant in VARIANTS[1:]:
        lines = (entry / _folder(variant) / "metrics.jsonl").read_text().splitlines()
        histories[variant] = [json.loads(line) for line in lines if line.strip()]
    return PositionStudy(histories, entry, baseline.recipe, built_now, baseline)


def _train_variant(recipe: str | BaselineRecipe, cache_dir, variant: str, staging: Path) -> str:
    """Train one variant (the study runs it with one CPU thread, in any worker layout)."""
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

# Chapter 3 draws the trained variants' attention, so CI builds the study in full (about
# six minutes) and the check compares every variant's history with the record.
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
        files=files, wall_seconds=seconds, sample=names, tolerance=TOLERANCE,
        directory=directory)


def check_position_study(recipe: str | BaselineRecipe = "cpu", *, cache_dir=None,
                         workers: int = 3, log=None, directory=None) -> list[str]:
    """Build (or find) the study and compare every variant's history with the record."""
    recipe = _baseline_recipe(recipe)
    record = records.read_record("positions", recipe.name, key=study_key(recipe),
                                 directory=directory)
    study = position_study(recipe, cache_dir=cache_dir, workers=workers, log=log)
    return records.check_files(record, records.read_entry_files(study.path, _record_files()))
