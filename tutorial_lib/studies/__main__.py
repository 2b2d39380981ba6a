"""``python -m tutorial_lib.studies [NAME ...] [--record | --check]``: the book's studies.

* no flag: build (or find) the studies' cache entries. Every study is cached under
  ``$TUTORIAL_LIB_CACHE`` (default ``~/.cache/tutorial_lib/models``) and resumable: an
  interrupted build keeps its finished runs and does only what is missing when run again;
* ``--record``: build (or find) them and write their committed records
  (:mod:`tutorial_lib.studies.records`), which the chapters read;
* ``--check``: what CI runs. Each record must have been made by the code's recipe, and
  a fixed sample of it is computed again and compared within the record's tolerance
  (the baseline, whose weights every study starts from, is built in full and compared
  whole; the samples of chapters 1 and 3 leave the weights their notebooks load). Exits
  with 1 on any disagreement.

Without a name, every study, the baseline first (the others start from it).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from tutorial_lib.studies import (baseline, finetune, gau, ladder, length, position, pretraining,
                                  records, sift, unargmaxable, whitening)
from tutorial_lib.studies.harness import build_message


def _baseline(scale, args, log) -> list[str]:
    built = baseline.baseline_mlm(scale, cache_dir=args.cache_dir, rebuild=args.rebuild)
    last = [r for r in built.history if r.get("event") == "eval"][-1]
    return [f"test MLM loss {last['mlm_loss']:.3f}, accuracy {last['mlm_accuracy']:.3f} "
            f"after {last['step']} updates"], built.trained_now, built.path


def _pretraining(scale, args, log):
    if scale != "cpu":
        raise SystemExit("the pre-training study has a CPU recipe only; the GPU run is lab 0's")
    study, built_now = pretraining.run_pretraining_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log)
    return [], built_now, study.path


def _fine_tuning(study: str, chapter: str, lab: str):
    """The builder of a fine-tuning study of :mod:`.finetune` (CPU recipe only)."""
    def build(scale, args, log):
        if scale != "cpu":
            raise SystemExit(f"the {chapter} study has a CPU recipe only; the GPU run is {lab}'s")
        result = finetune.run_study(study, cache_dir=args.cache_dir, rebuild=args.rebuild,
                                    workers=args.workers or 2, log=log)
        return [], result.built_now, result.path
    return build


_adversarial = _fine_tuning("adversarial-sst2", "adversarial", "lab 1")
_asa = _fine_tuning("asa-sst2", "ASA", "lab 2")
_sift = _fine_tuning("sift-sst2", "SiFT", "lab 4")


def _sift_scale(scale, args, log):
    if scale != "cpu":
        raise SystemExit("the SiFT scale study has a CPU recipe only")
    _, entry, built_now = sift.run_scale_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log)
    return [], built_now, entry


def _positions(scale, args, log):
    study = position.position_study(scale, cache_dir=args.cache_dir, rebuild=args.rebuild,
                                    workers=args.workers or 3, log=log)
    lines = []
    for variant in position.VARIANTS:
        final = study.final(variant)
        lines.append(f"{variant:20s}: test MLM loss {final['mlm_loss']:.3f}, accuracy "
                     f"{final['mlm_accuracy']:.3f} after {final['step']} updates")
    return lines, study.built_now, study.path


def _whitening(scale, args, log):
    if scale != "cpu":
        raise SystemExit("the whitening study has a CPU recipe only; the GPU run is lab 7's")
    _, entry, built_now = whitening.run_whitening_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log)
    return [], built_now, entry


def _unargmaxable(scale, args, log):
    if scale != "cpu":
        raise SystemExit("the unargmaxable study has a CPU recipe only; the online run is lab 8's")
    _, entry, built_now = unargmaxable.run_unargmaxable_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log)
    return [], built_now, entry


def _ladder(scale, args, log):
    if scale != "cpu":
        raise SystemExit("the ladder study has a CPU recipe only; the GPU run is lab 9's")
    _, entry, built_now = ladder.run_ladder_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log)
    return [], built_now, entry


def _length(scale, args, log):
    result = length.run_length_study(scale, cache_dir=args.cache_dir, rebuild=args.rebuild,
                                     workers=args.workers or 2, log=log)
    return [], result.built_now, result.path


def _gau(scale, args, log):
    result = gau.run_gau_study(scale, cache_dir=args.cache_dir, rebuild=args.rebuild,
                               workers=args.workers or 1, log=log)
    return [], result.built_now, result.path


CHECKS = {
    "baseline": lambda scale, args, log: baseline.check_baseline(scale, cache_dir=args.cache_dir),
    "pretraining": lambda scale, args, log: pretraining.check_pretraining_study(
        cache_dir=args.cache_dir, log=log),
    "adversarial": lambda scale, args, log: finetune.check_study(
        "adversarial-sst2", cache_dir=args.cache_dir, log=log),
    "asa": lambda scale, args, log: finetune.check_study(
        "asa-sst2", cache_dir=args.cache_dir, log=log),
    "sift": lambda scale, args, log: finetune.check_study(
        "sift-sst2", cache_dir=args.cache_dir, log=log),
    "sift-scale": lambda scale, args, log: sift.check_scale_study(
        cache_dir=args.cache_dir, log=log),
    "positions": lambda scale, args, log: position.check_position_study(
        scale, cache_dir=args.cache_dir, log=log),
    "length": lambda scale, args, log: length.check_length_study(scale, log=log),
    "gau": lambda scale, args, log: gau.check_gau_study(scale, log=log),
    "whitening": lambda scale, args, log: whitening.check_whitening_study(
        cache_dir=args.cache_dir, log=log),
    "unargmaxable": lambda scale, args, log: unargmaxable.check_unargmaxable_study(
        cache_dir=args.cache_dir, log=log),
    "ladder": lambda scale, args, log: ladder.check_ladder_study(
        cache_dir=args.cache_dir, log=log),
}
RECORDERS = {
    "baseline": lambda scale, args, log: baseline.record_baseline(
        scale, cache_dir=args.cache_dir, rebuild=args.rebuild),
    "pretraining": lambda scale, args, log: pretraining.record_pretraining_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log),
    "adversarial": lambda scale, args, log: finetune.record_study(
        "adversarial-sst2", cache_dir=args.cache_dir, rebuild=args.rebuild,
        workers=args.workers or 2, log=log),
    "asa": lambda scale, args, log: finetune.record_study(
        "asa-sst2", cache_dir=args.cache_dir, rebuild=args.rebuild,
        workers=args.workers or 2, log=log),
    "sift": lambda scale, args, log: finetune.record_study(
        "sift-sst2", cache_dir=args.cache_dir, rebuild=args.rebuild,
        workers=args.workers or 2, log=log),
    "sift-scale": lambda scale, args, log: sift.record_scale_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log),
    "positions": lambda scale, args, log: position.record_position_study(
        scale, cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 3,
        log=log),
    "length": lambda scale, args, log: length.record_length_study(
        scale, cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2,
        log=log),
    "gau": lambda scale, args, log: gau.record_gau_study(
        scale, cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 1,
        log=log),
    "whitening": lambda scale, args, log: whitening.record_whitening_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log),
    "unargmaxable": lambda scale, args, log: unargmaxable.record_unargmaxable_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log),
    "ladder": lambda scale, args, log: ladder.record_ladder_study(
        cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers or 2, log=log),
}

# name -> (what it is, the scales it has, how to build it)
STUDIES: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "baseline": ("the small MLM pre-trained by the book (chapters 0, 3)",
                 tuple(sorted(baseline.RECIPES)), _baseline),
    "pretraining": ("chapter 0: SST-2 from random init, the CPU baseline and MiniLM",
                    ("cpu",), _pretraining),
    "adversarial": ("chapter 1: adversarial fine-tuning of MiniLM, methods x seeds on SST-2",
                    ("cpu",), _adversarial),
    "asa": ("chapter 2: ASA vs its M = 1 ablation (R-Drop) and plain fine-tuning of MiniLM on SST-2",
            ("cpu",), _asa),
    "positions": ("chapter 3: absolute, relative-bias, disentangled, disentangled + EMD",
                  tuple(sorted(baseline.RECIPES)), _positions),
    "length": ("chapter 5: train short, test long, per position method",
               tuple(sorted(length.LENGTH_RECIPES)), _length),
    "sift": ("chapter 4: SiFT vs plain, noise only, ALUM and FGM fine-tuning MiniLM on SST-2",
             ("cpu",), _sift),
    "sift-scale": ("chapter 4: embedding scales, and what one perturbation size means",
                   ("cpu",), _sift_scale),
    "gau": ("chapter 6: GAU vs Transformer per update and second; GAU normalisers across lengths",
            tuple(sorted(gau.GAU_RECIPES)), _gau),
    "whitening": ("chapter 7: BERT-whitening of MiniLM and the CPU baseline on STS-B",
                  ("cpu",), _whitening),
    "unargmaxable": ("chapter 8: unargmaxable classes of random and real softmax layers",
                     ("cpu",), _unargmaxable),
    "ladder": ("chapter 9: ladder side-tuning vs full, last-layers and LoRA fine-tuning of MiniLM on SST-2",
               ("cpu",), _ladder),
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
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--record", action="store_true",
                        help="build (or find) and write the committed records")
    action.add_argument("--check", action="store_true",
                        help="compare the records with the code: key, and a re-computed sample")
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
    log = lambda message: print(message, flush=True)  # noqa: E731
    timings, failed = [], []
    for name in names:
        started = time.perf_counter()
        if args.check:
            try:
                problems = CHECKS[name](args.scale, args, log)
            except records.RecordError as error:
                problems = [str(error)]
            seconds = time.perf_counter() - started
            timings.append((name, seconds))
            if problems:
                failed.append(name)
                print(f"{name} ({args.scale}): the record disagrees with the code "
                      f"({len(problems)} problems, {seconds:.0f} s):")
                for problem in problems[:20]:
                    print(f"  {problem}")
            else:
                print(f"{name} ({args.scale}): the record agrees ({seconds:.0f} s)", flush=True)
            continue
        if args.record:
            path = RECORDERS[name](args.scale, args, log)
            print(f"{name} ({args.scale}): record written to {path} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            continue
        lines, built_now, path = STUDIES[name][2](args.scale, args, log)
        print(build_message(f"{name} ({args.scale})", built_now,
                            time.perf_counter() - started, path), flush=True)
        for line in lines:
            print(f"  {line}")
    if args.check:
        print("\nstudy check     seconds")
        for name, seconds in timings:
            print(f"  {name:13s} {seconds:7.0f}")
        if failed:
            print(f"records that disagree: {failed}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
