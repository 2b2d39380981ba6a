"""Checkpoints that survive a crash at any instant and never unpickle arbitrary code.

Layout of a training run's output directory::

    out_dir/
      model.safetensors            final weights (unwrapped model), written atomically
      config.json                  the model config, written atomically
      metrics.jsonl                one JSON object per log/eval event
      checkpoints/
        step-00000200/             one complete checkpoint per directory
          model.safetensors        weights (tied tensors stored once, see below)
          training_state.pt        optimizer, LR scheduler, GradScaler, RNG states
          state.json               step, data-loader position, configs, anything JSON
          manifest.json            written LAST: size and SHA-256 of every file above
        step-00000300/
        .tmp-step-00000400-1234/   a write in progress (ignored, removed by the next save)

**Atomicity.** A checkpoint is assembled in a hidden temporary directory next to its
final place: every file is written and ``fsync``-ed, then ``manifest.json`` is written
and ``fsync``-ed, then the directory itself is ``fsync``-ed and renamed to
``step-XXXXXXXX`` (a rename within one file system is atomic on POSIX), and finally the
parent directory is ``fsync``-ed so the rename survives a power cut. The newest
checkpoint is simply the ``step-*`` directory with the largest step; a crash before the
rename leaves only a ``.tmp-*`` directory, which no reader looks at, so the previous
checkpoint stays the newest. Single files (``model.safetensors``, ``config.json``) go
through the same write-temp-fsync-``os.replace`` sequence.

**Integrity.** Reading a checkpoint checks every file against the manifest (present,
expected size, expected SHA-256) before parsing it, so a truncated or corrupted file is
reported by name instead of surfacing as an obscure parser error mid-training.

**Safety.** Nothing is loaded with plain pickle: tensors come from safetensors, the
optimizer/scheduler/RNG state from ``torch.load(weights_only=True)`` (tensors and
plain containers only) and everything else from JSON.

**Tied weights.** safetensors refuses two names for one storage (e.g. an MLM decoder
tied to the word embeddings). Each storage is saved once; the other names are listed in
the file's metadata under ``tutorial_lib.aliases`` and restored on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TRAINING_STATE = "training_state.pt"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_ALIASES_KEY = "tutorial_lib.aliases"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or belongs to another model."""


# -- durable writes -----------------------------------------------------------------

def _fsync_directory(path: Path) -> None:
    # Makes a rename or a new file's directory entry durable; not possible on Windows.
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see either the old or the new file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_durably(temporary, data)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# -- weights --------------------------------------------------------------------------

