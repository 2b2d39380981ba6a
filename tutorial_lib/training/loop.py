"""One training loop for every chapter: a 2-minute CPU demo and a multi-GPU torchrun run.

The pieces, in the order a step uses them:

1. :class:`BatchLoader` draws the next *global* batch from a seeded permutation,
   collates the whole global batch with a generator seeded from
   ``(seed, epoch, batch_index)`` — so padding and MLM masking do not depend on the
   number of processes — and hands this rank its micro-batches.
2. The *loss step* ``(model, batch) -> (loss, logs)`` is the only place a forward pass
   happens; adversarial-training chapters wrap it (:func:`default_loss_step`). A loss step
   with an ``attach(model)`` method is given the model before the optimiser is built, to
   add modules of its own that train with the model (chapter 2's adversaries); the
   parameters it returns belong to another player, and gradient clipping leaves them out.
3. **Loss normalisation.** A micro-batch's loss is a mean over its own targets (masked
   tokens for MLM, rows for classification). For the update to equal the gradient of
   the *global-batch* mean, each micro-batch loss is weighted by its share of the global
   targets, ``n_micro / N_global``, and multiplied by ``world_size`` because DDP
   averages (not sums) gradients over ranks::

       (1/W) · Σ_ranks Σ_micro W · (n_micro/N_global) · ∇L_micro = ∇ (Σ_all ℓ_target / N_global)

   so the result is independent of world size and gradient accumulation.
4. AdamW with decoupled weight decay on matrices/embeddings only, linear warm-up then
   linear or cosine decay (:func:`lr_multiplier`), gradient clipping, optional bf16/fp16
   autocast (loss scaling only for fp16 on CUDA) and ``torch.compile``.
5. Logs to ``out_dir/metrics.jsonl`` and to memory; atomic checkpoints
   (:mod:`tutorial_lib.training.checkpoint`) that make a resumed run bitwise identical to an
   uninterrupted one on the same hardware, world size and number of CPU threads (float
   reductions are ordered by how work is split, so changing any of these changes the
   last bits).

In a notebook::

    loader = BatchLoader(examples, 32, MLMCollator.from_tokenizer(tokenizer), seed=0)
    result = train(model, loader, steps=100, lr=1e-3, warmup_steps=10, eval_fn=my_eval)
    plt.plot(*result.series("loss"));

and the same call runs under ``torchrun`` once :func:`tutorial_lib.training.distributed.init_distributed`
has run and the loader gets that ``rank``/``world_size`` (:mod:`tutorial_lib.training.cli` is the
command-line version).

Randomness: the data order and the collator's masking come from the loader's seed; the
model's own randomness (dropout) comes from the global torch RNG, seeded from
``(TrainConfig.seed, rank)`` at the start (ranks use different dropout masks) and saved
and restored in every checkpoint together with Python's and NumPy's RNGs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import random
import struct
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tutorial_lib.data.batching import model_inputs
from tutorial_lib.training import checkpoint as ckpt
from tutorial_lib.training import distributed

IGNORE_INDEX = -100
# Keys the loader adds to each micro-batch for loss normalisation; never model inputs.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("constant", "linear", "cosine")
LossStep = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict[str, float]]"]


# -- data ---------------------------------------------------------------------------

def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; identical in every process and Python version."""
    digest = hashlib.sha256(struct.pack(f"<{len(parts)}q", *parts)).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def count_targets(batch: dict[str, Any]) -> int:
    """How many terms the batch's mean loss averages over.

    Integer labels: entries that are not ``-100`` (masked tokens for MLM/causal LM, or
    labelled rows for classification). Float labels (regression): rows. No labels: rows.
    """
    labels = batch.get("labels")
    if labels is None or not torch.is_tensor(labels):
        return _batch_size(batch)
    if labels.is_floating_point():
        return labels.shape[0]
    return int((labels != IGNORE_INDEX).sum())


