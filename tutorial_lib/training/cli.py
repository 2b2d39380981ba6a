"""Command-line training: ``python -m tutorial_lib.train --config FILE --out DIR``.

The same entry point runs the CPU demo and the multi-GPU job; only the config differs::

    python -m tutorial_lib.train --config configs/mlm_wikitext2_cpu.json --out runs/mlm-cpu
    torchrun --nproc_per_node=8 -m tutorial_lib.train \\
        --config configs/mlm_wikitext2_bert_base.json --out runs/bert-base

A config file (JSON, or TOML on Python ≥ 3.11) is parsed into the dataclasses below and
validated — unknown keys and wrong types are errors naming the key; nothing in it is
executed. Sections (every key optional, defaults shown in the dataclasses)::

    {"description": "...", "task": "mlm", "seed": 0,
     "model":     {"preset": "cpu-notebook", "overrides": {"num_layers": 2}},
     "tokenizer": {"vocab_size": 8000, "lowercase": true, "min_frequency": 2},
     "data":      {"dataset": "wikitext2", "max_length": 64, "max_train_lines": null, ...},
     "batch":     {"global_batch_size": 32, "accumulation_steps": 1},
     "training":  {"steps": 100, "lr": 1e-3, "warmup_steps": 10, "precision": "fp32", ...}}

``training`` holds the fields of :class:`tutorial_lib.training.loop.TrainConfig` except
``seed``: the top-level seed drives model initialisation, data order, masking and
dropout. The tokenizer is trained on the training text on first use and cached as
``DIR/tokenizer.json``, so a resumed run sees the same vocabulary.

Tasks are built by the functions in ``TASKS``; ``mlm`` (masked LM on WikiText-2) is the
one wired in. A causal-LM or classification task is one more function returning a
:class:`PreparedTask`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tutorial_lib.training import checkpoint as ckpt
from tutorial_lib.training import distributed
from tutorial_lib.training.loop import BatchLoader, TrainConfig, count_targets, evaluate_loss, train

DATASETS = ("wikitext2",)


@dataclass
class ModelSpec:
    preset: str = "cpu-notebook"  # a name in tutorial_lib.core.config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # any TransformerConfig field


@dataclass
class TokenizerSpec:
    vocab_size: int = 8000
    lowercase: bool = True
    min_frequency: int = 2


@dataclass
class DataSpec:
    dataset: str = "wikitext2"
    max_length: int = 128  # tokens per sequence, [CLS] and [SEP] included
    max_train_lines: int | None = None  # None: every line
    max_eval_lines: int | None = 500
    eval_sequences: int = 256  # fixed, pre-masked evaluation set
    eval_batch_size: int = 64
    mlm_probability: float = 0.15
    download: bool = True  # fetch WikiText-2's train.txt if it is not found locally

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name in ("max_length", "eval_sequences", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_train_lines", "max_eval_lines"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be None or >= 1, got {value!r}")


@dataclass
class BatchSpec:
    global_batch_size: int = 32  # examples per optimizer update, over all processes
    accumulation_steps: int = 1  # micro-batches per process per update


@dataclass
class RunConfig:
    description: str = ""
    task: str = "mlm"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    training: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        self.training = dataclasses.replace(self.training, seed=self.seed)


# -- config parsing -----------------------------------------------------------------------

def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type annotation; convert list→tuple, int→float."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where} must be {_describe(annotation)}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a table/object of settings, got {value!r}")
        return from_mapping(annotation, value, where)
    if annotation is type(None):
        if value is not None:
            raise TypeError(f"{where} must be null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a table/object, got {value!r}")
        return dict(value)
    if origin is tuple:
        items = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise TypeError(f"{where} must be a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    raise TypeError(f"{where}: unsupported field type {annotation!r}")


def from_mapping(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a parsed JSON/TOML mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if cls is TrainConfig:
        names.remove("seed")  # one seed for the whole run, at the top level
    unknown = sorted(set(values) - set(names))
    if unknown:
        hint = " (the seed is set once, at the top level)" if cls is TrainConfig and "seed" in unknown else ""
        raise ValueError(f"unknown key(s) {unknown} in {where}{hint}; allowed: {sorted(names)}")
    kwargs = {name: _coerce(values[name], hints[name], f"{where}.{name}")
              for name in names if name in values}
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"invalid {where}: {error}") from None


def load_run_config(path: str | Path) -> RunConfig:
    """Parse a JSON (``.json``) or TOML (``.toml``) run config and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text("utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:
            raise RuntimeError("TOML configs need Python 3.11+; use a JSON config") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except ValueError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    else:
        raise ValueError(f"config file {path} must end in .json or .toml")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold an object/table at the top level")
    return from_mapping(RunConfig, values, "config")


# -- tasks --------------------------------------------------------------------------------

@dataclass
class PreparedTask:
    """Everything :func:`run` needs from a task: a model, training data and evaluation."""

    model: nn.Module
    train_examples: list
    collate_fn: Callable
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    note: str = ""
    target_counter: Callable[[dict], int] = count_targets


def _tokenizer(config: RunConfig, lines: list[str], out_dir: Path,
               context: distributed.DistributedContext):
    """Train the WordPiece tokenizer once (rank 0) and cache it in ``out_dir``."""
    from tutorial_lib.data.tokenization import TextTokenizer, train_wordpiece

    path = out_dir / "tokenizer.json"

    def build() -> None:
        if not path.is_file():
            tokenizer = train_wordpiece(lines, config.tokenizer.vocab_size,
                                        min_frequency=config.tokenizer.min_frequency,
                                        lowercase=config.tokenizer.lowercase)
            # Through a temporary file, so a crash never leaves half a vocabulary behind.
            temporary = path.with_name(".tokenizer.json.tmp")
            tokenizer.save(temporary)
            ckpt.atomic_write_bytes(path, temporary.read_bytes())
            temporary.unlink()
    distributed.run_on_main(context, build)
    return TextTokenizer.load(path)


def prepare_mlm(config: RunConfig, out_dir: Path, context: distributed.DistributedContext) -> PreparedTask:
    """Masked LM on WikiText-2 with a WordPiece tokenizer trained on the training text."""
    from tutorial_lib.data.batching import MLMCollator, mlm_examples
    from tutorial_lib.core.config import TransformerConfig
    from tutorial_lib.data import wikitext2_pretraining_splits
    from tutorial_lib.core.model import build_model

    data = config.data
    train_lines, eval_lines, note = wikitext2_pretraining_splits(download=data.download)
    train_lines = train_lines[:data.max_train_lines]
    eval_lines = eval_lines[:data.max_eval_lines]
    tokenizer = _tokenizer(config, train_lines, out_dir, context)

    model_config = TransformerConfig.preset(
        config.model.preset, **{"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_id,
                                **config.model.overrides})
    if data.max_length > model_config.max_position_embeddings:
        raise ValueError(f"data.max_length ({data.max_length}) exceeds the model's "
                         f"max_position_embeddings ({model_config.max_position_embeddings})")
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    # The vocabulary projection only at masked positions: same loss, about half the
    # compute of a small model's step.
    model = build_model("mlm", model_config, sparse_prediction=True)

    collate = MLMCollator.from_tokenizer(tokenizer, mlm_probability=data.mlm_probability)
    train_examples = mlm_examples(train_lines, tokenizer, data.max_length)
    # A fixed evaluation set: the same sequences with the same masks at every evaluation.
    eval_examples = mlm_examples(eval_lines, tokenizer, data.max_length)[:data.eval_sequences]
    if not eval_examples:
        raise ValueError("data.max_eval_lines leaves no evaluation text")
    masks = torch.Generator().manual_seed(config.seed)
    eval_batches = [collate(eval_examples[i:i + data.eval_batch_size], generator=masks)
                    for i in range(0, len(eval_examples), data.eval_batch_size)]

    def eval_fn(model: nn.Module) -> dict[str, float]:
        results = evaluate_loss(model, eval_batches)
        results["eval_perplexity"] = math.exp(min(results["eval_loss"], 50.0))
        return results

    note += (f"; {len(train_examples):,} training sequences of at most {data.max_length} tokens, "
             f"{len(eval_examples):,} evaluation sequences, vocabulary {tokenizer.vocab_size:,}")
    return PreparedTask(model, train_examples, collate, eval_fn, note)


def _not_wired(task: str) -> Callable:
    def prepare(*_: Any) -> PreparedTask:
        raise NotImplementedError(f"task {task!r} has a model (tutorial_lib.core.model.build_model) but "
                                  "no data pipeline in the CLI yet; add a prepare function to TASKS")
    return prepare


TASKS: dict[str, Callable[[RunConfig, Path, distributed.DistributedContext], PreparedTask]] = {
    "mlm": prepare_mlm,
    "causal-lm": _not_wired("causal-lm"),
    "classification": _not_wired("classification"),
}


# -- running ------------------------------------------------------------------------------

def run(config: RunConfig, out_dir: str | Path, *, resume: bool = False) -> Any:
    """Train as described by ``config`` into ``out_dir``; returns :class:`TrainResult`.

    Call inside an initialised process group when distributed (see :func:`main`).
    """
    out = Path(out_dir)
    context = distributed.current_context(config.training.device)
    has_checkpoint = ckpt.latest_checkpoint(out / ckpt.CHECKPOINTS_DIR) is not None
    # Fail before the (slow) data preparation rather than after it.
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume given but {out / ckpt.CHECKPOINTS_DIR} holds no checkpoint")
    if not resume and has_checkpoint:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue that run "
                              "or choose another --out")
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            ckpt.atomic_write_text(out / "run_config.json",
                                   json.dumps(dataclasses.asdict(config), indent=2))
    distributed.barrier(context)

    prepared = TASKS[config.task](config, out, context)
    if context.is_main and prepared.note:
        print(prepared.note, flush=True)
    loader = BatchLoader(prepared.train_examples, config.batch.global_batch_size, prepared.collate_fn,
                         seed=config.seed, rank=context.rank, world_size=context.world_size,
                         accumulation_steps=config.batch.accumulation_steps,
                         target_counter=prepared.target_counter)
    result = train(prepared.model, loader, config.training, eval_fn=prepared.eval_fn, out_dir=out,
                   resume=resume)
    if context.is_main:
        last = {key: value for record in result.history for key, value in record.items()}
        summary = ", ".join(f"{key} {last[key]:.4f}" for key in ("loss", "eval_loss", "eval_perplexity")
                            if key in last)
        print(f"finished step {result.step}: {summary}; weights in {out / 'model.safetensors'}",
              flush=True)
    return result