def _deduplicate_shared(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One CPU copy per distinct tensor view; returns (tensors to save, {alias: saved name})."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        # Two names for exactly the same view of the same storage = tied weights.
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in seen and tensor.numel() > 0:  # empty tensors all share address 0
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # A fresh copy per entry, so partially overlapping views (which safetensors
        # rejects) become independent tensors.
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def weights_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a model's ``state_dict`` to safetensors bytes (tied weights once)."""
    tensors, aliases = _deduplicate_shared(model.state_dict())
    meta = {"format": "pt", _ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    meta.update(metadata or {})
    return safetensors.torch.save(tensors, metadata=meta)


def _safetensors_metadata(data: bytes, source: Path) -> dict[str, str]:
    # The safetensors header is an 8-byte little-endian length followed by JSON.
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
    except (struct.error, ValueError) as error:
        raise CheckpointError(f"{source} is not a valid safetensors file: {error}") from None
    return header.get("__metadata__", {}) or {}


def state_dict_from_bytes(data: bytes, source: Path) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes written by :func:`weights_bytes`, restoring tied names."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error type for bad files
        raise CheckpointError(f"{source} is corrupted or truncated: {error}") from None
    aliases = json.loads(_safetensors_metadata(data, source).get(_ALIASES_KEY, "{}"))
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    return tensors


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Atomically write the (unwrapped) model's weights to a safetensors file."""
    atomic_write_bytes(path, weights_bytes(model))


def load_weights(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read weights saved by :func:`save_weights`; load them into ``model`` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state_dict = state_dict_from_bytes(path.read_bytes(), path)
    if model is not None:
        _load_into(model, state_dict, path)
    return state_dict


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {source} do not fit this model: {error}") from None


# -- configs --------------------------------------------------------------------------

def config_as_dict(config: Any) -> dict[str, Any] | None:
    """A model config as a plain dict (dataclass with ``to_dict``, dict, or ``None``)."""
    if config is None or isinstance(config, dict):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"model_config must be a dict or have to_dict(), got {type(config).__name__}")


def check_same_config(saved: dict[str, Any] | None, current: dict[str, Any] | None, source: Path) -> None:
    """Raise :class:`CheckpointError` listing every field where the configs differ."""
    if saved is None or current is None:
        return
    # JSON turns tuples into lists; compare through JSON so that is not a difference.
    current = json.loads(json.dumps(current))
    differences = [f"  {name}: checkpoint has {saved.get(name, '<missing>')!r}, "
                   f"current model has {current.get(name, '<missing>')!r}"
                   for name in sorted(set(saved) | set(current))
                   if saved.get(name, "<missing>") != current.get(name, "<missing>")]
    if differences:
        raise CheckpointError(f"checkpoint {source} was written for a different model config; "
                              "differing fields:\n" + "\n".join(differences))


# -- random number generators -----------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: Python, NumPy's global one, torch CPU and CUDA.

    Plain containers and tensors only, so it round-trips through ``weights_only`` loading.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": keys.tolist(), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- whole checkpoints ----------------------------------------------------------------

@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk (nothing applied to any object yet)."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    state: dict[str, Any]


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory under ``root`` (``out_dir/checkpoints``), if any."""
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def save_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module,
                    training_state: dict[str, Any], state: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``root/step-XXXXXXXX`` atomically and prune older ones.

    ``model`` must be the unwrapped module; ``training_state`` may hold tensors and
    plain containers (optimizer, scheduler, RNG states); ``state`` must be JSON-able.
    Call this on one process only (rank 0).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)

    buffer = io.BytesIO()
    torch.save(training_state, buffer)
    files = {
        WEIGHTS: weights_bytes(model),
        TRAINING_STATE: buffer.getvalue(),
        STATE: json.dumps({**state, "step": step}, indent=1, sort_keys=True).encode("utf-8"),
    }
    manifest = {"format_version": FORMAT_VERSION, "step": step,
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in files.items()}}

    final = root / f"step-{step:08d}"
    if final.exists():
        # Replacing it could not be atomic (a directory rename cannot overwrite a full
        # directory), and a loop that resumes never saves the same step twice.
        raise FileExistsError(f"checkpoint {final} already exists")
    temporary = root / f".tmp-{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    for name, data in files.items():
        _write_durably(temporary / name, data)
    _write_durably(temporary / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    _fsync_directory(temporary)

    os.replace(temporary, final)
    _fsync_directory(root)

    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    _remove_leftovers(root)
    return final


def _remove_leftovers(root: Path) -> None:
    # Interrupted writes; never read, safe to delete.
    for entry in root.iterdir():
        if entry.name.startswith(".tmp-") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _read_verified(directory: Path, name: str, expected: dict[str, Any]) -> bytes:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing (listed in {MANIFEST})")
    data = path.read_bytes()
    if len(data) != expected["bytes"]:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupted: "
                              f"{len(data)} bytes, manifest says {expected['bytes']}")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupted: its SHA-256 does not "
                              f"match {MANIFEST}")
    return data


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read and verify one checkpoint directory; raises :class:`CheckpointError` naming the bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is corrupted: {error}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path} has format version {manifest.get('format_version')!r}; "
                              f"this library reads version {FORMAT_VERSION}")
    for name in (WEIGHTS, TRAINING_STATE, STATE):
        if name not in files:
            raise CheckpointError(f"{manifest_path} does not list {name}")

    data = {name: _read_verified(directory, name, files[name]) for name in (WEIGHTS, TRAINING_STATE, STATE)}
    model_state = state_dict_from_bytes(data[WEIGHTS], directory / WEIGHTS)
    try:
        training_state = torch.load(io.BytesIO(data[TRAINING_STATE]), map_location="cpu",
                                    weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and containers
        raise CheckpointError(f"{directory / TRAINING_STATE} cannot be loaded safely: {error}") from None
    try:
        state = json.loads(data[STATE])
    except ValueError as error:
        raise CheckpointError(f"{directory / STATE} is not valid JSON: {error}") from None
    return Checkpoint(directory, int(state["step"]), model_state, training_state, state)


def load_model_state(model: nn.Module, checkpoint: Checkpoint, model_config: Any = None) -> None:
    """Check the config recorded in ``checkpoint`` against ``model_config``, then load weights."""
    check_same_config(checkpoint.state.get("model_config"), config_as_dict(model_config),
                      checkpoint.path)
    _load_into(model, checkpoint.model_state, checkpoint.path / WEIGHTS)
