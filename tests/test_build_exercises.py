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


def test_a_student_cell_that_does_not_parse_is_reported(tmp_path):
    # What Otter makes of a call continued over two "# SOLUTION" lines.
    secrets = build_exercises.read_secrets(source_lab())
    out = write_student(tmp_path, [
        new_code_cell("%matplotlib inline\nrun = ...\n                precision = ..."),
    ])
    problems = build_exercises.check_student(Path("labs/demo.ipynb"), secrets, out)
    assert len(problems) == 1 and "student cell 1 is not valid Python" in problems[0]


def test_a_leaked_solution_line_is_reported(tmp_path):
    secrets = build_exercises.read_secrets(source_lab())
    out = write_student(tmp_path, [
        new_code_cell("seed_everything(SEED)  # given to everyone"),
        new_code_cell("scratch_model = SequenceClassifier(config, num_labels=2)"),
    ])
    problems = build_exercises.check_student(Path("labs/demo.ipynb"), secrets, out)
    assert problems == ["solution code reached the student version: "
                        "'scratch_model = SequenceClassifier(config, num_labels=2)'"]


def lab_with_tests(*test_cells, outputs=None):
    """A lab whose notebook defines ``model`` and a function with a local ``hidden``."""
    cells = [new_raw_cell("# ASSIGNMENT CONFIG\nname: demo"),
             new_code_cell("model = 3\ndef helper(hidden):\n    inner = hidden + 1\n    return inner"),
             new_raw_cell("# BEGIN QUESTION\nname: q1"),
             new_raw_cell("# BEGIN TESTS")]
    for source in test_cells:
        cell = new_code_cell(source)
        if outputs is not None:
            cell.outputs = outputs
        cells.append(cell)
    cells += [new_raw_cell("# END TESTS"), new_raw_cell("# END QUESTION")]
    return new_notebook(cells=cells)


def test_test_cells_that_stand_alone_pass():
    # Locals of the notebook's functions are not notebook names; tests may reuse them,
    # and a test may use what it defines itself, builtins included.
    notebook = lab_with_tests("hidden = helper(model)\nassert hidden == 4",
                              "values = [model]\nassert len(values) == 1 and helper(0) == 1")
    assert build_exercises.check_test_cells(notebook) == []


def test_a_test_that_needs_another_test_cell_is_reported():
    notebook = lab_with_tests("shared = model + 1", "assert shared == 4")
    problems = build_exercises.check_test_cells(notebook)
    assert len(problems) == 1 and "uses shared" in problems[0] and "test cell 6" in problems[0]


def test_a_test_that_rebinds_a_notebook_name_is_reported():
    problems = build_exercises.check_test_cells(lab_with_tests("model = 4\nassert model == 4"))
    assert len(problems) == 1 and "rebinds model" in problems[0]


def test_a_test_with_a_stored_output_is_reported():
    printed = [nbformat.v4.new_output("stream", name="stdout", text="<Generator>\n")]
    problems = build_exercises.check_test_cells(lab_with_tests("assert model", outputs=printed))
    assert len(problems) == 1 and "stored output" in problems[0]


def test_without_the_test_run_otter_reads_a_copy_that_says_so(tmp_path, monkeypatch):
    lab = tmp_path / "demo.ipynb"
    nbformat.write(source_lab(), lab)
    seen = {}

    class Finished:
        returncode = 0
        stdout = stderr = ""

    def fake_run(command, **kwargs):
        source = Path(command[-2])
        seen["name"] = source.name
        seen["config"] = nbformat.read(source, as_version=4).cells[0].source
        return Finished()

    monkeypatch.setattr(build_exercises.subprocess, "run", fake_run)
    build_exercises.assign(lab, tmp_path / "out", {}, run_tests=False)
    assert seen["name"] == "demo.ipynb" and "run_tests: false" in seen["config"]
    assert "name: demo" in seen["config"]
    build_exercises.assign(lab, tmp_path / "out", {}, run_tests=True)
    assert "run_tests" not in seen["config"]  # the lab itself, unchanged


