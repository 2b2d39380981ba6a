"""Kill a training process with SIGKILL after a checkpoint, resume it, and demand the
bitwise-identical final weights of an uninterrupted run.

The run has dropout (global torch RNG) and MLM-style masking (loader generator), so an
RNG or data-position bug in the checkpoint changes the result. This file is also the
worker: ``python tests/test_resume_sigkill.py OUT_DIR [--resume]``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 40, 10
VOCAB = 50


class StandInMLM(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.config = {"vocab_size": VOCAB, "hidden_size": hidden}
        self.embed = nn.Embedding(VOCAB, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(0.2)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)  # (batch, seq, hidden)
        weights = attention_mask[..., None].float()
        context = (h * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        logits = self.out(self.dropout(h + torch.tanh(self.mix(context))))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def collate(examples, generator=None):
    length = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, :len(example)], mask[row, :len(example)] = torch.tensor(example), 1
    chosen = (torch.rand(ids.shape, generator=generator) < 0.25) & (mask == 1)
    return {"input_ids": torch.where(chosen, torch.ones_like(ids), ids), "attention_mask": mask,
            "labels": torch.where(chosen, ids, torch.full_like(ids, -100))}


def worker(out_dir: str, resume: bool) -> None:
    from tutorial_lib.training import BatchLoader, default_loss_step, train

    torch.set_num_threads(1)  # the same float reduction order in every process
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(2, VOCAB, (int(n),), generator=generator).tolist()
                for n in torch.randint(4, 16, (48,), generator=generator)]
    loader = BatchLoader(examples, 8, collate, seed=3, accumulation_steps=2)

    def slow_loss_step(model, batch):
        # Widens the window between checkpoints so the test can kill mid-run; no effect on values.
        time.sleep(0.01)
        return default_loss_step(model, batch)

    train(StandInMLM(), loader, steps=STEPS, save_every=SAVE_EVERY, lr=5e-3, warmup_steps=5,
          log_every=5, progress=False, device="cpu", out_dir=out_dir, resume=resume,
          loss_step=slow_loss_step)


def launch(out_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, __file__, str(out_dir), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    from tutorial_lib import checkpoint as ckpt

    victim = launch(tmp_path / "victim")
    first_checkpoint = tmp_path / "victim" / "checkpoints" / f"step-{SAVE_EVERY:08d}"
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists():  # appears atomically (renamed into place)
        assert victim.poll() is None, victim.communicate()[0].decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "model.safetensors").exists(), "killed too late to test resume"
    resumed_from = ckpt.latest_checkpoint(tmp_path / "victim" / "checkpoints")
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < STEPS

    resumed = launch(tmp_path / "victim", "--resume")
    # The uninterrupted reference runs in this process meanwhile (one torch import fewer).
    threads = torch.get_num_threads()
    try:
        worker(str(tmp_path / "reference"), resume=False)
    finally:
        torch.set_num_threads(threads)
    output = resumed.communicate(timeout=180)[0].decode()
    assert resumed.returncode == 0, output

    expected = ckpt.load_weights(tmp_path / "reference" / "model.safetensors")
    actual = ckpt.load_weights(tmp_path / "victim" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs after resume"


if __name__ == "__main__":
    worker(sys.argv[1], resume="--resume" in sys.argv[2:])
elif not hasattr(signal, "SIGKILL"):
    pytest.skip("SIGKILL is POSIX-only", allow_module_level=True)
