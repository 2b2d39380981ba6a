"""The leak check of scripts/build_exercises.py, on small hand-made notebooks."""

import importlib.util
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_raw_cell

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_exercises.py"
spec = importlib.util.spec_from_file_location("build_exercises", SCRIPT)
build_exercises = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = build_exercises  # dataclasses look their module up there
spec.loader.exec_module(build_exercises)


def source_lab():
    return new_notebook(cells=[
        new_raw_cell("# ASSIGNMENT CONFIG\nname: demo"),
        new_code_cell("seed_everything(SEED)  # given to everyone"),
        new_raw_cell("# BEGIN QUESTION\nname: q1"),
        new_markdown_cell("Call `seed_everything(SEED)`, then build the model."),
        new_raw_cell("# BEGIN SOLUTION"),
        new_code_cell("# BEGIN SOLUTION\nseed_everything(SEED)\n"
                      "scratch_model = SequenceClassifier(config, num_labels=2)\n# END SOLUTION"),
        new_raw_cell("# END SOLUTION"),
        new_raw_cell("# BEGIN TESTS"),
        new_code_cell("assert scratch_model.num_labels == 2"),
        new_raw_cell("# END TESTS"),
        new_raw_cell("# END QUESTION"),
    ])


def write_student(tmp_path, cells):
    out = tmp_path / "out"
    (out / "student").mkdir(parents=True)
    (out / "autograder").mkdir()
    (out / "autograder" / "demo-autograder_2026.zip").write_bytes(b"")
    nbformat.write(new_notebook(cells=cells), out / "student" / "demo.ipynb")
    return out


def test_lines_given_outside_solutions_are_public():
    secrets = build_exercises.read_secrets(source_lab())
    assert any("seed_everything(SEED)" in line for line in secrets.public)
    assert ["seed_everything(SEED)", "scratch_model = SequenceClassifier(config, num_labels=2)"] \
        in secrets.solutions
    assert not any("SequenceClassifier" in line for line in secrets.public)


def test_a_clean_student_version_passes(tmp_path):
    secrets = build_exercises.read_secrets(source_lab())
    out = write_student(tmp_path, [
        new_code_cell("seed_everything(SEED)  # given to everyone"),
        new_markdown_cell("Call `seed_everything(SEED)`, then build the model."),
        new_code_cell("scratch_model = ..."),
    ])
    assert build_exercises.check_student(Path("labs/demo.ipynb"), secrets, out) == []


def test_a_leaked_solution_line_is_reported(tmp_path):
    secrets = build_exercises.read_secrets(source_lab())
    out = write_student(tmp_path, [
        new_code_cell("seed_everything(SEED)  # given to everyone"),
        new_code_cell("scratch_model = SequenceClassifier(config, num_labels=2)"),
    ])
    problems = build_exercises.check_student(Path("labs/demo.ipynb"), secrets, out)
    assert problems == ["solution code reached the student version: "
                        "'scratch_model = SequenceClassifier(config, num_labels=2)'"]
