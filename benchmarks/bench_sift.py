"""Cost of one SiFT training step, relative to a plain training step.

One model and one fixed batch, in training mode (dropout on). A step is the loss step
(``default_loss_step``, ``SiFT()`` or ``SiFT(ascent=False)``), ``backward()``, one AdamW
update and clearing the gradients, so each ratio is what a run of
:func:`tutorial_lib.training.loop.train` pays per update. In each round every SiFT step
is timed between two plain steps and divided by their mean (as ``bench_adversarial.py``),
so a slow moment of the machine affects both sides of a ratio.

SiFT runs three forward passes and two backward passes (the first of which stops at δ:
no weight gradients), ``ascent=False`` ("noise only") two and one. The stated floor
counts these passes in units of a plain step's parts, measured here: with F the
forward, B the backward and U the AdamW update of a plain step,
``(3F + 2B + U) / (F + B + U)`` for SiFT and ``(2F + B + U) / (F + B + U)`` for noise
only. Its final ``backward()`` however runs back through two forward passes, the clean
and the perturbed one (both train the weights), so the work of a step is closer to
``3F + 2B + B_δ + U`` and ``2F + 2B + U``, with ``B_δ`` the cost of the ascent pass's
backward to δ only (measured too): the "traversal" floor. The book's goal is SiFT
≤ 2.5× a plain step.

The last line printed is one JSON object: the median ratio of each step, the floors and
the goal.

    python benchmarks/bench_sift.py                          # MiniLM, batch 32 × 16 tokens
    python benchmarks/bench_sift.py --model random --preset tiny --batch 4 --seq 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.techniques import adversarial as adv
from tutorial_lib.techniques.sift import SiFT
from tutorial_lib.training.loop import default_loss_step

GOALS = {"sift": 2.5}
METHODS = {
    "plain": default_loss_step,
    "sift": SiFT(),
    "sift_noise_only": SiFT(ascent=False),
}
# Forward and backward passes of each step (the stated floor) and the backward passes its
# backward() and autograd.grad run through: (forwards, backwards with weight gradients,
# backwards to δ only).
PASSES = {"sift": (3, 2), "sift_noise_only": (2, 1)}
TRAVERSALS = {"sift": (3, 2, 1), "sift_noise_only": (2, 2, 0)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "random"), default="minilm",
                        help="the packaged all-MiniLM-L6-v2 with a mean-pooling head (default), "
                             "or a random model of --preset")
    parser.add_argument("--preset", default="tiny", help="preset of the random model (default tiny)")
    parser.add_argument("--vocab", type=int, default=1000,
                        help="vocabulary of the random model (default 1000)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32, the CPU "
                                                              "SST-2 recipe)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per example (default 16, the "
                                                            "CPU SST-2 recipe)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def build_model(args):
    if args.model == "minilm":
        from tutorial_lib.studies.finetune import MINILM, load_start

        start = load_start(MINILM)
        torch.manual_seed(0)
        return start.classifier("mean"), MINILM
    config = TransformerConfig.preset(args.preset, vocab_size=args.vocab)
    torch.manual_seed(0)
    return SequenceClassifier(config, num_labels=2, pooling="mean"), f"random {args.preset}"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = build_model(args)
    model.train()
    config = model.config
    # Short phrases padded to the batch's longest, as the CPU SST-2 recipe's batches.
    generator = torch.Generator().manual_seed(0)
    low = min(1000, config.vocab_size // 2)
    ids = torch.randint(low, config.vocab_size, (args.batch, args.seq), generator=generator)
    lengths = torch.randint(max(args.seq // 3, 1), args.seq + 1, (args.batch,), generator=generator)
    lengths[0] = args.seq
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}
    # A tiny learning rate: the weights hardly move, the update costs what it always costs.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.01)

    def step(method) -> float:
        start = time.perf_counter()
        loss, _ = method(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def plain_parts() -> tuple[float, float, float]:
        """(forward, backward, update) seconds of one plain step."""
        start = time.perf_counter()
        loss, _ = default_loss_step(model, batch)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return forward - start, backward - forward, end - backward

    def delta_backward() -> float:
        """Seconds of a backward pass to a δ at the embedding sum only (SiFT's ascent pass)."""
        delta = torch.zeros(*ids.shape, config.hidden_size, requires_grad=True)
        loss = adv.forward_with(model, batch, delta, "embedding_sum").loss
        start = time.perf_counter()
        torch.autograd.grad(loss, delta)
        return time.perf_counter() - start

    print(f"{name} (L={config.num_layers}, d={config.hidden_size}), batch {args.batch} × "
          f"{args.seq} tokens ({int(mask.sum())} real), {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    for _ in range(args.warmup):
        for method in METHODS.values():
            step(method)
        plain_parts()
        delta_backward()
    plain = METHODS["plain"]
    ratios = {key: [] for key in METHODS if key != "plain"}
    plain_times, parts = [], []
    for round_index in range(args.rounds):
        parts.append((*plain_parts(), delta_backward()))
        before = step(plain)
        plain_times.append(before)
        for key in ratios:
            method_time = step(METHODS[key])
            after = step(plain)
            plain_times.append(after)
            ratios[key].append(method_time / ((before + after) / 2))
            before = after
        print(f"round {round_index + 1}: plain {plain_times[-1] * 1e3:.1f} ms; "
              + ", ".join(f"{key} {ratios[key][-1]:.2f}×" for key in ratios))

    forward, backward, update, to_delta = (statistics.median(p[i] for p in parts)
                                           for i in range(4))
    total = forward + backward + update
    floors = {key: (f * forward + b * backward + update) / total for key, (f, b) in PASSES.items()}
    traversals = {key: (f * forward + b * backward + d * to_delta + update) / total
                  for key, (f, b, d) in TRAVERSALS.items()}
    report = {key: statistics.median(values) for key, values in ratios.items()}
    plain_ms = statistics.median(plain_times) * 1e3
    print()
    print(f"plain step {plain_ms:.1f} ms: forward {forward * 1e3:.1f}, backward "
          f"{backward * 1e3:.1f}, AdamW update {update * 1e3:.1f} ms; a backward to δ only "
          f"{to_delta * 1e3:.1f} ms")
    print(f"{'step':<17}{'ratio (median)':>15}{'min':>7}{'max':>7}{'floor':>8}"
          f"{'traversals':>12}{'goal':>7}")
    for key, values in ratios.items():
        goal = f"≤{GOALS[key]}" if key in GOALS else "-"
        print(f"{key:<17}{report[key]:>14.2f}×{min(values):>6.2f}×{max(values):>6.2f}×"
              f"{floors[key]:>7.2f}×{traversals[key]:>11.2f}×{goal:>7}")
    print("floor: (3F + 2B + U) and (2F + B + U); traversals: (3F + 2B + Bδ + U) and "
          "(2F + 2B + U); all over a plain step's F + B + U")
    print(json.dumps({"benchmark": "sift_step_vs_plain_step", "model": name,
                      "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                      "plain_ms": round(plain_ms, 2),
                      "step_time_ratio_vs_plain": {k: round(v, 3) for k, v in report.items()},
                      "floor_ratio": {k: round(v, 3) for k, v in floors.items()},
                      "traversal_floor_ratio": {k: round(v, 3) for k, v in traversals.items()},
                      "goals": GOALS}))


if __name__ == "__main__":
    main()
