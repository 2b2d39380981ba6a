"""Forward+backward step of the tutorial_lib encoder against Hugging Face ``BertModel``.

Both models have the same configuration and the same weights (converted with
``from_hf``), run in training mode (dropout on) in one process, and are timed in
interleaved rounds so that a slow moment of the machine affects both. Peak
memory is the largest amount of memory allocated during one step beyond what
was allocated before it, read from the profiler's allocation events.

The last line printed is one JSON object: for each sequence length the median
time ratio (ours / Hugging Face) and the peak-memory ratio. Ratios below 1 mean
tutorial_lib is faster or smaller.

    python benchmarks/bench_encoder.py              # the configuration in the README
    python benchmarks/bench_encoder.py --rounds 3 --seqs 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tutorial_lib.interop import from_hf


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--ffn", type=int, default=1024, help="feed-forward size (default 1024)")
    parser.add_argument("--vocab", type=int, default=30522, help="vocabulary size (default 30522)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512],
                        help="sequence lengths (default 128 512)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per model (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def step_function(model, hf: bool, ids: torch.Tensor, mask: torch.Tensor):
    def step() -> None:
        if hf:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = model(ids, mask)
        hidden.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def peak_step_memory(step) -> int:
    """Bytes: the high-water mark of allocations made during one call of ``step``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def main() -> None:
    args = parse_args()
    import transformers  # the reference implementation

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.ffn,
        max_position_embeddings=max(512, max(args.seqs)), attn_implementation="sdpa")
    hf_model = transformers.BertModel(hf_config, add_pooling_layer=False).train()
    ours = from_hf(hf_model).train()

    results = {}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, hidden {args.hidden}, "
          f"layers {args.layers}, heads {args.heads}, ffn {args.ffn}")
    for seq in args.seqs:
        generator = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, args.vocab, (args.batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        mask[: args.batch // 2, seq - seq // 4:] = 0  # half the batch padded: a real batch
        steps = {"ours": step_function(ours, False, ids, mask),
                 "hf": step_function(hf_model, True, ids, mask)}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        times = {name: [] for name in steps}
        for round_index in range(args.rounds):
            order = ("ours", "hf") if round_index % 2 == 0 else ("hf", "ours")
            for name in order:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        memory = {name: peak_step_memory(step) for name, step in steps.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        results[f"seq{seq}"] = {
            "time_ratio": round(median["ours"] / median["hf"], 3),
            "peak_memory_ratio": round(memory["ours"] / memory["hf"], 3),
        }
        print(f"seq {seq}: median step ours {median['ours'] * 1e3:.1f} ms, "
              f"HF {median['hf'] * 1e3:.1f} ms; peak step memory ours "
              f"{memory['ours'] / 2**20:.1f} MiB, HF {memory['hf'] / 2**20:.1f} MiB")
    print(json.dumps({"benchmark": "encoder_step_vs_hf_bert_sdpa", "device": "cpu",
                      "rounds": args.rounds, **results}))


if __name__ == "__main__":
    main()