def lab_with_public_and_hidden_tests():
    return new_notebook(cells=[
        new_raw_cell("# ASSIGNMENT CONFIG\nname: demo"),
        new_raw_cell("# BEGIN QUESTION\nname: q1"),
        new_raw_cell("# BEGIN SOLUTION"),
        new_code_cell("def double(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION",
                      metadata={"tags": ["hide-input"]}),
        new_raw_cell("# END SOLUTION"),
        new_raw_cell("# BEGIN TESTS"),
        new_code_cell("assert double(2) == 4"),
        new_code_cell('""" # BEGIN TEST CONFIG\npoints: 1\n""" # END TEST CONFIG\nassert double(0) == 0'),
        new_code_cell("# HIDDEN\nassert double(-3) == -6"),
        new_raw_cell("# END TESTS"),
        new_raw_cell("# END QUESTION"),
        new_raw_cell("# BEGIN QUESTION\nname: q2"),
        new_raw_cell("# BEGIN TESTS"),
        new_code_cell("# HIDDEN\nassert double(1) == 2"),
        new_raw_cell("# END TESTS"),
        new_raw_cell("# END QUESTION"),
    ])


def otter_student_version():
    """What Otter Assign makes of the lab above (the shape of its student notebook)."""
    notebook = new_notebook(cells=[
        new_code_cell('# Initialize Otter\nimport otter\ngrader = otter.Notebook("demo.ipynb")',
                      metadata={"deletable": False, "editable": False}),
        new_code_cell("def double(x):\n    ...",
                      metadata={"tags": ["hide-input", "otter_answer_cell"], "execution": {"iopub.execute_input": "2026-01-01T00:00:00Z"}}),
        new_code_cell('grader.check("q1")', metadata={"deletable": False, "editable": False}),
        new_code_cell('grader.check("q2")'),
    ])
    notebook.metadata["otter"] = {"assignment_name": "demo", "tests": {"q1": {"suites": []}}}
    notebook.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    return notebook


def test_the_student_version_runs_its_public_tests_as_plain_code():
    secrets = build_exercises.read_secrets(lab_with_public_and_hidden_tests())
    assert secrets.public_tests == {"q1": ["assert double(2) == 4", "assert double(0) == 0"], "q2": []}
    student = build_exercises.plain_student_version(otter_student_version(), secrets)
    sources = [cell.source for cell in student.cells]
    assert len(sources) == 3 and not any(build_exercises.USES_OTTER.search(source) for source in sources)
    assert sources[0] == "def double(x):\n    ..."
    assert student.cells[0].metadata == {"tags": ["otter_answer_cell"]}  # unfolded, no timings
    assert "assert double(2) == 4\n\nassert double(0) == 0" in sources[1]
    assert "-3" not in "".join(sources) and "has no public checks" in sources[2]
    assert student.metadata["otter"] == {"assignment_name": "demo"}  # what Otter's grader checks
    assert student.metadata["language_info"] == {"name": "python"}
    # Public checks that pass run silently but for their last line; a wrong answer raises.
    namespace = {}
    exec("def double(x):\n    return 2 * x", namespace)
    exec(sources[1], namespace)
    exec("def double(x):\n    return x + 2", namespace)
    try:
        exec(sources[1], namespace)
        raise RuntimeError("a wrong answer passed the public checks")
    except AssertionError:
        pass
    # Built twice, the same bytes: the committed copy can be compared with a fresh build.
    again = build_exercises.plain_student_version(otter_student_version(), secrets)
    assert nbformat.writes(again) == nbformat.writes(student)


def test_a_student_version_that_uses_otter_is_reported(tmp_path):
    secrets = build_exercises.read_secrets(source_lab())
    out = write_student(tmp_path, [new_code_cell("import otter"), new_code_cell('grader.check("q1")')])
    problems = build_exercises.check_student(Path("labs/demo.ipynb"), secrets, out)
    assert len(problems) == 2 and all("uses Otter" in problem for problem in problems)


def test_a_stale_committed_student_version_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(build_exercises, "STUDENT_COPIES", tmp_path / "exercises")
    out = write_student(tmp_path, [new_code_cell("scratch_model = ...")])
    lab = Path("labs/demo.ipynb")
    assert "is missing" in build_exercises.student_copy_problems(lab, out, write=False)[0]
    assert build_exercises.student_copy_problems(lab, out, write=True) == []
    assert build_exercises.student_copy_problems(lab, out, write=False) == []
    (tmp_path / "exercises" / "demo.ipynb").write_text("{}")
    assert "is not the student version" in build_exercises.student_copy_problems(lab, out, write=False)[0]
