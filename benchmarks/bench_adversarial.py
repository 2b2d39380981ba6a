"""Cost of one training step with each adversarial method, relative to a plain step.

One SequenceClassifier (a small BERT, dropout on) and one fixed batch. A step is
forward + backward of the method's loss (``method(model, batch)``), gradients
cleared afterwards; the optimizer update is the same for every method and is left
out. In each round every method's step is timed between two plain steps and
divided by their mean, so a slow moment of the machine affects both sides of a
ratio.

The last line printed is one JSON object: for each method the median of these
ratios. Goals of the book: FGM ≤ 2.0, ALUM ≤ 2.6, FreeLB-3 ≤ 3.0.

    python benchmarks/bench_adversarial.py                # small BERT, batch 16, 128 tokens
    python benchmarks/bench_adversarial.py --rounds 5 --seq 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.techniques import adversarial as adv
from tutorial_lib.training.loop import default_loss_step

METHODS = {
    "plain": default_loss_step,
    "fgm": adv.FGM(epsilon=1.0),
    "pgd3": adv.PGD(epsilon=1.0, step_size=0.3, steps=3),
    "freelb3": adv.FreeLB(steps=3, step_size=0.1, epsilon=1.0),
    "vat": adv.VAT(epsilon=1.0),
    "alum": adv.ALUM(),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-small", help="model preset (default bert-small)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layers")
    parser.add_argument("--hidden", type=int, default=None, help="override the hidden size")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("num_layers", args.layers), ("hidden_size", args.hidden),
                                   ("intermediate_size", args.hidden and 4 * args.hidden),
                                   ("num_heads", args.hidden and max(args.hidden // 64, 1)))
                 if v}
    config = TransformerConfig.preset(args.preset, vocab_size=args.vocab, **overrides)
    torch.manual_seed(0)
    model = SequenceClassifier(config, num_labels=2).train()
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, args.vocab, (args.batch, args.seq), generator=generator),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}

    def step(method) -> float:
        start = time.perf_counter()
        loss, _ = method(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"{args.preset} (L={config.num_layers}, d={config.hidden_size}), batch {args.batch} × "
          f"{args.seq} tokens, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for _ in range(args.warmup):
        for method in METHODS.values():
            step(method)
    plain = METHODS["plain"]
    ratios = {name: [] for name in METHODS if name != "plain"}
    for round_index in range(args.rounds):
        plain_times = [step(plain)]
        for name in ratios:
            method_time = step(METHODS[name])
            plain_times.append(step(plain))
            ratios[name].append(method_time / ((plain_times[-2] + plain_times[-1]) / 2))
        print(f"round {round_index + 1}: plain {statistics.median(plain_times) * 1000:.0f} ms; "
              + ", ".join(f"{name} {ratios[name][-1]:.2f}×" for name in ratios))
    report = {name: round(statistics.median(values), 3) for name, values in ratios.items()}
    print(json.dumps({"step_time_ratio_vs_plain": report}))


if __name__ == "__main__":
    main()