def count_shifted_targets(batch: dict[str, Any]) -> int:
    """Targets of a causal LM whose loss shifts labels inside the model (token t
    predicts t+1): non-ignored labels from position 1 on. Pass as the loader's
    ``target_counter``."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not torch.is_tensor(labels) or labels.dim() != 2:
        raise ValueError(f"count_shifted_targets needs batch['labels'] of shape (batch, seq), "
                         f"got {_describe(labels)}")
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return "nothing" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool, a string, NaN or infinity)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("cannot find the batch dimension: the collated batch holds no tensors")


def split_batch(batch: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """Split every tensor (and list) along dim 0 into ``chunks`` nearly equal parts."""
    size = _batch_size(batch)
    if not _is_int(chunks) or not 1 <= chunks <= size:
        raise ValueError(f"chunks must be an int in [1, batch size={size}] (every part needs "
                         f"at least one example), got {chunks!r}")
    bounds = [size * i // chunks for i in range(chunks + 1)]
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = {}
        for key, value in batch.items():
            if (torch.is_tensor(value) and value.dim() > 0) or isinstance(value, list):
                part[key] = value[start:stop]
            else:
                part[key] = value  # per-batch constants travel with every part
        parts.append(part)
    return parts


def _accepts_generator(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class BatchLoader:
    """Seeded, resumable, world-size-independent batches of examples.

    Each call to :meth:`next_batch` returns this rank's ``accumulation_steps``
    micro-batches of the next global batch. The global batch is split into
    ``world_size × accumulation_steps`` equal chunks; rank ``r`` gets chunks
    ``r·A … r·A+A−1``. Epoch ``e``'s order is a permutation drawn from a generator
    seeded with ``(seed, e)``. With ``drop_last=False`` an epoch's final partial batch
    is kept when it has at least one example per micro-batch (its micro-batches may then
    differ in size by one; loss normalisation by target counts keeps the update exact).
    ``target_counter(batch)`` must count the terms the model's mean loss averages over:
    :func:`count_targets` (default) or :func:`count_shifted_targets` for causal LMs.
    """

    def __init__(self, examples: Sequence[Any], global_batch_size: int, collate_fn: Callable,
                 *, seed: int, shuffle: bool = True, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1, accumulation_steps: int = 1,
                 target_counter: Callable[[dict[str, Any]], int] = count_targets):
        for name, value, minimum in (("global_batch_size", global_batch_size, 1),
                                     ("world_size", world_size, 1),
                                     ("accumulation_steps", accumulation_steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        for name, value in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if isinstance(examples, (str, bytes, Mapping)) or not (
                hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
            raise TypeError(f"examples must be a sequence (a list, or a map-style data set with "
                            f"__len__ and __getitem__), got {type(examples).__name__}")
        if not callable(target_counter):
            raise TypeError(f"target_counter must be callable as target_counter(batch), "
                            f"got {type(target_counter).__name__}")
        self.chunks = world_size * accumulation_steps
        if global_batch_size % self.chunks:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be divisible by world_size × "
                f"accumulation_steps ({world_size} × {accumulation_steps} = {self.chunks})")
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        self.examples = examples
        self.global_batch_size = global_batch_size
        self.collate_fn = collate_fn
        self.target_counter = target_counter
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size, self.accumulation_steps = rank, world_size, accumulation_steps
        self._collate_takes_generator = _accepts_generator(collate_fn)
        if self.batches_per_epoch == 0:
            raise ValueError(f"global_batch_size ({global_batch_size}) leaves no batch in an epoch "
                             f"of {len(examples)} examples")
        self.epoch = 0
        self.batch_index = 0  # index, within the epoch, of the next batch to deliver
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.chunks

    @property
    def batches_per_epoch(self) -> int:
        full, remainder = divmod(len(self.examples), self.global_batch_size)
        return full + (0 if self.drop_last or remainder < self.chunks else 1)

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
                self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            else:
                self._order = list(range(len(self.examples)))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> list[dict[str, Any]]:
        """This rank's micro-batches of the next global batch (advances the position)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        start = self.batch_index * self.global_batch_size
        indices = self._epoch_order()[start:start + self.global_batch_size]
        examples = [self.examples[i] for i in indices]
        if self._collate_takes_generator:
            generator = torch.Generator().manual_seed(
                _derive_seed(self.seed, self.epoch, self.batch_index))
            batch = self.collate_fn(examples, generator=generator)
        else:
            batch = self.collate_fn(examples)
        self.batch_index += 1
        num_global_targets = self.target_counter(batch)
        mine = split_batch(batch, self.chunks)[self.rank * self.accumulation_steps:
                                               (self.rank + 1) * self.accumulation_steps]
        for micro in mine:
            micro["num_targets"] = self.target_counter(micro)
            micro["num_global_targets"] = num_global_targets
        return mine

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def progress(self) -> float:
        """Epochs completed, fractional (for plots)."""
        return self.epoch + self.batch_index / self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at exactly the batch after the one delivered last before saving."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from BatchLoader.state_dict(), "
                            f"got {type(state).__name__}")
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("num_examples", len(self.examples))):
            if state.get(key) != mine:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{key}={mine!r}; resuming would not continue the same data stream")
        epoch, batch_index = state.get("epoch"), state.get("batch_index")
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"loader state must have an epoch >= 0, got {epoch!r}")
        if not _is_int(batch_index) or not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"loader state must have a batch_index in [0, batches_per_epoch="
                             f"{self.batches_per_epoch}], got {batch_index!r}")
        self.epoch, self.batch_index = int(epoch), int(batch_index)


