"""Two gated attention units against one attention + FFN layer as the sequence grows.

Chapter 6. Two GAU blocks (:class:`tutorial_lib.techniques.gau.GAUBlock`, e = 2d,
s = ``--key-size``, relu²/n by default) hold about the parameters of one Transformer
layer (:class:`tutorial_lib.core.model.TransformerBlock`, 4d² attention + 8d² FFN); the
benchmark runs both, pre-LN, RoPE on, forward and backward (a squared-mean loss of the
output, gradients to the weights and the input), in training mode without dropout, at
sequence lengths that double (128 ... 2048 by default), in one process. The Transformer
layer's attention is PyTorch's fused ``scaled_dot_product_attention``; the GAU's is
written out (one head: a (batch, n, n) score matrix per GAU). A third variant, unless
``--chunk-size 0``, is a pair of FLASH blocks (``chunk_size`` c = 256: quadratic
attention within chunks, linear across them), whose cost grows linearly in n.

The two are timed in interleaved rounds and the median is kept; peak memory is the
high-water mark of one step's allocations (the profiler's, as in ``bench_encoder.py``);
the growth exponents are the least-squares slopes of log(time) and log(memory) against
log(n). The goal, a GAU pair no slower than the Transformer layer from n = 512 on
(ratio ≤ 1.0), is printed beside the measured ratios, met or not.

The last line printed is one JSON object with, for every n, the times, memories and
GAU/Transformer ratios, the exponents, the parameter counts and the goal.

    python benchmarks/bench_gau.py
    python benchmarks/bench_gau.py --seqs 128 256 512 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from bench_encoder import peak_step_memory
from bench_window import growth_exponent

from tutorial_lib import AttentionContext, RotaryEmbedding, TransformerConfig
from tutorial_lib.core.model import TransformerBlock
from tutorial_lib.techniques.gau import NORMALISERS, GAUBlock

GOAL = {"time_ratio_at_or_above_n": 512, "max_time_ratio": 1.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size d (default 256)")
    parser.add_argument("--heads", type=int, default=4,
                        help="the Transformer's attention heads (default 4)")
    parser.add_argument("--key-size", type=int, default=64, help="the GAU's s (default 64)")
    parser.add_argument("--normaliser", default="relu2", choices=NORMALISERS,
                        help="the GAU's normaliser (default relu2)")
    parser.add_argument("--chunk-size", type=int, default=256,
                        help="FLASH's chunk c for a third variant, a FLASH pair (default 256; "
                             "0 leaves it out)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512, 1024, 2048],
                        help="sequence lengths (default 128 256 512 1024 2048)")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.hidden % args.key_size or args.hidden % args.heads:
        parser.error("--key-size and --heads must divide --hidden")
    return args


def build(args):
    """(Transformer layer, its RoPE), (GAU pair, its RoPE): same width, pre-LN."""
    common = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                  norm_position="pre", causal=args.causal, hidden_dropout=0.0,
                  attention_dropout=0.0, layer_norm_eps=1e-5, position_embedding="none",
                  rotary=True, max_position_embeddings=max(args.seqs))
    layer_config = TransformerConfig(num_heads=args.heads, **common)
    gau_config = TransformerConfig(num_heads=args.hidden // args.key_size, block="gau",
                                   extra={"gau": {"normaliser": args.normaliser}}, **common)
    torch.manual_seed(0)
    layer = torch.nn.ModuleList([TransformerBlock(layer_config, 0)]).train()
    pair = torch.nn.ModuleList([GAUBlock(gau_config, 0), GAUBlock(gau_config, 1)]).train()
    variants = {"transformer": (layer, [RotaryEmbedding(layer_config.head_dim)]),
                "gau_pair": (pair, [RotaryEmbedding(gau_config.head_dim)])}
    if args.chunk_size:
        flash_config = dataclasses.replace(
            gau_config, extra={"gau": {"normaliser": "relu2", "chunk_size": args.chunk_size}})
        flash = torch.nn.ModuleList([GAUBlock(flash_config, 0), GAUBlock(flash_config, 1)]).train()
        variants["flash_pair"] = (flash, [RotaryEmbedding(gau_config.head_dim)])
    return variants


def step_function(blocks: torch.nn.ModuleList, plugins: list, x: torch.Tensor, causal: bool):
    positions = torch.arange(x.shape[1])[None]

    def step() -> None:
        ctx = AttentionContext(positions, positions, None, causal)  # a fresh cache per step
        h = x.detach().requires_grad_(True)
        for block in blocks:
            h, _ = block(h, ctx, plugins)
        h.float().pow(2).mean().backward()
        blocks.zero_grad(set_to_none=True)
    return step


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = build(args)
    parameters = {name: sum(p.numel() for p in blocks.parameters())
                  for name, (blocks, _) in variants.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, forward+backward, "
          f"batch {args.batch}, d {args.hidden}, Transformer heads {args.heads}, GAU s "
          f"{args.key_size}, e {2 * args.hidden}, {args.normaliser}, "
          f"{'causal' if args.causal else 'bidirectional'}; parameters: Transformer layer "
          f"{parameters['transformer']}, GAU pair {parameters['gau_pair']}")
    times = {name: [] for name in variants}
    memory = {name: [] for name in variants}
    per_length = {}
    for seq in args.seqs:
        generator = torch.Generator().manual_seed(seq)
        x = torch.randn(args.batch, seq, args.hidden, generator=generator)
        steps = {name: step_function(blocks, plugins, x, args.causal)
                 for name, (blocks, plugins) in variants.items()}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        rounds = {name: [] for name in steps}
        names = list(steps)
        for round_index in range(args.rounds):
            for name in (names if round_index % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                steps[name]()
                rounds[name].append(time.perf_counter() - start)
        result = {}
        for name, step in steps.items():
            times[name].append(statistics.median(rounds[name]))
            memory[name].append(peak_step_memory(step))
            result[f"{name}_ms"] = round(times[name][-1] * 1e3, 2)
            result[f"{name}_peak_mib"] = round(memory[name][-1] / 2**20, 2)
        result["time_ratio_gau_vs_transformer"] = round(
            times["gau_pair"][-1] / times["transformer"][-1], 3)
        result["peak_memory_ratio_gau_vs_transformer"] = round(
            memory["gau_pair"][-1] / max(1, memory["transformer"][-1]), 3)
        if "flash_pair" in steps:
            result["time_ratio_flash_vs_transformer"] = round(
                times["flash_pair"][-1] / times["transformer"][-1], 3)
            result["peak_memory_ratio_flash_vs_transformer"] = round(
                memory["flash_pair"][-1] / max(1, memory["transformer"][-1]), 3)
        per_length[f"n{seq}"] = result
        print(f"n {seq}: " + ", ".join(
            f"{name} {times[name][-1] * 1e3:.1f} ms / {memory[name][-1] / 2**20:.1f} MiB"
            for name in steps) + f"; GAU pair / Transformer: time "
              f"{result['time_ratio_gau_vs_transformer']}, memory "
              f"{result['peak_memory_ratio_gau_vs_transformer']}"
              + (f"; FLASH pair / Transformer: time {result['time_ratio_flash_vs_transformer']}"
                 if "flash_pair" in steps else ""))

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
    judged = [per_length[f"n{seq}"]["time_ratio_gau_vs_transformer"] for seq in args.seqs
              if seq >= GOAL["time_ratio_at_or_above_n"]]
    goal_met = bool(judged) and max(judged) <= GOAL["max_time_ratio"]
    flash_judged = [per_length[f"n{seq}"].get("time_ratio_flash_vs_transformer") for seq in args.seqs
                    if seq >= GOAL["time_ratio_at_or_above_n"] and args.chunk_size]
    print(f"goal: GAU pair / Transformer time <= {GOAL['max_time_ratio']} at n >= "
          f"{GOAL['time_ratio_at_or_above_n']}: "
          + ("not measured (no such n)" if not judged else ("met" if goal_met else "not met")))
    if flash_judged:
        print(f"the same goal for the FLASH pair (c = {args.chunk_size}): "
              + ("met" if max(flash_judged) <= GOAL["max_time_ratio"] else "not met"))
    print(json.dumps({"benchmark": "gau_pair_vs_transformer_layer", "device": "cpu",
                      "threads": torch.get_num_threads(), "causal": args.causal,
                      "normaliser": args.normaliser, "rounds": args.rounds,
                      "parameters": parameters, **per_length, **exponents, "goal": GOAL,
                      "goal_met": goal_met if judged else None,
                      "flash_goal_met": (max(flash_judged) <= GOAL["max_time_ratio"])
                      if flash_judged else None, "chunk_size": args.chunk_size}))


if __name__ == "__main__":
    main()
