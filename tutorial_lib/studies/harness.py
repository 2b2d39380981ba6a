"""The cache entry that every study of the book is built into.

A study (chapter 1's fine-tuning grid, chapter 3's pre-training variants, chapter
5's length study) is a list of independent jobs, each of which writes its own files.
:func:`build_study_entry` runs the jobs that are still missing into a staging folder
with a fixed name, so an interrupted build resumes with what it lacks, then writes a
``COMPLETE`` summary and renames the folder to the entry in one step: an entry that
exists is whole. Jobs run in this process or in ``workers`` spawned processes, always
with one CPU thread, so a job's numbers do not depend on the worker layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

COMPLETE = "COMPLETE"

# A job: (the file it writes, relative to the staging folder, whose presence means it
# is done; a picklable function; its arguments). The function is called with the
# staging folder appended to the arguments and returns a line for the log.
Job = tuple[str, Callable[..., str], tuple]


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(value, indent=1))
    os.replace(staging, path)


def safe_name(text: str) -> str:
    """``text`` with every character that is not a letter or digit replaced by ``-``."""
    return "".join(c if c.isalnum() else "-" for c in text)


def check_workers(workers) -> None:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def run_with_one_thread(function: Callable[..., str], *args) -> str:
    """``function(*args)`` computed with one CPU thread (the thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def entry_name(study: str, scale: str, key: str) -> str:
    """Every study's cache entry is named ``study-<study>-<scale>-<key>``: the study's
    name (as on the command line and in its record's file name), its recipe's scale and
    the recipe's cache key."""
    for name, value in (("study", study), ("scale", scale), ("key", key)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return f"study-{study}-{scale}-{key}"


def build_message(what: str, built_now: bool, seconds: float, path: Path) -> str:
    """The line a study's command prints once its entry exists."""
    state = f"ran now in {seconds:.0f} s" if built_now else "found in the cache"
    return f"{what} {state}: {path}"


def build_study_entry(entry: Path, jobs: Sequence[Job], summary: Callable[[], dict], *,
                      rebuild: bool = False, workers: int = 1,
                      log: Callable[[str], None] | None = None) -> bool:
    """Make sure the study entry ``entry`` exists; return True if it was built now.

    ``summary()`` gives the contents of the entry's ``COMPLETE`` file, written once
    every job is done.
    """
    check_workers(workers)
    if rebuild and entry.exists():
        shutil.rmtree(entry)
    if (entry / COMPLETE).exists():
        return False
    staging = entry.with_name(f".staging-{entry.name}")  # fixed name: a rerun resumes
    staging.mkdir(parents=True, exist_ok=True)
    todo = []
    for done, function, args in jobs:
        if not (staging / done).exists():
            (staging / done).parent.mkdir(parents=True, exist_ok=True)
            todo.append((function, args))
    log = log or (lambda message: None)
    if workers == 1 or len(todo) <= 1:
        for function, args in todo:
            log(run_with_one_thread(function, *args, staging))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            futures = [pool.submit(run_with_one_thread, function, *args, staging)
                       for function, args in todo]
            for future in futures:
                log(future.result())
    write_json_atomic(staging / COMPLETE, summary())
    os.replace(staging, entry)
    return True
