"""``python -m tutorial_lib.studies [NAME ...]``: build (or find) the book's studies.

Every study is cached under ``$TUTORIAL_LIB_CACHE`` (default
``~/.cache/tutorial_lib/models``) and resumable: an interrupted build keeps its finished
runs and does only what is missing when run again. Without a name, every study is built,
the baseline first (the others start from it).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from tutorial_lib.studies import baseline, finetune, length, position
from tutorial_lib.studies.harness import build_message


def _baseline(scale, args, log) -> list[str]:
    built = baseline.baseline_mlm(scale, cache_dir=args.cache_dir, rebuild=args.rebuild)
    last = [r for r in built.history if r.get("event") == "eval"][-1]
    return [f"test MLM loss {last['mlm_loss']:.3f}, accuracy {last['mlm_accuracy']:.3f} "
            f"after {last['step']} updates"], built.trained_now, built.path


def _adversarial(scale, args, log):
    if scale != "cpu":
        raise SystemExit("the adversarial study has a CPU recipe only; the GPU run is lab 1's")
    result = finetune.run_study("adversarial-sst2", cache_dir=args.cache_dir,
                                rebuild=args.rebuild, workers=args.workers or 2, log=log)
    return [], result.built_now, result.path


def _positions(scale, args, log):
    study = position.position_study(scale, cache_dir=args.cache_dir, rebuild=args.rebuild,
                                    workers=args.workers or 3, log=log)
    lines = []
    for variant in position.VARIANTS:
        final = study.final(variant)
        lines.append(f"{variant:20s}: test MLM loss {final['mlm_loss']:.3f}, accuracy "
                     f"{final['mlm_accuracy']:.3f} after {final['step']} updates")
    return lines, study.built_now, study.path


def _length(scale, args, log):
    result = length.run_length_study(scale, cache_dir=args.cache_dir, rebuild=args.rebuild,
                                     workers=args.workers or 2, log=log)
    return [], result.built_now, result.path


# name -> (what it is, the scales it has, how to build it)
STUDIES: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "baseline": ("the small MLM pre-trained by the book (chapters 0, 1, 3)",
                 tuple(sorted(baseline.RECIPES)), _baseline),
    "adversarial": ("chapter 1: adversarial fine-tuning methods x seeds on SST-2",
                    ("cpu",), _adversarial),
    "positions": ("chapter 3: absolute, relative-bias, disentangled, disentangled + EMD",
                  tuple(sorted(baseline.RECIPES)), _positions),
    "length": ("chapter 5: train short, test long, per position method",
               tuple(sorted(length.LENGTH_RECIPES)), _length),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:12s} {what} (scales: {', '.join(scales)})"
                        for name, (what, scales, _) in STUDIES.items())
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_lib.studies", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build (or find in the cache) the book's studies.",
        epilog=f"studies:\n{listing}")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="studies to build, in the order given (default: all)")
    parser.add_argument("--scale", default="cpu", help="the recipe: cpu (default) or gpu")
    parser.add_argument("--rebuild", action="store_true", help="run again even if cached")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes side by side, one CPU thread each (default: the study's)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder (default: $TUTORIAL_LIB_CACHE or "
                             "~/.cache/tutorial_lib/models)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in STUDIES]
    if unknown:
        parser.error(f"unknown study {unknown}; choose from {sorted(STUDIES)}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be a positive integer, got {args.workers}")
    names = args.names or list(STUDIES)
    for name in names:
        what, scales, build = STUDIES[name]
        if args.scale not in scales:
            parser.error(f"study {name!r} has the scales {list(scales)}, not {args.scale!r}")
    for name in names:
        started = time.perf_counter()
        lines, built_now, path = STUDIES[name][2](args.scale, args,
                                                  lambda message: print(message, flush=True))
        print(build_message(f"{name} ({args.scale})", built_now,
                            time.perf_counter() - started, path), flush=True)
        for line in lines:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
