"""Data-parallel training with ``torchrun``: detection, process group, DDP wrapping.

The same training loop runs in a notebook (one process, no process group) and under
``torchrun --nproc_per_node=N`` (N processes, one per device). ``torchrun`` tells each
process who it is through environment variables:

* ``RANK`` — this process's index among all processes (0 … WORLD_SIZE−1);
* ``WORLD_SIZE`` — the number of processes;
* ``LOCAL_RANK`` — its index on this machine, used to pick the GPU;
* ``MASTER_ADDR`` / ``MASTER_PORT`` — where rank 0 listens for the rendezvous.

Conventions used throughout :mod:`tutorial_lib.training.loop`:

* The *global* batch size is fixed by the config and does not change with the number
  of processes; each rank sees ``global_batch_size / world_size`` examples per step.
* Only rank 0 writes files, logs and shows a progress bar; every rank takes part in
  the collective calls (barriers, all-reduces) so nobody waits forever.
* The model that is saved is always the *unwrapped* module (never the
  ``DistributedDataParallel`` or ``torch.compile`` wrapper), so its ``state_dict``
  keys carry no ``module.`` or ``_orig_mod.`` prefix.

The design follows nanoGPT's ``train.py`` (env detection, ``nccl`` on GPUs, ``gloo`` on
CPU, ``destroy_process_group`` at the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is. A notebook run is ``rank=0, world_size=1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and logs."""
        return self.rank == 0


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by torchrun, else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as error:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def select_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """Resolve ``"auto"`` to the best available device: CUDA, then Apple MPS, then CPU.

    Under torchrun each process takes the GPU numbered by its ``local_rank``.
    """
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a valid torch device: {error}") from None
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def current_context(device: str | torch.device = "auto") -> DistributedContext:
    """The context of an already-initialised process group (or of a single process)."""
    if dist.is_available() and dist.is_initialized():
        env = torchrun_env()
        local_rank = env[2] if env else dist.get_rank()
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank,
                                  select_device(device, local_rank))
    return DistributedContext(device=select_device(device))


def init_distributed(device: str | torch.device = "auto") -> DistributedContext:
    """Join the process group if torchrun started us; otherwise return a 1-process context.

    The backend is ``nccl`` when training on CUDA and ``gloo`` otherwise (CPU; also the
    only backend the tests can use on a laptop). Calling it twice is harmless.
    """
    env = torchrun_env()
    if env is None or env[1] == 1:
        return current_context(device)
    rank, world_size, local_rank = env
    resolved = select_device(device, local_rank)
    if not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, resolved)


def cleanup() -> None:
    """Leave the process group (torchrun warns about leaked groups otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank; a no-op for a single process."""
    if context.is_distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` when there is more than one process.

    DDP broadcasts rank 0's parameters at construction, so every rank starts from the
    same weights even if their initialisation RNGs differed.
    """
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum a tensor over ranks (in place) and return it; identity for one process."""
    if context.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value: Any, context: DistributedContext) -> list[Any]:
    """Collect one small Python value from every rank (e.g. RNG states for a checkpoint)."""
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def run_on_main(context: DistributedContext, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0 only, with barriers so no rank reads a half-written file.

    If the action fails on rank 0 the error is re-raised there; other ranks would hang
    at the second barrier, so rank 0 must crash the job (torchrun then stops it).
    """
    barrier(context)
    result = action() if context.is_main else None
    barrier(context)
    return result
