"""Windowed against full attention as the sequence grows: time and peak memory.

One attention layer (:class:`tutorial_lib.core.attention.MultiHeadAttention`, RoPE on),
forward and backward (a squared-mean loss of its output, gradients to the
weights and the input), in training mode without dropout, at sequence lengths
that double (512 ... 8192 by default) and a fixed window. Three variants share
the same weights and inputs:

* ``full``: no window; PyTorch's fused ``scaled_dot_product_attention``;
* ``window``: a :class:`~tutorial_lib.core.attention.SlidingWindowMask`, which the core
  computes block by block (the banded path);
* ``window_dense`` (unless ``--no-dense-window``): the same window as a mask on the
  full n x n score matrix, i.e. what the core did before the banded path.

Variants are timed in interleaved rounds (a slow moment of a shared machine hits
all of them) and the median is kept. Peak memory is the high-water mark of the
allocations made during one step, read from the profiler's allocation events
(the measurement of ``bench_encoder.py``). The growth exponent of each variant is
the least-squares slope of log(time) (and log(peak memory)) against log(n):
about 2 for full attention, about 1 for the banded window.

The last line printed is one JSON object with, for every n, the times, the peak
memories and the window/full ratios, and the exponents.

    python benchmarks/bench_window.py
    python benchmarks/bench_window.py --seqs 512 1024 2048 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from bench_encoder import peak_step_memory

from tutorial_lib import AttentionContext, MultiHeadAttention, RotaryEmbedding, SlidingWindowMask


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--window", type=int, default=256, help="window (default 256)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="sequence lengths (default 512 1024 2048 4096 8192)")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--no-dense-window", action="store_true",
                        help="skip the window-as-dense-mask variant")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def step_function(attn: MultiHeadAttention, plugins: list, banded: bool, x: torch.Tensor,
                  causal: bool):
    positions = torch.arange(x.shape[1])[None]

    def step() -> None:
        attn.banded = banded
        ctx = AttentionContext(positions, positions, None, causal)  # a fresh cache per step
        inputs = x.detach().requires_grad_(True)
        output, _ = attn(inputs, ctx, plugins)
        output.float().pow(2).mean().backward()
        attn.zero_grad(set_to_none=True)
    return step


def growth_exponent(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(length)."""
    xs = [math.log(n) for n in lengths]
    ys = [math.log(v) for v in values]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return numerator / denominator


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = MultiHeadAttention(args.hidden, args.heads, dropout=0.0).train()
    rope = RotaryEmbedding(args.hidden // args.heads)
    variants = {"full": ([rope], True), "window": ([rope, SlidingWindowMask(args.window)], True)}
    if not args.no_dense_window:
        variants["window_dense"] = ([rope, SlidingWindowMask(args.window)], False)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, one attention layer "
          f"forward+backward, batch {args.batch}, hidden {args.hidden}, heads {args.heads}, "
          f"window {args.window}, {'causal' if args.causal else 'bidirectional'}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    memory: dict[str, list[int]] = {name: [] for name in variants}
    per_length = {}
    for seq in args.seqs:
        generator = torch.Generator().manual_seed(seq)
        x = torch.randn(args.batch, seq, args.hidden, generator=generator)
        steps = {name: step_function(attn, plugins, banded, x, args.causal)
                 for name, (plugins, banded) in variants.items()}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        rounds = {name: [] for name in steps}
        names = list(steps)
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                steps[name]()
                rounds[name].append(time.perf_counter() - start)
        result = {}
        for name, step in steps.items():
            times[name].append(statistics.median(rounds[name]))
            memory[name].append(peak_step_memory(step))
            result[f"{name}_ms"] = round(times[name][-1] * 1e3, 2)
            result[f"{name}_peak_mib"] = round(memory[name][-1] / 2**20, 2)
        result["time_ratio_window_vs_full"] = round(times["window"][-1] / times["full"][-1], 3)
        result["peak_memory_ratio_window_vs_full"] = round(
            memory["window"][-1] / memory["full"][-1], 3)
        per_length[f"n{seq}"] = result
        print(f"n {seq}: " + ", ".join(
            f"{name} {times[name][-1] * 1e3:.1f} ms / {memory[name][-1] / 2**20:.1f} MiB"
            for name in steps) + f"; window/full time {result['time_ratio_window_vs_full']}")

    exponents = {}
    if len(args.seqs) > 1:
        exponents = {
            "time_exponent": {name: round(growth_exponent(args.seqs, values), 3)
                              for name, values in times.items()},
            "peak_memory_exponent": {name: round(growth_exponent(args.seqs, values), 3)
                                     for name, values in memory.items()},
        }
        for kind, values in exponents.items():
            print(f"{kind.replace('_', ' ')} (slope of log-log fit): " +
                  ", ".join(f"{name} {value}" for name, value in values.items()))
    print(json.dumps({"benchmark": "window_attention_step", "device": "cpu",
                      "threads": torch.get_num_threads(), "window": args.window,
                      "causal": args.causal, "rounds": args.rounds, **per_length,
                      **exponents}))


if __name__ == "__main__":
    main()
