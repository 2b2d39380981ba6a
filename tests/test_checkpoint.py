"""Checkpoint format: atomic writes, integrity checks, safe loading, tied weights, RNGs."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tutorial_lib.training import checkpoint as ckpt


class Tied(nn.Module):
    """Embedding and output projection share one matrix (as in BERT's MLM head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 7)
        self.out.weight = self.embed.weight


def save(root: Path, step: int, model: nn.Module | None = None, **state) -> Path:
    model = model or Tied()
    optimizer = torch.optim.AdamW(model.parameters())
    return ckpt.save_checkpoint(root, step, model=model,
                                training_state={"optimizer": optimizer.state_dict(), "values": torch.arange(3)},
                                state={"model_config": {"hidden": 4}, **state})


def test_weights_roundtrip_keeps_tied_tensors_once(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ckpt.save_weights(model, tmp_path / "w.safetensors")
    from safetensors import safe_open
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:
        stored = set(handle.keys())
    assert "out.weight" not in stored and "embed.weight" in stored  # one copy on disk
    fresh = Tied()
    loaded = ckpt.load_weights(tmp_path / "w.safetensors", fresh)
    assert set(loaded) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    assert fresh.out.weight is fresh.embed.weight  # loading does not untie
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        ckpt.load_weights(tmp_path / "nothing.safetensors")


def test_checkpoint_roundtrip_and_pruning(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    for step in (10, 20, 30):
        save(tmp_path, step, model, loader={"epoch": 1})
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000020", "step-00000030"]
    loaded = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert loaded.step == 30 and loaded.state["loader"] == {"epoch": 1}
    assert torch.equal(loaded.training_state["values"], torch.arange(3))
    target = Tied()
    ckpt.load_model_state(target, loaded, {"hidden": 4})
    assert torch.equal(target.embed.weight, model.embed.weight)
    with pytest.raises(FileExistsError, match="step-00000030"):
        save(tmp_path, 30, model)  # overwriting a directory could not be atomic


def test_interrupted_rename_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """The rename of the finished temporary directory into place is the commit point."""
    save(tmp_path, 10, note="first")

    def crash(source, target):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 20, note="second")
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000010"
    assert ckpt.read_checkpoint(latest).state["note"] == "first"
    assert any(p.name.startswith(".tmp-step-00000020") for p in tmp_path.iterdir())
    monkeypatch.undo()
    save(tmp_path, 30, note="third")  # the next save cleans up the leftover
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path)).state["note"] == "third"


def test_crash_while_writing_files_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 10, note="first")
    real_write = ckpt._write_durably

    def dies_on_second_file(path, data):
        if path.name == ckpt.TRAINING_STATE:
            path.write_bytes(data[: len(data) // 2])  # half a file, then the process "dies"
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_durably", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20)
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path)).state["note"] == "first"


def test_atomic_write_keeps_old_content_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    ckpt.atomic_write_text(target, "old")

    def fail(source, destination):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        ckpt.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left


def test_truncated_corrupted_and_missing_files_are_named(tmp_path):
    directory = save(tmp_path, 5)
    weights = directory / ckpt.WEIGHTS
    original = weights.read_bytes()

    weights.write_bytes(original[:-10])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is truncated"):
        ckpt.read_checkpoint(directory)

    flipped = bytearray(original)
    flipped[-1] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is corrupted"):
        ckpt.read_checkpoint(directory)

    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is missing"):
        ckpt.read_checkpoint(directory)

    (directory / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest.json is missing"):
        ckpt.read_checkpoint(directory)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_checkpoint(tmp_path / "step-00000099")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_training_state_is_never_unpickled_as_code(tmp_path):
    """A file whose hash matches the manifest but holds a pickled callable is refused."""
    directory = save(tmp_path, 5)
    buffer = io.BytesIO()
    torch.save({"payload": Evil()}, buffer)
    data = buffer.getvalue()
    (directory / ckpt.TRAINING_STATE).write_bytes(data)
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    import hashlib
    manifest["files"][ckpt.TRAINING_STATE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="training_state.pt cannot be loaded safely"):
        ckpt.read_checkpoint(directory)


def test_config_mismatch_lists_every_differing_field(tmp_path):
    directory = ckpt.save_checkpoint(tmp_path, 1, model=Tied(), training_state={},
                                     state={"model_config": {"hidden": 4, "layers": 2, "heads": 2}})
    loaded = ckpt.read_checkpoint(directory)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_model_state(Tied(), loaded, {"hidden": 8, "layers": 2, "heads": 4})
    message = str(error.value)
    assert "hidden: checkpoint has 4, current model has 8" in message
    assert "heads: checkpoint has 2, current model has 4" in message
    assert "layers" not in message
    with pytest.raises(ckpt.CheckpointError, match="do not fit this model"):
        ckpt.load_model_state(nn.Linear(2, 2), loaded, {"hidden": 4, "layers": 2, "heads": 2})


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    directory = ckpt.save_checkpoint(tmp_path, 1, model=Tied(), training_state={"rng": [state]}, state={})
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.read_checkpoint(directory).training_state["rng"][0])
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="step"):
        ckpt.save_checkpoint("unused", -1, model=Tied(), training_state={}, state={})
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint("unused", 1, model=Tied(), training_state={}, state={}, keep_last=0)
