"""Cost of one ASA training step, relative to a plain training step.

The shape of ``bench_adversarial.py`` by default: one small BERT (``bert-small``, dropout
on), one fixed batch of 16 × 128 tokens, a step being forward + backward of the loss
step's loss with the gradients cleared afterwards (the optimiser update, the same for
every method, is left out). In each round every step is timed between two plain steps
and divided by their mean, so a slow moment of the machine affects both sides of a ratio.

The steps: plain (``default_loss_step``), ``ASA()`` and its ablation ``ASA(adversary=False)``
(M ≡ 1, R-Drop). Both run the encoder forward twice and back-propagate through both
passes, so with F and B a plain step's forward and backward, measured here, their floor is
``(2F + 2B) / (F + B) = 2``. ASA adds its adversaries: per layer and token, two H × H
maps, 4H² multiply-adds against the layer's 12H² (its four H × H attention maps and the
4H-wide feed-forward), so about a third of the model's matrix work once more, forward and
backward, which puts ASA's floor near 2.3 (the authors' adversary is full width); then
the (batch, length, length) scores and the extra score product that zeroes cut units. The
book's goal is ASA ≤ 1.8×, below both floors.

The last line printed is one JSON object: the median ratio of each step, the floor and
the goal.

    python benchmarks/bench_asa.py                    # bert-small, batch 16 × 128 tokens
    python benchmarks/bench_asa.py --model minilm --batch 32 --seq 16   # the CPU SST-2 recipe
    python benchmarks/bench_asa.py --preset tiny --batch 4 --seq 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.techniques.asa import ASA
from tutorial_lib.training.loop import default_loss_step

GOALS = {"asa": 1.8}
METHODS = {"plain": default_loss_step, "asa": ASA(), "r_drop": ASA(adversary=False)}
FLOOR = 2.0  # two forward passes and a backward pass through both, over one of each


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("random", "minilm"), default="random",
                        help="a random model of --preset (default) or the packaged "
                             "all-MiniLM-L6-v2 with a mean-pooling head")
    parser.add_argument("--preset", default="bert-small", help="model preset (default bert-small)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
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
    METHODS["asa"].attach(model)  # the adversaries; the plain step never uses them
    model.train()
    config = model.config
    generator = torch.Generator().manual_seed(0)
    low = min(1000, config.vocab_size // 2)
    ids = torch.randint(low, config.vocab_size, (args.batch, args.seq), generator=generator)
    lengths = torch.randint(max(args.seq // 3, 1), args.seq + 1, (args.batch,), generator=generator)
    lengths[0] = args.seq
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}

    def step(method) -> float:
        start = time.perf_counter()
        loss, _ = method(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"{name} (L={config.num_layers}, d={config.hidden_size}), batch {args.batch} × "
          f"{args.seq} tokens ({int(mask.sum())} real), {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    for _ in range(args.warmup):
        for method in METHODS.values():
            step(method)
    plain = METHODS["plain"]
    ratios = {key: [] for key in METHODS if key != "plain"}
    plain_times = []
    for round_index in range(args.rounds):
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

    report = {key: statistics.median(values) for key, values in ratios.items()}
    plain_ms = statistics.median(plain_times) * 1e3
    print()
    print(f"plain step (forward + backward) {plain_ms:.1f} ms")
    print(f"{'step':<10}{'ratio (median)':>15}{'min':>7}{'max':>7}{'floor':>8}{'goal':>7}")
    for key, values in ratios.items():
        goal = f"≤{GOALS[key]}" if key in GOALS else "-"
        print(f"{key:<10}{report[key]:>14.2f}×{min(values):>6.2f}×{max(values):>6.2f}×"
              f"{FLOOR:>7.2f}×{goal:>7}")
    print(json.dumps({"benchmark": "asa_step_vs_plain_step", "model": name,
                      "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                      "plain_ms": round(plain_ms, 2),
                      "step_time_ratio_vs_plain": {k: round(v, 3) for k, v in report.items()},
                      "floor_ratio": FLOOR, "goals": GOALS}))


if __name__ == "__main__":
    main()