def default_loss_step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward the batch and return the model's mean loss; no extra logs."""
    output = model(**model_inputs(batch))
    loss = output["loss"] if isinstance(output, dict) else output.loss
    return loss, {}


# -- optimisation ---------------------------------------------------------------------

def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "linear",
                  min_lr_ratio: float = 0.0) -> float:
    """Learning-rate factor for update number ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` updates, so the
    first update already moves (HF's ``step / warmup`` wastes it) and update
    ``warmup_steps − 1`` uses the peak rate. Then, with progress ``p`` going from 0 at
    ``step = warmup_steps`` to 1 at ``step = total_steps``: ``constant`` keeps 1,
    ``linear`` gives ``1 − (1 − r)·p`` and ``cosine`` gives ``r + (1 − r)·(1 + cos πp)/2``,
    where ``r = min_lr_ratio``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, value, minimum in (("step", step, 0), ("warmup_steps", warmup_steps, 0),
                                 ("total_steps", total_steps, 1)):
        if not _is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not _is_number(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay every parameter with ≥ 2 dimensions, nothing else.

    Matrices and embedding tables are decayed; 1-D parameters — biases and LayerNorm
    (or RMSNorm) gains and shifts — are not. This reproduces BERT's name-based exclusion
    list (``bias``, ``LayerNorm.weight``) without depending on attribute names, and is
    nanoGPT's rule. Tied parameters appear once.
    """
    if not _is_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainConfig:
    """Everything about *how* to train (the model and data are passed separately)."""

    steps: int = 1000
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0  # max global L2 norm; None or 0 disables clipping
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" autocast
    compile: bool = False
    seed: int = 0  # dropout RNGs (derived per rank); data order is the loader's seed
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, (tuple, list)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(self.betas)
        for name in ("lr", "weight_decay", "eps", "min_lr_ratio") + \
                (("grad_clip",) if self.grad_clip is not None else ()):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not all(_is_number(b) for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("compile", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0' (or a "
                             f"torch.device), got {self.device!r}")
        positive = {"steps": self.steps, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be None or >= 0, got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                             betas=config.betas, eps=config.eps,
                             fused=device.type == "cuda" or None)  # fused kernel on GPUs


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps=config.warmup_steps, total_steps=config.steps,
                             schedule=config.schedule, min_lr_ratio=config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# -- the loop -------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """What :func:`train` returns: the metric history (also in ``metrics.jsonl``)."""

    history: list[dict[str, Any]]
    step: int
    model: nn.Module  # the unwrapped model, trained in place
    out_dir: Path | None = None

    def series(self, key: str, event: str = "train") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric, ready for ``plt.plot(*result.series("loss"))``."""
        rows = [r for r in self.history if r.get("event") == event and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and all CUDA devices) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def evaluate_loss(model: nn.Module, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Target-weighted mean loss of ``model`` over already collated ``batches``.

    Meant to be wrapped in an ``eval_fn``; :func:`train` calls that in eval mode under
    ``torch.no_grad()``.
    """
    _check_batches(batches, "evaluate_loss")
    device = next(model.parameters()).device
    total, targets = 0.0, 0
    for batch in batches:
        count = count_targets(batch)
        if count == 0:
            continue
        loss, _ = default_loss_step(model, _to_device(batch, device))
        total += float(loss) * count
        targets += count
    if targets == 0:
        raise ValueError("evaluate_loss: the evaluation batches contain no targets")
    return {"eval_loss": total / targets, "eval_targets": targets}


def _check_batches(batches: Any, caller: str) -> None:
    """``batches`` must be a list of collated batches (dicts), not one batch."""
    if isinstance(batches, (dict, str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{caller}: batches must be a list of collated batches (dicts), "
                        f"got {type(batches).__name__}")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


class _RunningMeans:
    """Per-rank sums of the global-batch loss (and extra logs) between two log events.

    Kept as device tensors so logging does not force a GPU sync every step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.zeros((), device=self.device)
        self.steps = 0

    def add(self, name: str, value: Any, share: float) -> None:
        value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        self.sums[name] = self.sums.get(name, torch.zeros((), device=self.device)) + value.to(self.device) * share

    def means(self, context: distributed.DistributedContext) -> dict[str, float]:
        names = sorted(self.sums)
        # Each rank holds its shares of the global means: one all-reduce sums them.
        stacked = torch.stack([self.sums[n] for n in names]) if names else torch.zeros(0, device=self.device)
        stacked = distributed.all_reduce_sum(stacked, context) / self.steps
        result = {name: float(v) for name, v in zip(names, stacked.tolist())}
        result["grad_norm"] = float(self.grad_norm) / self.steps
        return result


def _train_step(forward_model: nn.Module, clipped: list[nn.Parameter], micro_batches: list[dict[str, Any]],
                loss_step: LossStep, optimizer: torch.optim.Optimizer, scaler, config: TrainConfig,
                context: distributed.DistributedContext, autocast: Callable, running: _RunningMeans) -> None:
    is_ddp = isinstance(forward_model, nn.parallel.DistributedDataParallel)
    for index, micro in enumerate(micro_batches):
        share = micro["num_targets"] / micro["num_global_targets"] if micro["num_global_targets"] else 0.0
        batch = _to_device(micro, context.device)
        # DDP all-reduces gradients in backward; only the last micro-batch needs that.
        last = index == len(micro_batches) - 1
        sync = forward_model.no_sync() if is_ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                output = loss_step(forward_model, batch)
            loss, logs = output if isinstance(output, tuple) else (output, {})
            # × world_size undoes DDP's gradient averaging (see the module docstring).
            weighted = loss.float() * (share * context.world_size)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        if share > 0:  # a micro-batch without targets has a NaN mean loss; skip it in logs
            running.add("loss", loss, share)
            for name, value in logs.items():
                running.add(name, value, share)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    # With clipping off, max_norm=inf still measures the norm for the logs (and scales by 1).
    grad_norm = nn.utils.clip_grad_norm_(clipped, config.grad_clip or float("inf"))
    running.grad_norm += grad_norm.detach().float()
    running.steps += 1
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _resolve_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"train() got unknown option(s) {unknown}; TrainConfig fields are {sorted(known)}")
    return dataclasses.replace(config, **overrides)


def _read_history(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records logged up to the checkpoint; later ones belong to the interrupted run."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text("utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash
        if record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def _restore(checkpoint_root: Path, raw_model: nn.Module, model_config: dict | None,
             optimizer: torch.optim.Optimizer, scheduler, scaler, loader: BatchLoader,
             context: distributed.DistributedContext) -> tuple[int, dict | None]:
    """Load the newest checkpoint into every stateful object.

    Returns its step and this rank's RNG state (``None`` if the world size changed).
    Every rank reads the checkpoint itself, so ``out_dir`` must be visible to all ranks.
    """
    latest = ckpt.latest_checkpoint(checkpoint_root)
    if latest is None:
        raise FileNotFoundError(f"resume=True but {checkpoint_root} holds no checkpoint; "
                                "start without resume to begin a new run")
    checkpoint = ckpt.read_checkpoint(latest)
    ckpt.load_model_state(raw_model, checkpoint, model_config)
    optimizer.load_state_dict(checkpoint.training_state["optimizer"])
    scheduler.load_state_dict(checkpoint.training_state["scheduler"])
    if scaler is not None and checkpoint.training_state["scaler"]:
        scaler.load_state_dict(checkpoint.training_state["scaler"])
    loader.load_state_dict(checkpoint.state["loader"])
    rng_states = checkpoint.training_state["rng"]
    if len(rng_states) == context.world_size:
        return checkpoint.step, rng_states[context.rank]
    warnings.warn(f"checkpoint was written by {len(rng_states)} process(es), this run has "
                  f"{context.world_size}: dropout RNGs are reseeded, so the run will not be "
                  "bitwise identical to an uninterrupted one", stacklevel=3)
    return checkpoint.step, None


def train(model: nn.Module, loader: BatchLoader, config: TrainConfig | None = None, *,
          loss_step: LossStep = default_loss_step,
          eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
          out_dir: str | Path | None = None, resume: bool = False, model_config: Any = None,
          stop_after: int | None = None, **overrides: Any) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer updates and return the history.

    ``config`` fields may also be given as keyword arguments (``train(m, l, steps=50)``).
    ``eval_fn(model) -> {name: value}`` runs every ``eval_every`` steps and at the end,
    on every rank (rank 0's result is logged). With ``out_dir``: metrics go to
    ``metrics.jsonl``, checkpoints to ``checkpoints/`` every ``save_every`` steps and at
    the end, and final weights to ``model.safetensors`` (+ ``config.json``). ``resume``
    continues from the newest checkpoint; a fresh run refuses a directory that already
    holds checkpoints. ``model_config`` (default: ``model.config``) is stored in
    checkpoints and compared on resume. ``stop_after`` ends the run after that many of its
    ``config.steps`` updates, with the learning-rate schedule and the logs of the whole
    run: its first updates, exactly, for a spot check of a long run's beginning.
    """
    config = _resolve_config(config, overrides)
    if stop_after is not None and (not _is_int(stop_after) or not 1 <= stop_after <= config.steps):
        raise ValueError(f"stop_after must be None or an integer in [1, steps={config.steps}], "
                         f"got {stop_after!r}")
    if stop_after is not None and out_dir is not None:
        raise ValueError("stop_after is for runs without out_dir: a stopped run has no final "
                         "checkpoint or weights to write")
    last_step = config.steps if stop_after is None else stop_after
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(getattr(loader, "next_batch", None)):
        raise TypeError(f"loader must be a BatchLoader, got {type(loader).__name__}")
    if not callable(loss_step):
        raise TypeError(f"loss_step must be callable as loss_step(model, batch), "
                        f"got {type(loss_step).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be None or callable as eval_fn(model), "
                        f"got {type(eval_fn).__name__}")
    context = distributed.current_context(config.device)
    if (loader.rank, loader.world_size) != (context.rank, context.world_size):
        raise ValueError(f"loader was built for rank {loader.rank} of {loader.world_size} but this "
                         f"process is rank {context.rank} of {context.world_size}")
    if config.save_every and out_dir is None:
        raise ValueError("save_every needs out_dir (where would the checkpoints go?)")
    device = context.device
    raw_model = distributed.unwrap_model(model).to(device)
    model_config = ckpt.config_as_dict(model_config if model_config is not None
                                       else getattr(raw_model, "config", None))
    dtype = PRECISIONS[config.precision]
    if dtype is torch.float16 and device.type != "cuda":
        warnings.warn("fp16 without loss scaling (GradScaler is used on CUDA only); "
                      "prefer bf16 on this device", stacklevel=2)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    # A loss step that brings modules of its own (chapter 2's adversaries) adds them here,
    # before the optimiser is built: they then train, and are checkpointed and resumed,
    # with the model. It must reuse what a model already has (a resumed run's model).
    # attach may return parameters of another player (ASA's adversaries): their gradient is
    # not the model's, so the model's clipping norm leaves them out (they are not clipped).
    attach = getattr(loss_step, "attach", None)
    players = (attach(raw_model) or ()) if callable(attach) else ()
    others = {id(parameter) for parameter in players}
    clipped = [parameter for parameter in raw_model.parameters() if id(parameter) not in others]
    optimizer = build_optimizer(raw_model, config, device)
    scheduler = build_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 and device.type == "cuda" else None

    out = Path(out_dir) if out_dir is not None else None
    metrics_path = out / METRICS_FILE if out is not None else None
    checkpoint_root = out / ckpt.CHECKPOINTS_DIR if out is not None else None
    start_step, history, rng_state = 0, [], None
    if resume:
        if out is None:
            raise ValueError("resume=True needs out_dir (the run directory to resume)")
        start_step, rng_state = _restore(checkpoint_root, raw_model, model_config, optimizer,
                                         scheduler, scaler, loader, context)
        history = _read_history(metrics_path, start_step)
        if context.is_main:
            ckpt.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    elif checkpoint_root is not None and ckpt.latest_checkpoint(checkpoint_root) is not None:
        raise FileExistsError(f"{out} already holds checkpoints of a run; pass resume=True "
                              "(CLI: --resume) to continue it, or choose a new output directory")
    elif out is not None and context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    distributed.barrier(context)

    # nanoGPT's order: compile the module, then wrap it for DDP. Save `raw_model` only.
    forward_model = torch.compile(raw_model) if config.compile else raw_model
    forward_model = distributed.wrap_model(forward_model, context)
    forward_model.train()
    # Seed (or restore) the RNGs last, so nothing above shifts the dropout streams.
    if rng_state is not None:
        ckpt.restore_rng_state(rng_state)
    else:
        seed_everything(_derive_seed(config.seed, context.rank, start_step))

    def emit(record: dict[str, Any]) -> None:
        history.append(record)
        if metrics_path is not None and context.is_main:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def save(step: int) -> None:
        # Every rank contributes its RNG state (a collective call), rank 0 writes.
        rng = distributed.gather_objects(ckpt.capture_rng_state(), context)
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng}
        state = {"loader": loader.state_dict(), "model_config": model_config,
                 "train_config": dataclasses.asdict(config), "world_size": context.world_size}
        distributed.run_on_main(context, lambda: ckpt.save_checkpoint(
            checkpoint_root, step, model=raw_model, training_state=training_state, state=state,
            keep_last=config.keep_checkpoints))

    running = _RunningMeans(device)
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not (config.progress and context.is_main))
    for step in range(start_step, last_step):
        lr = scheduler.get_last_lr()[0]  # the rate this update uses
        _train_step(forward_model, clipped, loader.next_batch(), loss_step, optimizer, scaler,
                    config, context, autocast, running)
        scheduler.step()
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
            record = {"event": "train", "step": done, "epoch": round(loader.progress, 4), "lr": lr,
                      **running.means(context), "elapsed_s": round(time.perf_counter() - started, 3)}
            running.reset()
            emit(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}" if "loss" in record else "n/a")
        if eval_fn is not None and ((config.eval_every and done % config.eval_every == 0)
                                    or done == config.steps):
            raw_model.eval()
            try:
                with torch.no_grad(), autocast():
                    results = eval_fn(raw_model)
            finally:
                raw_model.train()
            emit({"event": "eval", "step": done, **{k: float(v) for k, v in results.items()}})
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            save(done)
    bar.close()

    if out is not None:
        if start_step < config.steps:
            save(config.steps)

        def write_final() -> None:
            ckpt.save_weights(raw_model, out / "model.safetensors")
            if model_config is not None:
                ckpt.atomic_write_text(out / "config.json", json.dumps(model_config, indent=2, sort_keys=True))
        distributed.run_on_main(context, write_final)
    return TrainResult(history, config.steps, raw_model, out)
