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

import pytest
import torch

from standins import StandInMLM, make_examples, mlm_collate

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 40, 10
VOCAB = 50


def worker(out_dir: str, resume: bool) -> None:
    from tutorial_lib.training.loop import BatchLoader, default_loss_step, train

    torch.set_num_threads(1)  # the same float reduction order in every process
    torch.manual_seed(0)
    examples = make_examples(48, seed=1, vocab=VOCAB, lengths=(4, 16))
    loader = BatchLoader(examples, 8, mlm_collate, seed=3, accumulation_steps=2)

    def slow_loss_step(model, batch):
        # Widens the window between checkpoints so the test can kill mid-run; no effect on values.
        time.sleep(0.01)
        return default_loss_step(model, batch)

    train(StandInMLM(vocab=VOCAB, dropout=0.2), loader, steps=STEPS, save_every=SAVE_EVERY,
          lr=5e-3, warmup_steps=5, log_every=5, progress=False, device="cpu", out_dir=out_dir,
          resume=resume, loss_step=slow_loss_step)


def launch(out_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, __file__, str(out_dir), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    from tutorial_lib.training import checkpoint as ckpt

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
