r"""The GAU study of chapter 6: character LMs on Tiny Shakespeare, as chapter 5's.

Two experiments, every model trained by the library's loop on the characters of
:func:`~tutorial_lib.studies.length.shakespeare_chars`, at ``train_length`` characters:

* **quality per update and per second** (causal LMs): a pre-LN RoPE Transformer of
  ``num_layers`` layers against a stack of ``2 · num_layers`` GAUs of the same width
  (relu²/n; about the same number of parameters: two GAUs ≈ one attention + FFN layer).
  Each run records its training loss at every log step with the seconds elapsed, its
  mean time per update, and the held-out next-character loss at the training length;
* **the normalisers across lengths** (bidirectional masked LMs, as Su's observation is
  about an MLM): four GAU stacks that differ only in the normaliser, relu²/n with n
  fixed at the training length, relu²/n with n the actual number of keys, softmax, and
  GAU-α's softmax with the log-n factor ``log max(n, 16) / log m`` (m the training
  length). Each is trained at ``m`` and scored (masked-character loss and accuracy) on
  held-out windows from ``m/4`` to ``4m``.

The GAUs use γ initialised to 1 (GAU-α's choice, ``offset_scale_init="ones"``): with
the paper's :math:`\mathcal N(0, 0.02)` and BERT's 0.02 weights, the relu² weights start
some eight orders of magnitude smaller at this width (chapter 6 measures it), and their
gradient :math:`2\,\mathrm{relu}(x)/n` with them.

``python -m tutorial_lib.studies gau --record`` writes the record chapter 6 reads; CI
re-runs one job (:data:`SAMPLE`) and compares it with the record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tutorial_lib import __version__, data
from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.core.model import build_model
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import models_cache_dir
from tutorial_lib.studies.harness import (COMPLETE, build_study_entry, check_workers, entry_name,
                                          write_json_atomic)
from tutorial_lib.studies.length import (CausalWindows, CharData, MaskedWindows, causal_scores,
                                         shakespeare_chars, test_windows)
from tutorial_lib.training.evaluation import fixed_mlm_batches, masked_lm_metrics
from tutorial_lib.training.loop import BatchLoader, count_shifted_targets, seed_everything, train


@dataclass(frozen=True)
class GAURecipe:
    """Shapes, training runs and evaluation of the study (see the module docstring)."""

    name: str = "cpu"
    train_length: int = 64
    hidden_size: int = 64
    num_layers: int = 2  # the Transformer's; the GAU stack has twice as many
    num_heads: int = 4  # the Transformer's heads
    intermediate_size: int = 256
    key_size: int = 16  # the GAU's s
    expansion: float = 2.0  # the GAU's e / d
    batch_size: int = 32
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    log_every: int = 25
    eval_tokens: int = 8192
    test_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    mask_probability: float = 0.15
    seeds: tuple[int, ...] = (0, 1)
    data_seed: int = 0

    def __post_init__(self):
        for name in ("train_length", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "key_size", "batch_size", "steps", "log_every",
                     "eval_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.key_size:
            raise ValueError(f"key_size ({self.key_size}) must divide hidden_size "
                             f"({self.hidden_size})")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an integer in [0, steps], got "
                             f"{self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if not self.test_factors or any(not f > 0 or (f * self.train_length) % 1
                                        for f in self.test_factors):
            raise ValueError(f"test_factors must be > 0 and give whole lengths, got "
                             f"{self.test_factors!r}")

    @property
    def test_lengths(self) -> list[int]:
        return [int(f * self.train_length) for f in self.test_factors]


GAU_RECIPES = {
    # About 12 minutes of one CPU core in all (two workers: about 6 minutes).
    "cpu": GAURecipe(),
    # Lab 6's GPU setting: train at 512, test to 4x (not run for the record).
    "gpu": GAURecipe(name="gpu", train_length=512, hidden_size=256, num_layers=4,
                     num_heads=4, intermediate_size=1024, key_size=64, batch_size=64,
                     steps=5000, lr=1e-3, warmup_steps=250, log_every=250,
                     eval_tokens=262144, seeds=(0,)),
}

# The masked LMs of the length experiment: name -> GAU options (m filled in by gau_options).
NORMALISER_ARMS = {
    "relu² / m (n fixed)": {"normaliser": "relu2", "normaliser_length": "m"},
    "relu² / n (actual n)": {"normaliser": "relu2"},
    "softmax": {"normaliser": "softmax"},
    "softmax, log n": {"normaliser": "softmax_plus", "logn_base": "m"},
}
CAUSAL_ARMS = ("transformer", "gau")


def gau_options(recipe: GAURecipe, arm: str) -> dict:
    """The ``extra["gau"]`` options of a GAU of the study (``arm``: a normaliser arm or
    ``"gau"``, the relu²/n stack of the speed comparison)."""
    options = {"expansion": recipe.expansion, "offset_scale_init": "ones"}
    values = {"normaliser": "relu2"} if arm == "gau" else NORMALISER_ARMS[arm]
    for key, value in values.items():
        options[key] = recipe.train_length if value == "m" else value
    return options


def model_config(recipe: GAURecipe, arm: str, vocab_size: int, causal: bool) -> TransformerConfig:
    """The config of one model of the study: ``"transformer"``, ``"gau"`` or a normaliser arm."""
    common = dict(vocab_size=vocab_size, hidden_size=recipe.hidden_size,
                  intermediate_size=recipe.intermediate_size,
                  max_position_embeddings=max(recipe.test_lengths), type_vocab_size=0,
                  causal=causal, norm_position="pre", hidden_dropout=0.0,
                  attention_dropout=0.0, layer_norm_eps=1e-5, position_embedding="none",
                  rotary=True)
    if arm == "transformer":
        return TransformerConfig(num_layers=recipe.num_layers, num_heads=recipe.num_heads,
                                 **common)
    if arm != "gau" and arm not in NORMALISER_ARMS:
        raise ValueError(f"arm must be 'transformer', 'gau' or one of "
                         f"{list(NORMALISER_ARMS)}, got {arm!r}")
    return TransformerConfig(num_layers=2 * recipe.num_layers,
                             num_heads=recipe.hidden_size // recipe.key_size, block="gau",
                             extra={"gau": gau_options(recipe, arm)}, **common)


def _fit(model, recipe: GAURecipe, chars: CharData, collate, seed: int, target_counter=None):
    generator = torch.Generator().manual_seed(recipe.data_seed * 1000 + seed)
    last_start = len(chars.train_ids) - recipe.train_length
    starts = torch.randint(0, last_start, (recipe.steps * recipe.batch_size,),
                           generator=generator).tolist()
    extra = {} if target_counter is None else {"target_counter": target_counter}
    loader = BatchLoader(starts, recipe.batch_size, collate, seed=seed, **extra)
    result = train(model, loader, steps=recipe.steps, lr=recipe.lr,
                   warmup_steps=recipe.warmup_steps, schedule="cosine", weight_decay=0.01,
                   seed=seed, device="cpu", progress=False, log_every=recipe.log_every)
    model.eval()
    return [{"step": row["step"], "loss": row["loss"], "elapsed_s": row["elapsed_s"]}
            for row in result.history if "loss" in row]


@torch.no_grad()
def masked_scores(model, recipe: GAURecipe, chars: CharData, length: int,
                  seed: int = 0) -> dict[str, float]:
    """Masked-character loss and accuracy on held-out windows of ``length`` characters."""
    count = max(1, recipe.eval_tokens // length)
    windows = [{"input_ids": row.tolist()} for row in test_windows(chars.test_ids, length, count)]
    batches = fixed_mlm_batches(windows, chars.mlm_collator(recipe.mask_probability),
                                batch_size=16, seed=seed)
    return masked_lm_metrics(model, batches)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_causal(recipe: GAURecipe, arm: str, seed: int, chars: CharData | None = None) -> dict:
    """Train one causal LM of the speed comparison; its curve, time per update, test loss."""
    chars = chars or shakespeare_chars()
    seed_everything(seed)
    model = build_model("causal-lm", model_config(recipe, arm, chars.vocab_size, causal=True))
    collate = CausalWindows(chars.train_ids, recipe.train_length, repeat_fraction=0.0)
    started = time.perf_counter()
    history = _fit(model, recipe, chars, collate, seed, count_shifted_targets)
    seconds = time.perf_counter() - started
    windows = test_windows(chars.test_ids, recipe.train_length,
                           recipe.eval_tokens // recipe.train_length)
    loss, accuracy = causal_scores(model, windows, None)
    # Per update from the loop's own clock, first log step to last (no start-up cost).
    first, last = history[0], history[-1]
    per_update = (last["elapsed_s"] - first["elapsed_s"]) / max(1, last["step"] - first["step"])
    return {"arm": arm, "seed": seed, "parameters": parameter_count(model), "history": history,
            "train_seconds": seconds, "seconds_per_update": per_update,
            "test_loss": loss, "test_accuracy": accuracy}


def run_masked(recipe: GAURecipe, arm: str, seed: int, chars: CharData | None = None) -> dict:
    """Train one masked-LM GAU of the normaliser experiment and score it at every length."""
    chars = chars or shakespeare_chars()
    seed_everything(seed)
    model = build_model("mlm", model_config(recipe, arm, chars.vocab_size, causal=False))
    collate = MaskedWindows(chars.train_ids, recipe.train_length,
                            chars.mlm_collator(recipe.mask_probability))
    started = time.perf_counter()
    history = _fit(model, recipe, chars, collate, seed)
    seconds = time.perf_counter() - started
    scores = [masked_scores(model, recipe, chars, n) for n in recipe.test_lengths]
    return {"arm": arm, "seed": seed, "parameters": parameter_count(model), "history": history,
            "train_seconds": seconds, "lengths": recipe.test_lengths,
            "loss": [s["mlm_loss"] for s in scores],
            "accuracy": [s["mlm_accuracy"] for s in scores]}


# -- the cached study ------------------------------------------------------------------


def _file(kind: str, arm: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in arm.replace("²", "2"))
    return f"runs/{kind}-{safe}-seed{seed}.json"


def _jobs(recipe: GAURecipe) -> list[tuple[str, str, int]]:
    jobs = [("causal", arm, seed) for seed in recipe.seeds for arm in CAUSAL_ARMS]
    return jobs + [("masked", arm, seed) for seed in recipe.seeds for arm in NORMALISER_ARMS]


def _run_job(recipe: GAURecipe, kind: str, arm: str, seed: int, out: Path) -> str:
    started = time.perf_counter()
    record = (run_causal if kind == "causal" else run_masked)(recipe, arm, seed)
    record["total_seconds"] = time.perf_counter() - started
    write_json_atomic(out / _file(kind, arm, seed), record)
    return f"{kind} {arm} seed {seed}: {record['total_seconds']:.0f} s"


def study_key(recipe: GAURecipe) -> str:
    """Cache key: the recipe, the arms, the data file and the library version."""
    entry = data.REGISTRY["tinyshakespeare/input.txt"]
    payload = json.dumps({"recipe": dataclasses.asdict(recipe),
                          "arms": {arm: gau_options(recipe, arm)
                                   for arm in ("gau", *NORMALISER_ARMS)},
                          "ids": "CharTokenizer(<pad>, <mask>, sorted alphabet)",
                          "masking": "MLMCollator (BERT 80/10/10)",
                          "data": entry.sha256 or entry.git_blob_sha1,
                          "tutorial_lib": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class GAUStudyResult:
    """The study's runs: ``causal[arm][seed]`` and ``masked[arm][seed]`` (the run files)."""

    recipe: GAURecipe
    causal: dict[str, dict[int, dict]]
    masked: dict[str, dict[int, dict]]
    path: Path
    built_now: bool

    def masked_metric(self, arm: str, key: str = "accuracy") -> torch.Tensor:
        """(seeds, lengths) of ``key`` for one normaliser arm."""
        if arm not in self.masked:
            raise ValueError(f"arm must be one of {list(self.masked)}, got {arm!r}")
        return torch.tensor([self.masked[arm][seed][key] for seed in sorted(self.masked[arm])])

    def causal_metric(self, arm: str, key: str) -> torch.Tensor:
        """(seeds,) of a number of the causal runs (``test_loss``, ``seconds_per_update``...)."""
        if arm not in self.causal:
            raise ValueError(f"arm must be one of {list(self.causal)}, got {arm!r}")
        return torch.tensor([float(self.causal[arm][seed][key])
                             for seed in sorted(self.causal[arm])])