EPILOG = """\
examples:
  # The CPU demo (about a minute on two cores):
  python -m tutorial_lib.train --config configs/mlm_wikitext2_cpu.json --out runs/mlm-cpu
  # Interrupted? Continue exactly where the last checkpoint left off:
  python -m tutorial_lib.train --config configs/mlm_wikitext2_cpu.json --out runs/mlm-cpu --resume
  # BERT-base on 8 GPUs (the global batch size stays the config's):
  torchrun --nproc_per_node=8 -m tutorial_lib.train \\
      --config configs/mlm_wikitext2_bert_base.json --out runs/bert-base

outputs in --out:
  model.safetensors, config.json  final weights and model config
  metrics.jsonl                   one JSON object per log or evaluation event
  checkpoints/step-XXXXXXXX/      resumable checkpoints (weights, optimizer, RNGs, data position)
  tokenizer.json, run_config.json the tokenizer trained on the data, the resolved config

The config file format is described in the docstring of tutorial_lib/train.py
(python -c "import tutorial_lib.training.cli as t; help(t)").
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_lib.train",
        description="Train a model of the book from a JSON/TOML config, on CPU, one GPU or, "
                    "under torchrun, several GPUs or processes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="PATH",
                        help="run config, .json or .toml (model, tokenizer, data, batch, training)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory for weights, metrics, checkpoints and tokenizer")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in DIR (bitwise identical to an "
                             "uninterrupted run on the same hardware and number of processes)")
    parser.add_argument("--max-steps", type=_positive_int, metavar="N",
                        help="total optimizer updates, replacing training.steps (the learning-rate "
                             "schedule is laid out over N)")
    parser.add_argument("--save-every", type=_positive_int, metavar="N",
                        help="write a checkpoint every N updates, replacing training.save_every")
    parser.add_argument("--device", metavar="NAME",
                        help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', ...; replaces "
                             "training.device")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_run_config(args.config)
        overrides = {name: value for name, value in (("steps", args.max_steps),
                                                     ("save_every", args.save_every),
                                                     ("device", args.device)) if value is not None}
        if args.no_progress:
            overrides["progress"] = False
        config.training = dataclasses.replace(config.training, **overrides)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    distributed.init_distributed(config.training.device)
    try:
        run(config, args.out, resume=args.resume)
    except (FileNotFoundError, FileExistsError, ckpt.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
