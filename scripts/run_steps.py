"""Run the steps of ``make test`` in order and print how long each took.

Usage: ``python scripts/run_steps.py STEP ...`` runs ``make STEP`` for each step and
stops at the first that fails; either way it ends with a table of the steps' times,
so the CI budget (each chapter ≤ 90 s, each lab ≤ 3 min, each study's check ≤ 90 s,
the whole run ≤ 45 minutes) stays visible.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(steps: list[str]) -> int:
    if not steps:
        print("usage: run_steps.py STEP ...", file=sys.stderr)
        return 2
    make = os.environ.get("MAKE", "make")
    times: list[tuple[str, float, str]] = []
    status = 0
    for step in steps:
        started = time.perf_counter()
        code = subprocess.call([make, "--no-print-directory", step])
        times.append((step, time.perf_counter() - started, "ok" if code == 0 else "FAILED"))
        if code != 0:
            status = code
            break
    total = sum(seconds for _, seconds, _ in times)
    print("\nstep                 seconds  result")
    for step, seconds, result in times:
        print(f"{step:20s} {seconds:8.0f}  {result}")
    print(f"{'total':20s} {total:8.0f}  ({total / 60:.1f} min)")
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