def _result(recipe: GAURecipe, runs: dict[str, dict], path: Path, built_now: bool):
    causal: dict[str, dict[int, dict]] = {}
    masked: dict[str, dict[int, dict]] = {}
    for kind, arm, seed in _jobs(recipe):
        run = runs[_file(kind, arm, seed).removeprefix("runs/")]
        (causal if kind == "causal" else masked).setdefault(arm, {})[seed] = run
    return GAUStudyResult(recipe, causal, masked, path, built_now)


def _recipe(recipe: str | GAURecipe) -> GAURecipe:
    if isinstance(recipe, GAURecipe):
        return recipe
    if recipe not in GAU_RECIPES:
        raise ValueError(f"recipe must be one of {sorted(GAU_RECIPES)} or a GAURecipe, "
                         f"got {recipe!r}")
    return GAU_RECIPES[recipe]


def run_gau_study(recipe: str | GAURecipe = "cpu", *, cache_dir: str | Path | None = None,
                  rebuild: bool = False, workers: int = 2,
                  log: Callable[[str], None] | None = None) -> GAUStudyResult:
    """Train and evaluate every model of the study, or load its numbers from the cache."""
    recipe = _recipe(recipe)
    check_workers(workers)
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("gau", recipe.name, study_key(recipe))
    names = [_file(*job).removeprefix("runs/") for job in _jobs(recipe)]
    jobs = [(_file(*job), _run_job, (recipe, *job)) for job in _jobs(recipe)]
    built_now = build_study_entry(entry, jobs, lambda: {"runs": names}, rebuild=rebuild,
                                  workers=workers, log=log)
    runs = {name: json.loads((entry / "runs" / name).read_text()) for name in names}
    return _result(recipe, runs, entry, built_now)


