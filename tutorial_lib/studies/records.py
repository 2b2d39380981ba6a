"""Study records: the committed, human-readable results of the book's studies.

A study builds a cache entry (:mod:`tutorial_lib.studies.harness`): weights, logs and
one JSON file per run, kept on the machine that built it. Its *record* is what the book
keeps of it, committed beside this module as ``records/<study>-<scale>.json``:

* ``files``: the numbers of every run, as the study's jobs wrote them (JSON files
  whole, JSON-lines files as lists of rows);
* ``key``: the cache key of the recipe that made them (recipe, methods, seeds, data
  checksums, library version), and ``recipe``, that recipe in full;
* ``data``: the checksums of the data files read;
* ``environment``: library version, the checkout's commit when the record was written,
  torch version, device, threads, Python; ``gpu``: whether a GPU made it;
  ``wall_seconds``: the time the study's jobs took, added up;
* ``sample`` and ``tolerance``: which runs CI re-computes, and how far a re-computed
  number may be from the recorded one.

Chapters read records, so executing a chapter costs seconds, not a study. CI checks
them instead of rebuilding them (``python -m tutorial_lib.studies --check``): a record
whose key no longer matches the code's recipe fails, and so does a sample that
disagrees beyond the tolerance, so a record cannot drift from the code that made it.
Remake a record with ``python -m tutorial_lib.studies NAME --record``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from tutorial_lib import __version__, data
from tutorial_lib.studies.harness import Job

RECORDS_DIR = Path(__file__).resolve().parent / "records"

# Keys whose values are timings: recorded, never compared (they vary between machines).
TIMING_WORDS = ("seconds", "elapsed")


class RecordError(Exception):
    """A record is missing, stale (its key is not the code's) or disagrees with a sample."""


def record_path(study: str, scale: str, directory: str | Path | None = None) -> Path:
    """Where the record of ``study`` at ``scale`` lives."""
    for name, value in (("study", study), ("scale", scale)):
        if not isinstance(value, str) or not value or not value.replace("-", "").isalnum():
            raise ValueError(f"{name} must be a name of letters, digits and '-', got {value!r}")
    return Path(directory or RECORDS_DIR) / f"{study}-{scale}.json"


def environment() -> dict[str, Any]:
    """What made a record: library version and commit, torch, device, threads, Python."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10,
                                check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (not a git checkout)"
    gpu = torch.cuda.is_available()
    return {"tutorial_lib": __version__, "commit": commit, "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.machine()})",
            "threads": torch.get_num_threads(), "gpu": gpu}


def data_checksums(relpaths: list[str]) -> dict[str, str]:
    """``{file: "sha256:..." or "git-blob-sha1:..."}`` of registered data files."""
    sums = {}
    for relpath in relpaths:
        entry = data.REGISTRY[relpath]
        sums[relpath] = (f"sha256:{entry.sha256}" if entry.sha256
                         else f"git-blob-sha1:{entry.git_blob_sha1}")
    return sums


def read_entry_files(entry: Path, names: list[str]) -> dict[str, Any]:
    """The named files of a cache entry: JSON parsed, JSON lines as lists of rows."""
    files = {}
    for name in names:
        text = (entry / name).read_text()
        files[name] = ([json.loads(line) for line in text.splitlines() if line.strip()]
                       if name.endswith(".jsonl") else json.loads(text))
    return files


def write_record(study: str, scale: str, *, key: str, recipe: Any, data: dict[str, str],
                 files: dict[str, Any], wall_seconds: float, sample: list[str],
                 tolerance: dict[str, float], summary: dict[str, Any] | None = None,
                 directory: str | Path | None = None) -> Path:
    """Write the record (atomically) and return its path."""
    unknown = [name for name in sample if name not in files]
    if unknown:
        raise ValueError(f"sample names files the record does not hold: {unknown}")
    _check_tolerance(tolerance)
    env = environment()
    record = {"study": study, "scale": scale, "key": key, "recipe": recipe, "data": data,
              "environment": env, "gpu": env["gpu"], "wall_seconds": round(wall_seconds, 1),
              "sample": sample, "tolerance": tolerance, "summary": summary or {},
              "files": files}
    path = record_path(study, scale, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    staging.replace(path)
    return path


def read_record(study: str, scale: str, *, key: str | None = None,
                directory: str | Path | None = None) -> dict[str, Any]:
    """The record of ``study`` at ``scale``; with ``key``, refuse a stale one."""
    path = record_path(study, scale, directory)
    if not path.exists():
        raise RecordError(f"no record of the study {study!r} at scale {scale!r} ({path}); "
                          f"make it with: python -m tutorial_lib.studies {study} "
                          f"--scale {scale} --record")
    record = json.loads(path.read_text())
    if key is not None and record["key"] != key:
        raise RecordError(
            f"the record {path.name} was made by another recipe or library version (its key "
            f"{record['key']}, the code's {key}): remake it with python -m "
            f"tutorial_lib.studies {study} --scale {scale} --record")
    return record


def _check_tolerance(tolerance: dict[str, float]) -> None:
    if set(tolerance) != {"abs", "rel"} or any(
            not isinstance(v, (int, float)) or v < 0 for v in tolerance.values()):
        raise ValueError(f"tolerance must be {{'abs': number >= 0, 'rel': number >= 0}}, "
                         f"got {tolerance!r}")


def _is_timing(key: str) -> bool:
    return key.endswith("_s") or any(word in key for word in TIMING_WORDS)


def compare(expected: Any, actual: Any, tolerance: dict[str, float], where: str = "") -> list[str]:
    """Every place where ``actual`` differs from ``expected``: numbers beyond
    ``abs + rel·|expected|``, anything else when unequal. Timings are skipped."""
    _check_tolerance(tolerance)
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = []
        for key in sorted(set(expected) | set(actual), key=str):
            if _is_timing(str(key)):
                continue
            if key not in actual or key not in expected:
                problems.append(f"{where}/{key}: only in the "
                                f"{'record' if key in expected else 'sample'}")
                continue
            problems += compare(expected[key], actual[key], tolerance, f"{where}/{key}")
        return problems
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} entries in the record, {len(actual)} in the sample"]
        problems = []
        for index, (e, a) in enumerate(zip(expected, actual)):
            problems += compare(e, a, tolerance, f"{where}[{index}]")
        return problems
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) \
            and not isinstance(expected, bool) and not isinstance(actual, bool):
        if math.isnan(expected) and math.isnan(actual):
            return []
        limit = tolerance["abs"] + tolerance["rel"] * abs(expected)
        if not abs(actual - expected) <= limit:
            return [f"{where}: recorded {expected!r}, sample {actual!r} "
                    f"(tolerance {limit:.3g})"]
        return []
    return [] if expected == actual else [f"{where}: recorded {expected!r}, sample {actual!r}"]


def check_sample(record: dict[str, Any], jobs: list[Job], log=None) -> list[str]:
    """Run ``jobs`` (the study's own jobs for the record's sample, as the cache entry
    builds them) in a scratch folder and compare the files they write with the record's.

    The jobs use every thread this process has: the studies build their entries with one
    thread per job, and on two threads the samples of chapters 1 and 3 reproduce their
    records to within 1e-6 (losses and metrics) in half the time, far inside the
    tolerances; a number that moved by more would fail here, as it should.
    """
    files = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        for relpath, function, args in jobs:
            (out / relpath).parent.mkdir(parents=True, exist_ok=True)
            line = function(*args, out)
            if log:
                log(line)
            files.update(read_entry_files(out, [relpath]))
    return check_files(record, files)


def check_files(record: dict[str, Any], files: dict[str, Any]) -> list[str]:
    """Compare re-computed files with the record's, within the record's tolerance."""
    problems = []
    for name, value in files.items():
        if name not in record["files"]:
            problems.append(f"{name}: not in the record")
            continue
        problems += compare(record["files"][name], value, record["tolerance"], name)
    return problems
