"""Two CPU processes (gloo, torchrun-style environment) train like one process.

Same global batch, same data stream: the 2-process run (each rank 2 micro-batches of
accumulation, so DDP's ``no_sync`` path is exercised) must end at the weights of a
1-process run without accumulation. Not bitwise: the all-reduce adds the two ranks'
gradients in another order than one process's backward pass does, and float addition
is not associative, so the weights agree to float32 rounding (checked at rtol 1e-5,
atol 1e-6), not bit for bit.

This file is also the worker: ``python tests/test_ddp.py OUT_DIR RESULT_JSON ACCUMULATION``
(with RANK/WORLD_SIZE/... in the environment for a distributed run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from standins import StandInMLM, make_examples, mlm_collate

REPO = Path(__file__).resolve().parents[1]
VOCAB, GLOBAL_BATCH, STEPS = 30, 8, 6


def worker(out_dir: str, result_path: str, accumulation_steps: int) -> None:
    from tutorial_lib.training import distributed
    from tutorial_lib.training.loop import BatchLoader, train

    torch.set_num_threads(1)
    context = distributed.init_distributed("cpu")
    try:
        torch.manual_seed(0)  # every rank builds the same model; DDP would broadcast rank 0's anyway
        examples = make_examples(40, seed=1, vocab=VOCAB, lengths=(3, 12))
        loader = BatchLoader(examples, GLOBAL_BATCH, mlm_collate, seed=5, rank=context.rank,
                             world_size=context.world_size, accumulation_steps=accumulation_steps)
        # No dropout: ranks draw different dropout masks by design, which would hide the check.
        result = train(StandInMLM(vocab=VOCAB, dropout=0.0), loader, steps=STEPS, lr=1e-2,
                       warmup_steps=2, log_every=2, save_every=3, progress=False, device="cpu",
                       out_dir=out_dir)
        Path(result_path).write_text(json.dumps({"rank": context.rank, "world_size": context.world_size,
                                                 "history": result.history}))
    finally:
        distributed.cleanup()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    from tutorial_lib.training import checkpoint as ckpt

    base = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        base.pop(key, None)
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {**base, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        # Each rank gets its own out_dir, as on machines without a shared file system:
        # whatever rank 1 writes would show up in its directory.
        processes.append(subprocess.Popen(
            [sys.executable, __file__, str(tmp_path / f"ddp_rank{rank}"),
             str(tmp_path / f"result{rank}.json"), "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    # The 1-process reference runs here, while the ranks start (saves a torch import).
    threads = torch.get_num_threads()
    try:
        worker(str(tmp_path / "single"), str(tmp_path / "single.json"), 1)
    finally:
        torch.set_num_threads(threads)
    for process in processes:
        output = process.communicate(timeout=180)[0].decode()
        assert process.returncode == 0, output

    single = ckpt.load_weights(tmp_path / "single" / "model.safetensors")
    ddp = ckpt.load_weights(tmp_path / "ddp_rank0" / "model.safetensors")
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ddp[name], torch.zeros_like(ddp[name]))

    # Only rank 0 wrote files; rank 1 only read (nothing to read on a fresh run).
    assert not (tmp_path / "ddp_rank1").exists() or not any((tmp_path / "ddp_rank1").rglob("*"))
    assert {p.name for p in (tmp_path / "ddp_rank0").iterdir()} == {
        "checkpoints", "metrics.jsonl", "model.safetensors", "config.json"}
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "ddp_rank0" / "checkpoints")] == \
        ["step-00000003", "step-00000006"]
    saved = ckpt.read_checkpoint(tmp_path / "ddp_rank0" / "checkpoints" / "step-00000006")
    assert len(saved.training_state["rng"]) == 2  # one RNG state per rank
    assert saved.state["world_size"] == 2

    # The logged loss is the global-batch mean, the same on both ranks and in one process.
    results = [json.loads((tmp_path / name).read_text())
               for name in ("result0.json", "result1.json", "single.json")]
    losses = [[r["loss"] for r in result["history"]] for result in results]
    assert losses[0] == losses[1]
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[2]), rtol=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