# -- the committed record, and CI's check of it ----------------------------------------

# CI re-trains the first seed's GAU of the speed comparison (about 40 s on one thread).
SAMPLE = [("causal", "gau", 0)]
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def record_gau_study(recipe: str | GAURecipe = "cpu", *, cache_dir=None, rebuild: bool = False,
                     workers: int = 2, log=None, directory=None) -> Path:
    """Build (or find) the study and write its record."""
    recipe = _recipe(recipe)
    result = run_gau_study(recipe, cache_dir=cache_dir, rebuild=rebuild, workers=workers, log=log)
    names = json.loads((result.path / COMPLETE).read_text())["runs"]
    files = records.read_entry_files(result.path, [f"runs/{name}" for name in names] + [COMPLETE])
    wall = sum(run["total_seconds"] for name, run in files.items() if name != COMPLETE)
    return records.write_record(
        "gau", recipe.name, key=study_key(recipe),
        recipe={"recipe": dataclasses.asdict(recipe),
                "arms": {arm: gau_options(recipe, arm) for arm in ("gau", *NORMALISER_ARMS)}},
        data=records.data_checksums(["tinyshakespeare/input.txt"]), files=files,
        wall_seconds=wall, sample=[_file(*job) for job in SAMPLE], tolerance=TOLERANCE,
        directory=directory)


def load_gau_study(recipe: str | GAURecipe = "cpu", *, directory=None) -> GAUStudyResult:
    """The study's numbers from its committed record (refused if the code's recipe changed)."""
    recipe = _recipe(recipe)
    record = records.read_record("gau", recipe.name, key=study_key(recipe), directory=directory)
    runs = {name: record["files"][f"runs/{name}"] for name in record["files"][COMPLETE]["runs"]}
    return _result(recipe, runs, records.record_path("gau", recipe.name, directory), False)


def check_gau_study(recipe: str | GAURecipe = "cpu", *, directory=None, log=None) -> list[str]:
    """Re-run the record's sample and compare; return the problems (none: it agrees)."""
    recipe = _recipe(recipe)
    record = records.read_record("gau", recipe.name, key=study_key(recipe), directory=directory)
    jobs = [(_file(*job), _run_job, (recipe, *job)) for job in SAMPLE]
    return records.check_sample(record, jobs, log)
