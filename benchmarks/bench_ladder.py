"""Memory and time of a ladder side-tuning (LST) training step, relative to full fine-tuning.

By default all-MiniLM-L6-v2 with a mean-pooling head at SST-2's CPU batch shape (32 phrases
of 16 tokens, some padded), dropout on. A step is forward + backward + AdamW update, with
the gradients cleared afterwards: the update is part of what LST saves (full fine-tuning
updates 22.6 M parameters, LST 0.3 M). In each round every LST step is timed between two
full fine-tuning steps and divided by their mean, so a slow moment of the machine affects
both sides of a ratio.

Memory is what :func:`tutorial_lib.techniques.ladder.training_memory` counts: every
weight, a gradient and Adam's two moments per trainable parameter, and the activations
autograd saves for the backward pass (distinct storages, on this device; the memory a GPU
would hold, less the framework's workspace and the batch).

The book's goals: LST's memory ≤ 0.4× and its step time ≤ 0.6× full fine-tuning's, with
an accuracy within 2 points of it (read from chapter 9's committed record, printed when
the model is MiniLM). The last line printed is one JSON object with the ratios and goals.

    python benchmarks/bench_ladder.py                          # MiniLM, batch 32 × 16
    python benchmarks/bench_ladder.py --model random --preset bert-base --seq 128
    python benchmarks/bench_ladder.py --model random --preset tiny --batch 2 --seq 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.techniques import ladder

GOALS = {"memory": 0.4, "time": 0.6, "accuracy_points": 2.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("random", "minilm"), default="minilm",
                        help="the packaged all-MiniLM-L6-v2 (default) or a random model of --preset")
    parser.add_argument("--preset", default="bert-small", help="model preset for --model random")
    parser.add_argument("--vocab", type=int, default=30522, help="vocabulary size (--model random)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length (default 16)")
    parser.add_argument("--reduction", type=int, default=8, help="LST's r (default 8)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def classifier(args):
    if args.model == "minilm":
        from tutorial_lib.studies.finetune import MINILM, load_start

        start = load_start(MINILM)
        torch.manual_seed(0)
        return start.classifier("mean"), MINILM
    config = TransformerConfig.preset(args.preset, vocab_size=args.vocab)
    torch.manual_seed(0)
    return SequenceClassifier(config, num_labels=2, pooling="mean"), f"random {args.preset}"


def record_accuracies() -> dict[str, float] | None:
    """Mean development accuracy per method of chapter 9's record, or None without it."""
    try:
        from tutorial_lib.studies.ladder import load_ladder_study
        from tutorial_lib.studies.records import RecordError

        runs = load_ladder_study()["runs"]
    except (ImportError, RecordError):
        return None
    methods = {}
    for run in runs:
        methods.setdefault(run["method"], []).append(run["accuracy"])
    return {name: statistics.mean(values) for name, values in methods.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    full, name = classifier(args)
    side_source, _ = classifier(args)
    models = {"full": full,
              "lst": ladder.LadderSideTuning(side_source.encoder, reduction=args.reduction)}
    config = full.config
    generator = torch.Generator().manual_seed(0)
    low = min(1000, config.vocab_size // 2)
    ids = torch.randint(low, config.vocab_size, (args.batch, args.seq), generator=generator)
    lengths = torch.randint(max(args.seq // 3, 1), args.seq + 1, (args.batch,), generator=generator)
    lengths[0] = args.seq
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}

    memory = {key: ladder.training_memory(model, batch) for key, model in models.items()}
    optimizers = {key: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                         lr=1e-5) for key, model in models.items()}

    def step(key) -> float:
        model, optimizer = models[key], optimizers[key]
        model.train()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"{name} (L={config.num_layers}, d={config.hidden_size}), batch {args.batch} × "
          f"{args.seq} tokens ({int(mask.sum())} real), r = {args.reduction}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds, torch {torch.__version__}")
    for _ in range(args.warmup):
        for key in models:
            step(key)
    ratios = {key: [] for key in models if key != "full"}
    full_times = []
    for round_index in range(args.rounds):
        before = step("full")
        full_times.append(before)
        for key in ratios:
            method_time = step(key)
            after = step("full")
            full_times.append(after)
            ratios[key].append(method_time / ((before + after) / 2))
            before = after
        print(f"round {round_index + 1}: full {full_times[-1] * 1e3:.1f} ms; "
              + ", ".join(f"{key} {ratios[key][-1]:.2f}×" for key in ratios))

    time_ratio = {key: statistics.median(values) for key, values in ratios.items()}
    memory_ratio = {key: memory[key]["total"] / memory["full"]["total"] for key in ratios}
    mib = lambda n: n / 2**20  # noqa: E731
    print()
    print(f"{'method':<7}{'weights':>9}{'grads':>8}{'Adam':>8}{'saved act.':>11}{'total MiB':>10}"
          f"{'memory':>9}{'time':>8}")
    for key in models:
        m = memory[key]
        tail = (f"{memory_ratio[key]:>8.2f}×{time_ratio[key]:>7.2f}×" if key in ratios
                else f"{'1':>8}×{'1':>7}×")
        print(f"{key:<7}{mib(m['weights']):>9.1f}{mib(m['gradients']):>8.1f}"
              f"{mib(m['optimizer']):>8.1f}{mib(m['activations']):>11.1f}{mib(m['total']):>10.1f}"
              + tail)
    print(f"full fine-tuning step {statistics.median(full_times) * 1e3:.1f} ms; goals: memory "
          f"≤ {GOALS['memory']}×, time ≤ {GOALS['time']}×")
    accuracy = None
    if args.model == "minilm":
        means = record_accuracies()
        if means and "full" in means and "LST" in means:
            accuracy = {"full": round(means["full"], 4), "lst": round(means["LST"], 4),
                        "lst_minus_full_points": round(100 * (means["LST"] - means["full"]), 2)}
            print(f"chapter 9's record (mean of its seeds): full {means['full']:.3f}, "
                  f"LST {means['LST']:.3f} ({accuracy['lst_minus_full_points']:+.1f} points; "
                  f"goal within {GOALS['accuracy_points']})")
    print(json.dumps({"benchmark": "lst_step_vs_full_fine_tuning", "model": name,
                      "batch": args.batch, "seq": args.seq, "reduction": args.reduction,
                      "threads": torch.get_num_threads(),
                      "full_ms": round(statistics.median(full_times) * 1e3, 2),
                      "memory_bytes": {k: v["total"] for k, v in memory.items()},
                      "memory_ratio_vs_full": {k: round(v, 3) for k, v in memory_ratio.items()},
                      "step_time_ratio_vs_full": {k: round(v, 3) for k, v in time_ratio.items()},
                      "accuracy": accuracy, "goals": GOALS}))


if __name__ == "__main__":
    main()
