"""The shared cache-entry builder of the book's studies (tutorial_lib.studies.harness)."""

import json

import pytest
import torch

from tutorial_lib.studies import harness as studies


def _write(name: str, value: int, staging) -> str:
    studies.write_json_atomic(staging / name, {"value": value, "threads": torch.get_num_threads()})
    return f"{name} done"


def _fail(staging) -> str:
    raise RuntimeError("interrupted")


def test_entry_is_built_once_with_one_thread_per_job(tmp_path):
    entry = tmp_path / "study-x"
    jobs = [("runs/a.json", _write, ("runs/a.json", 1)), ("runs/b.json", _write, ("runs/b.json", 2))]
    logged = []
    threads = torch.get_num_threads()
    assert studies.build_study_entry(entry, jobs, lambda: {"runs": ["a", "b"]}, log=logged.append)
    assert torch.get_num_threads() == threads
    assert logged == ["runs/a.json done", "runs/b.json done"]
    assert json.loads((entry / "runs" / "b.json").read_text()) == {"value": 2, "threads": 1}
    assert json.loads((entry / studies.COMPLETE).read_text()) == {"runs": ["a", "b"]}
    assert not any(path.name.startswith(".staging") for path in tmp_path.iterdir())
    # Found: nothing runs again; rebuild runs everything again.
    assert not studies.build_study_entry(entry, [("c", _fail, ())], lambda: {})
    assert studies.build_study_entry(entry, jobs[:1], lambda: {"runs": ["a"]}, rebuild=True)
    assert not (entry / "runs" / "b.json").exists()


def test_an_interrupted_build_leaves_no_entry_and_resumes(tmp_path):
    entry = tmp_path / "study-y"
    jobs = [("a.json", _write, ("a.json", 1)), ("b.json", _fail, ())]
    with pytest.raises(RuntimeError, match="interrupted"):
        studies.build_study_entry(entry, jobs, lambda: {})
    assert not entry.exists()
    logged = []
    jobs[1] = ("b.json", _write, ("b.json", 2))
    assert studies.build_study_entry(entry, jobs, lambda: {}, log=logged.append)
    assert logged == ["b.json done"]  # the finished job was kept, not run again


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_workers_must_be_a_positive_integer(tmp_path, workers):
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        studies.build_study_entry(tmp_path / "e", [], lambda: {}, workers=workers)


def test_safe_name_keeps_letters_and_digits():
    assert studies.safe_name("ALUM (paper)") == "ALUM--paper-"
    assert studies.safe_name("disentangled + EMD") == "disentangled---EMD"
