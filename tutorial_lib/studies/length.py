r"""The length-extrapolation study of chapter 5: train short, test long, on real text.

A small character-level model is trained on Tiny Shakespeare at one length ``m``
and evaluated on held-out text at ``m, 2m, 4m, ...``. Every position method is an
option of the shared model (:mod:`tutorial_lib.techniques.extrapolation`); what is trained
separately is only what needs its own weights:

* causal LMs with learned absolute positions, sinusoidal positions, RoPE, ALiBi,
  and RoPE trained on random sorted positions from ``[0, L)`` (Ruoss et al., 2023);
  RoPE with extra seeds, to measure the seed-to-seed spread;
* a bidirectional RoPE masked LM, for Su's entropy-invariance (log-n) experiment.

Everything else is switched on the trained RoPE model at inference with
:func:`~tutorial_lib.core.model.position_options`: sliding windows (the "super
baseline"), log-n scaling, NTK-aware base scaling (factor ``n/m``), ReRoPE.

The characters are ids of the library's :class:`~tutorial_lib.data.tokenization.CharTokenizer`,
the masked LM is trained and scored with its :class:`~tutorial_lib.data.batching.MLMCollator`
and :func:`~tutorial_lib.training.evaluation.masked_lm_metrics`, and every model is
trained by the library's loop.

Two test sets are cut from the last tenth of the text, which no model trains on:
*natural* windows of ``n`` characters, and *repeated* ones, ``n/2`` characters
followed by themselves, scored on the second half, which a model can predict
perfectly only by looking back ``n/2`` positions. So that the models learn to copy
at all, a fraction ``repeat_fraction`` of the training windows are repeated the
same way (at the training length, so the look-back never exceeds ``m/2``).

:func:`run_length_study` trains and evaluates everything, writing each finished
run to disk at once (an interrupted study resumes) and caching the numbers (no
weights) next to the book's baseline, like :mod:`tutorial_lib.studies.finetune`.
``python -m tutorial_lib.studies length --record`` writes the record chapter 5 reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tutorial_lib import __version__, data
from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.techniques.extrapolation import evenly_spaced_positions, random_positions
from tutorial_lib.core.model import CausalLM, MaskedLM, position_options
from tutorial_lib.data.batching import MLMCollator
from tutorial_lib.data.tokenization import CharTokenizer
from tutorial_lib.training.evaluation import fixed_mlm_batches, masked_lm_metrics
from tutorial_lib.studies import records
from tutorial_lib.studies.baseline import models_cache_dir
from tutorial_lib.studies.harness import (COMPLETE, build_study_entry, check_workers, entry_name,
                                          write_json_atomic)
from tutorial_lib.training.loop import BatchLoader, count_shifted_targets, seed_everything, train

# -- recipe ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthRecipe:
    """The model shape, the training run and the evaluation of the study.

    ``position_range`` is ``L`` of random-position training (the positions the
    model may meet at test time); ``test_factors`` multiply ``train_length``.
    ``eval_tokens`` characters are scored at every test length (so fewer, longer
    sequences at longer lengths).
    """

    name: str = "cpu"
    train_length: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 60
    repeat_fraction: float = 0.25
    test_factors: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_tokens: int = 8192
    position_range: int = 1024
    mlm_steps: int = 300
    mask_probability: float = 0.15
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0

    def __post_init__(self):
        for name in ("train_length", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "batch_size", "steps", "eval_tokens",
                     "position_range", "mlm_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.train_length < 4 or self.train_length % 4:
            raise ValueError(f"train_length must be a multiple of 4 (>= 4), got "
                             f"{self.train_length!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an integer in [0, steps], got "
                             f"{self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.repeat_fraction <= 1:
            raise ValueError(f"repeat_fraction must be in [0, 1], got {self.repeat_fraction!r}")
        if not 0 < self.mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), got {self.mask_probability!r}")
        if not self.test_factors or any(not isinstance(f, int) or f < 1
                                        for f in self.test_factors):
            raise ValueError(f"test_factors must be positive integers, got {self.test_factors!r}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.position_range < self.longest_test_length:
            raise ValueError(f"position_range ({self.position_range}) must cover the longest "
                             f"test length ({self.longest_test_length})")

    @property
    def test_lengths(self) -> list[int]:
        return [self.train_length * factor for factor in self.test_factors]

    @property
    def longest_test_length(self) -> int:
        return max(self.test_lengths)


LENGTH_RECIPES = {
    # Minutes on two CPU cores: 600 updates of 32 windows of 64 characters.
    "cpu": LengthRecipe(),
    # The same experiment at the length Su trains at: 512, tested to 8x.
    "gpu": LengthRecipe(name="gpu", train_length=512, hidden_size=256, num_layers=4,
                        num_heads=4, intermediate_size=1024, batch_size=64, steps=5000,
                        lr=1e-3, warmup_steps=250, test_factors=(1, 2, 4, 8),
                        eval_tokens=262144, position_range=4096, mlm_steps=5000),
}


# -- data ------------------------------------------------------------------------------


@dataclass
class CharData:
    """Tiny Shakespeare as character ids of the library's :class:`CharTokenizer`
    (``<pad>`` = 0, ``<mask>`` = 1, then the alphabet), split 90/10 by position."""

    tokenizer: CharTokenizer
    train_ids: torch.Tensor  # (characters,) long, the first 90% of the text
    test_ids: torch.Tensor  # (characters,) long, the last 10%

    @property
    def alphabet(self) -> str:
        return self.tokenizer.alphabet

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def mask_id(self) -> int:
        return self.tokenizer.mask_id

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids.tolist() if torch.is_tensor(ids) else ids)

    def mlm_collator(self, mask_probability: float) -> MLMCollator:
        """The library's masked-LM collator (BERT's 80/10/10) for these characters."""
        return MLMCollator.from_tokenizer(self.tokenizer, mlm_probability=mask_probability)


def shakespeare_chars(text: str | None = None) -> CharData:
    """Encode ``text`` (default: Tiny Shakespeare) and split it 90/10 by position."""
    if text is None:
        text = data.load_tiny_shakespeare()
    if len(text) < 100:
        raise ValueError(f"text must hold at least 100 characters, got {len(text)}")
    tokenizer = CharTokenizer.from_text(text, specials=("mask",))
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return CharData(tokenizer, ids[:cut], ids[cut:])


def repeat_halves(windows: torch.Tensor) -> torch.Tensor:
    """(batch, n) -> (batch, n): each row's first ``n/2`` ids, then the same again."""
    if windows.dim() != 2 or windows.shape[1] % 2:
        raise ValueError(f"windows must have shape (batch, even n), got {tuple(windows.shape)}")
    half = windows[:, : windows.shape[1] // 2]
    return torch.cat((half, half), dim=1)


def test_windows(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """(count, length): non-overlapping windows evenly spread over ``ids`` (deterministic)."""
    if count * length > len(ids):
        raise ValueError(f"{count} windows of {length} need {count * length} characters, "
                         f"the text has {len(ids)}")
    stride = len(ids) // count
    return torch.stack([ids[i * stride: i * stride + length] for i in range(count)])


class CausalWindows:
    """Collate for causal-LM training: random windows, some repeated, optional positions."""

    def __init__(self, ids: torch.Tensor, length: int, repeat_fraction: float,
                 position_range: int | None = None):
        self.ids, self.length = ids, length
        self.repeat_fraction = repeat_fraction
        self.position_range = position_range

    def __call__(self, starts: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        windows = torch.stack([self.ids[s: s + self.length] for s in starts])
        repeat = torch.rand(len(starts), generator=generator) < self.repeat_fraction
        windows = torch.where(repeat[:, None], repeat_halves(windows), windows)
        batch = {"input_ids": windows, "labels": windows.clone()}
        if self.position_range is not None:
            batch["position_ids"] = random_positions(len(starts), self.length,
                                                     self.position_range, generator=generator)
        return batch


class MaskedWindows:
    """Collate for MLM training: random windows, masked by the library's collator."""

    def __init__(self, ids: torch.Tensor, length: int, collator: MLMCollator):
        self.ids, self.length, self.collator = ids, length, collator

    def __call__(self, starts: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        windows = [{"input_ids": self.ids[s: s + self.length].tolist()} for s in starts]
        return self.collator(windows, generator=generator)


# -- models ----------------------------------------------------------------------------

# What each trained model is: its config overrides and whether it trains on random positions.
TRAINED = {
    "learned": dict(position_embedding="learned"),
    # Vaswani et al.'s token embeddings (scaled by sqrt(d)): with BERT's, initialised at
    # 0.02, the table's rows (root-mean-square 1/sqrt(2)) would swamp the tokens.
    "sinusoidal": dict(position_embedding="sinusoidal", scale_word_embeddings=True),
    "rope": dict(position_embedding="none", rotary=True),
    "alibi": dict(position_embedding="none", alibi=True),
    "rope-random": dict(position_embedding="none", rotary=True),
}


def model_config(recipe: LengthRecipe, kind: str, vocab_size: int,
                 causal: bool = True) -> TransformerConfig:
    """The config of one of the study's models (``kind`` in ``TRAINED``)."""
    if kind not in TRAINED:
        raise ValueError(f"kind must be one of {sorted(TRAINED)}, got {kind!r}")
    return TransformerConfig(
        vocab_size=vocab_size, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
        num_heads=recipe.num_heads, intermediate_size=recipe.intermediate_size,
        # Learned positions get a table for every test length: the rows past the
        # training length exist but are never trained, which is the point.
        max_position_embeddings=recipe.position_range, type_vocab_size=0, causal=causal,
        norm_position="pre", hidden_dropout=0.0, attention_dropout=0.0,
        layer_norm_eps=1e-5, **TRAINED[kind])


def train_causal(recipe: LengthRecipe, chars: CharData, kind: str, seed: int,
                 device: str = "cpu") -> CausalLM:
    """Train one causal LM of the study (``kind`` in ``TRAINED``) on ``device``
    (``"auto"``: a GPU when there is one); the model stays there."""
    seed_everything(seed)
    model = CausalLM(model_config(recipe, kind, chars.vocab_size))
    collate = CausalWindows(chars.train_ids, recipe.train_length, recipe.repeat_fraction,
                            recipe.position_range if kind == "rope-random" else None)
    _fit(model, recipe, chars, collate, recipe.steps, seed, device, count_shifted_targets)
    return model


def train_masked(recipe: LengthRecipe, chars: CharData, seed: int,
                 device: str = "cpu") -> MaskedLM:
    """Train the bidirectional RoPE masked LM of the log-n experiment."""
    seed_everything(seed)
    model = MaskedLM(model_config(recipe, "rope", chars.vocab_size, causal=False))
    collate = MaskedWindows(chars.train_ids, recipe.train_length,
                            chars.mlm_collator(recipe.mask_probability))
    _fit(model, recipe, chars, collate, recipe.mlm_steps, seed, device)
    return model


def _fit(model, recipe, chars, collate, steps, seed, device, target_counter=None):
    generator = torch.Generator().manual_seed(recipe.data_seed * 1000 + seed)
    last_start = len(chars.train_ids) - recipe.train_length
    starts = torch.randint(0, last_start, (steps * recipe.batch_size,),
                           generator=generator).tolist()
    extra = {} if target_counter is None else {"target_counter": target_counter}
    loader = BatchLoader(starts, recipe.batch_size, collate, seed=seed, **extra)
    train(model, loader, steps=steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
          schedule="cosine", weight_decay=0.01, seed=seed, device=device, progress=False,
          log_every=max(1, steps // 10))
    model.eval()


# -- evaluation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """How a trained model is run at test time.

    ``options`` go to :func:`set_position_options`; ``ntk`` sets ``rotary_ntk_factor``
    to ``n/m`` at each test length ``n`` (1 at the training length); ``positions``:
    ``"index"`` (0, 1, ..., n-1) or ``"evenly-spaced"`` (``t·L/n``, Su's choice for
    models trained on random positions).
    """

    model: str
    options: tuple[tuple[str, Any], ...] = ()
    ntk: bool = False
    positions: str = "index"


def variants(recipe: LengthRecipe) -> dict[str, Variant]:
    """The curves of the study: name -> how to run which trained model."""
    m = recipe.train_length
    logn = ("logn_training_length", m)
    return {
        "learned": Variant("learned"),
        "sinusoidal": Variant("sinusoidal"),
        "RoPE": Variant("rope"),
        "ALiBi": Variant("alibi"),
        "RoPE + window m": Variant("rope", (("attention_window", m),)),
        "RoPE + window 2m": Variant("rope", (("attention_window", 2 * m),)),
        "RoPE + window 2m + log n": Variant("rope", (("attention_window", 2 * m), logn)),
        "RoPE + log n": Variant("rope", (logn,)),
        "RoPE + NTK": Variant("rope", ntk=True),
        "RoPE + NTK + log n": Variant("rope", (logn,), ntk=True),
        "RoPE + ReRoPE m/2": Variant("rope", (("rerope_window", m // 2),)),
        "RoPE + ReRoPE m/2 + log n": Variant("rope", (("rerope_window", m // 2), logn)),
        "random positions": Variant("rope-random"),
        "random positions, evenly spaced": Variant("rope-random", positions="evenly-spaced"),
    }


@torch.no_grad()
def causal_scores(model: CausalLM, windows: torch.Tensor, position_ids: torch.Tensor | None,
                  from_index: int = 0, batch_size: int = 16) -> tuple[float, float]:
    """Mean next-character loss and accuracy over targets ``from_index+1 ... n-1``."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    position_ids = None if position_ids is None else position_ids.to(device)
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start: start + batch_size]
        logits = model(chunk, position_ids=position_ids).logits[:, from_index:-1].float()
        targets = chunk[:, from_index + 1:]
        total_loss += float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                        reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    return total_loss / count, correct / count


def evaluate_variant(model: CausalLM, variant: Variant, recipe: LengthRecipe,
                     chars: CharData) -> dict[str, list[float]]:
    """Loss and accuracy at every test length, natural and repeated (second half)."""
    m = recipe.train_length
    result: dict[str, list[float]] = {"loss": [], "accuracy": [], "repeated_loss": [],
                                      "repeated_accuracy": []}
    for n in recipe.test_lengths:
        options = dict(variant.options)
        if variant.ntk:
            options["rotary_ntk_factor"] = float(max(1.0, n / m))
        positions = (evenly_spaced_positions(n, recipe.position_range)
                     if variant.positions == "evenly-spaced" else None)
        count = max(1, recipe.eval_tokens // n)
        with position_options(model, **options):  # the trained model's own options after
            natural = test_windows(chars.test_ids, n, count)
            loss, accuracy = causal_scores(model, natural, positions)
            repeated = repeat_halves(test_windows(chars.test_ids, n, count))
            # Targets n/2 .. n-1: the copy of the first half, after its first character.
            r_loss, r_accuracy = causal_scores(model, repeated, positions, from_index=n // 2)
        for key, value in (("loss", loss), ("accuracy", accuracy),
                           ("repeated_loss", r_loss), ("repeated_accuracy", r_accuracy)):
            result[key].append(value)
    return result


@torch.no_grad()
def masked_accuracy(model: MaskedLM, recipe: LengthRecipe, chars: CharData, length: int,
                    logn: bool, seed: int = 0) -> float:
    """Accuracy on the masked characters of held-out windows of ``length`` characters,
    masked by the library's collator and scored by its :func:`masked_lm_metrics`."""
    count = max(1, recipe.eval_tokens // length)
    windows = [{"input_ids": row.tolist()} for row in test_windows(chars.test_ids, length, count)]
    batches = fixed_mlm_batches(windows, chars.mlm_collator(recipe.mask_probability),
                                batch_size=16, seed=seed)
    with position_options(model, logn_training_length=recipe.train_length if logn else None):
        return masked_lm_metrics(model, batches)["mlm_accuracy"]


# -- the cached study ------------------------------------------------------------------


def study_key(recipe: LengthRecipe) -> str:
    """Cache key: the recipe, the variants, the data file and the library version."""
    entry = data.REGISTRY["tinyshakespeare/input.txt"]
    payload = json.dumps({"recipe": dataclasses.asdict(recipe),
                          "variants": {k: repr(v) for k, v in variants(recipe).items()},
                          # How characters become ids and masks: a change here changes
                          # every number, so it changes the key.
                          "ids": "CharTokenizer(<pad>, <mask>, sorted alphabet)",
                          "masking": "MLMCollator (BERT 80/10/10)",
                          "trained": TRAINED,
                          "data": entry.sha256 or entry.git_blob_sha1,
                          "tutorial_lib": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class LengthStudyResult:
    """The study's numbers: ``curves[variant][seed][metric]`` lists over ``lengths``."""

    recipe: LengthRecipe
    lengths: list[int]
    curves: dict[str, dict[int, dict[str, list[float]]]]
    masked: dict[str, list[float]]
    seconds: dict[str, float]
    path: Path
    built_now: bool

    def metric(self, variant: str, key: str = "accuracy", seed: int | None = None) -> list[float]:
        """One curve: ``key`` at every test length (seed: the recipe's first seed)."""
        if variant not in self.curves:
            raise ValueError(f"variant must be one of {sorted(self.curves)}, got {variant!r}")
        seed = self.recipe.seeds[0] if seed is None else seed
        if seed not in self.curves[variant]:
            raise ValueError(f"variant {variant!r} has seeds {sorted(self.curves[variant])}, "
                             f"got {seed!r}")
        return self.curves[variant][seed][key]


METRICS = ("accuracy", "loss", "repeated_accuracy", "repeated_loss")


def plot_length_curves(result: LengthStudyResult, methods, ax, metric: str = "accuracy",
                       max_length: int | None = None, spread: bool = True):
    """Draw ``metric`` against test length for ``methods`` on the matplotlib axes ``ax``.

    Lengths above ``max_length`` are left out. With ``spread``, a method trained with
    several seeds gets a band from its lowest to its highest value. Returns the lines
    drawn (one per method), so a caller (the chapter's widget) can check what it drew.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    methods = list(methods)
    unknown = [name for name in methods if name not in result.curves]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(result.curves)}")
    keep = [i for i, n in enumerate(result.lengths) if max_length is None or n <= max_length]
    if not keep:
        raise ValueError(f"max_length={max_length!r} leaves no test length of {result.lengths}")
    lengths = [result.lengths[i] for i in keep]
    lines = []
    for name in methods:
        seeds = sorted(result.curves[name])
        (line,) = ax.plot(lengths, [result.metric(name, metric)[i] for i in keep], "o-",
                          label=name if len(seeds) == 1 else f"{name} ({len(seeds)} seeds)")
        lines.append(line)
        if spread and len(seeds) > 1:
            values = torch.tensor([[result.metric(name, metric, seed)[i] for i in keep]
                                   for seed in seeds])
            ax.fill_between(lengths, values.min(0).values.tolist(), values.max(0).values.tolist(),
                            color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(result.recipe.train_length, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("test length (characters)")
    ax.set_ylabel(metric.replace("_", " "))
    return lines


def _jobs(recipe: LengthRecipe) -> list[tuple[str, int]]:
    """(model kind, seed) to train: every kind once, RoPE with every seed, the MLM."""
    first = recipe.seeds[0]
    jobs = [(kind, first) for kind in TRAINED]
    jobs += [("rope", seed) for seed in recipe.seeds[1:]]
    return jobs + [("mlm", first)]


def _run_job(recipe: LengthRecipe, kind: str, seed: int, out: Path) -> str:
    started = time.perf_counter()
    chars = shakespeare_chars()
    if kind == "mlm":
        model = train_masked(recipe, chars, seed)
        trained = time.perf_counter() - started
        lengths = recipe.test_lengths
        record = {"kind": kind, "seed": seed, "lengths": lengths,
                  "standard": [masked_accuracy(model, recipe, chars, n, False) for n in lengths],
                  "log n": [masked_accuracy(model, recipe, chars, n, True) for n in lengths]}
    else:
        model = train_causal(recipe, chars, kind, seed)
        trained = time.perf_counter() - started
        curves = {name: evaluate_variant(model, variant, recipe, chars)
                  for name, variant in variants(recipe).items() if variant.model == kind}
        record = {"kind": kind, "seed": seed, "curves": curves}
    record["train_seconds"] = trained
    record["total_seconds"] = time.perf_counter() - started
    write_json_atomic(out / "runs" / f"{kind}-seed{seed}.json", record)
    return f"{kind:12s} seed {seed}: trained in {trained:.0f} s, " \
           f"evaluated in {record['total_seconds'] - trained:.0f} s"


def run_length_study(recipe: str | LengthRecipe = "cpu", *, cache_dir: str | Path | None = None,
                     rebuild: bool = False, workers: int = 2,
                     log: Callable[[str], None] | None = None) -> LengthStudyResult:
    """Train and evaluate every model of the study, or load its numbers from the cache."""
    if isinstance(recipe, str):
        if recipe not in LENGTH_RECIPES:
            raise ValueError(f"recipe must be one of {sorted(LENGTH_RECIPES)} or a "
                             f"LengthRecipe, got {recipe!r}")
        recipe = LENGTH_RECIPES[recipe]
    check_workers(workers)
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    entry = root / entry_name("length", recipe.name, study_key(recipe))
    names = [f"{kind}-seed{seed}.json" for kind, seed in _jobs(recipe)]
    jobs = [(f"runs/{kind}-seed{seed}.json", _run_job, (recipe, kind, seed))
            for kind, seed in _jobs(recipe)]
    built_now = build_study_entry(entry, jobs, lambda: {"runs": names}, rebuild=rebuild,
                                  workers=workers, log=log)
    names = json.loads((entry / COMPLETE).read_text())["runs"]
    runs = {name: json.loads((entry / "runs" / name).read_text()) for name in names}
    return _result(recipe, runs, entry, built_now)


def _result(recipe: LengthRecipe, runs: dict[str, dict], path: Path,
            built_now: bool) -> LengthStudyResult:
    """The study's numbers from its run files (``{file name: contents}``)."""
    curves: dict[str, dict[int, dict[str, list[float]]]] = {}
    masked: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name, record in runs.items():
        seconds[name.removesuffix(".json")] = record["train_seconds"]
        if record["kind"] == "mlm":
            masked = {"standard": record["standard"], "log n": record["log n"]}
            continue
        for variant, values in record["curves"].items():
            curves.setdefault(variant, {})[record["seed"]] = values
    order = list(variants(recipe))
    curves = {name: curves[name] for name in order if name in curves}
    return LengthStudyResult(recipe, recipe.test_lengths, curves, masked, seconds, path,
                             built_now)


# -- the committed record, and CI's check of it ----------------------------------------

# CI re-trains and re-evaluates the ALiBi model (one job, well under a minute on one
# thread): every number of its curves must match the record.
SAMPLE = [("alibi", 0)]
TOLERANCE = {"abs": 2e-3, "rel": 1e-3}


def _length_recipe(recipe: str | LengthRecipe) -> LengthRecipe:
    if isinstance(recipe, LengthRecipe):
        return recipe
    if recipe not in LENGTH_RECIPES:
        raise ValueError(f"recipe must be one of {sorted(LENGTH_RECIPES)} or a LengthRecipe, "
                         f"got {recipe!r}")
    return LENGTH_RECIPES[recipe]


def record_length_study(recipe: str | LengthRecipe = "cpu", *, cache_dir=None,
                        rebuild: bool = False, workers: int = 2, log=None,
                        directory=None) -> Path:
    """Build (or find) the study and write its record."""
    recipe = _length_recipe(recipe)
    result = run_length_study(recipe, cache_dir=cache_dir, rebuild=rebuild, workers=workers,
                              log=log)
    names = json.loads((result.path / COMPLETE).read_text())["runs"]
    files = records.read_entry_files(result.path, [f"runs/{name}" for name in names] + [COMPLETE])
    wall = sum(run["total_seconds"] for name, run in files.items() if name != COMPLETE)
    return records.write_record(
        "length", recipe.name, key=study_key(recipe),
        recipe={"recipe": dataclasses.asdict(recipe),
                "variants": {k: repr(v) for k, v in variants(recipe).items()}},
        data=records.data_checksums(["tinyshakespeare/input.txt"]), files=files,
        wall_seconds=wall, sample=[f"runs/{kind}-seed{seed}.json" for kind, seed in SAMPLE],
        tolerance=TOLERANCE, directory=directory)


def load_length_study(recipe: str | LengthRecipe = "cpu", *, directory=None) -> LengthStudyResult:
    """The study's numbers from its committed record (refused if the code's recipe changed)."""
    recipe = _length_recipe(recipe)
    record = records.read_record("length", recipe.name, key=study_key(recipe),
                                 directory=directory)
    runs = {name: record["files"][f"runs/{name}"] for name in record["files"][COMPLETE]["runs"]}
    return _result(recipe, runs, records.record_path("length", recipe.name, directory), False)


def check_length_study(recipe: str | LengthRecipe = "cpu", *, directory=None,
                       log=None) -> list[str]:
    """Re-run the record's sample and compare; return the problems (none: it agrees)."""
    recipe = _length_recipe(recipe)
    record = records.read_record("length", recipe.name, key=study_key(recipe),
                                 directory=directory)
    jobs = [(f"runs/{kind}-seed{seed}.json", _run_job, (recipe, kind, seed))
            for kind, seed in SAMPLE]
    return records.check_sample(record, jobs, log)
