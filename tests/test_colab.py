"""The notebooks as students meet them: on a fresh Colab runtime, and graded by Otter.

One stand-in Colab runtime (``tests/colab.py``: a new virtual environment with only
torch and the Jupyter kernel, and ``google.colab`` imported at kernel start) serves
every test here. Lab 5 and chapter 8, the cheapest lab and a representative chapter
(it loads all-MiniLM-L6-v2 from its package, reads a study's record and the shared
data, and builds or loads the CPU baseline), run top to bottom in it, each starting
with its own install cell. The install cell's command runs as written, except that
the repository is a local git repository holding the working tree as it would be
committed (tracked files with their changes, and untracked files git does not
ignore) instead of the hosted branch. Everything a notebook reads at run time must
therefore ship inside the package.

Then the autograder of lab 5 is built, its own requirements (Otter and the book's
library with the notebooks extra, from the same local repository) are installed into
that runtime, and Otter's local runner grades two submissions: the solutions, which
must get every point, and one with two wrong answers, which must lose exactly the
points of the tests they fail: all of q3's, and the hidden test's half of q1's (that
answer passes its public checks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

import colab

REPO_ROOT = Path(__file__).resolve().parents[1]
LAB = "labs/05_length_extrapolation.ipynb"
CHAPTER = "chapters/08_unargmaxable.ipynb"
# TUTORIAL_LIB_COLAB_ALL=1 runs every chapter and every lab on the stand-in runtime (about
# 20 minutes on two cores: a documented check, not part of make test, which runs the two above).
EVERY_NOTEBOOK = os.environ.get("TUTORIAL_LIB_COLAB_ALL") == "1"
NOTEBOOKS = [LAB, CHAPTER] + ([str(path.relative_to(REPO_ROOT))
                               for folder in ("chapters", "labs")
                               for path in sorted((REPO_ROOT / folder).glob("*.ipynb"))
                               if str(path.relative_to(REPO_ROOT)) not in (LAB, CHAPTER)]
                              if EVERY_NOTEBOOK else [])

spec = importlib.util.spec_from_file_location("build_exercises", REPO_ROOT / "scripts" / "build_exercises.py")
build_exercises = importlib.util.module_from_spec(spec)
sys.modules.setdefault(spec.name, build_exercises)
spec.loader.exec_module(build_exercises)

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(),
                                reason="needs git and the book's git repository")


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> tuple[Path, str]:
    """A git repository with one more commit than HEAD: the working tree as it would be
    committed. Returns its path and that commit."""
    clone = tmp_path_factory.mktemp("repository") / "beyond-bert"
    git("clone", "--quiet", "--no-hardlinks", str(REPO_ROOT), str(clone), cwd=REPO_ROOT)
    changed = git("ls-files", "--modified", "--others", "--exclude-standard", "-z", cwd=REPO_ROOT)
    for name in filter(None, changed.split("\0")):
        source, target = REPO_ROOT / name, clone / name
        if source.is_symlink() or source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)
    for name in filter(None, git("ls-files", "--deleted", "-z", cwd=REPO_ROOT).split("\0")):
        (clone / name).unlink(missing_ok=True)
    git("add", "--all", cwd=clone)
    git("-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "--quiet",
        "--allow-empty", "-m", "the working tree", cwd=clone)
    return clone, git("rev-parse", "HEAD", cwd=clone).strip()


@pytest.fixture(scope="module")
def runtime():
    """A fresh stand-in runtime, outside pytest's temporary folders (which pytest deletes
    while the next run waits); removed in the background afterwards."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tutorial_lib" / "colab"
    root = Path(tempfile.mkdtemp(prefix="colab-runtime-"))
    try:
        yield colab.make_runtime(root / "runtime", cache)
    finally:
        colab.remove_later(root)


def executed_outputs(path: Path, cell_index: int) -> str:
    cell = nbformat.read(path, as_version=4).cells[cell_index]
    return "".join(output.get("text", "") for output in cell.outputs)


def install_cell_index(notebook) -> int:
    return next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and colab._installs(cell))


# The helpers, without a runtime.

def test_the_install_cell_is_rewritten_to_the_local_repository_only():
    notebook = nbformat.read(REPO_ROOT / LAB, as_version=4)
    assert colab.install_requirement(notebook).startswith("tutorial-lib[notebooks] @ git+https://github.com/")
    local = colab.with_local_repository(notebook, "/tmp/repo", "0123abc")
    assert colab.install_requirement(local) == "tutorial-lib[notebooks] @ git+file://localhost/tmp/repo@0123abc"
    index = install_cell_index(notebook)
    assert [cell.source for i, cell in enumerate(local.cells) if i != index] == \
           [cell.source for i, cell in enumerate(notebook.cells) if i != index]
    with pytest.raises(ValueError, match="no install cell"):
        colab.with_local_repository(new_notebook(cells=[new_code_cell("import torch")]), "/tmp/repo", "x")


# The runtime: bare, so that a notebook's own install cell must bring everything.

def test_the_runtime_has_torch_and_colab_but_not_the_book(runtime):
    assert runtime.has("torch") and runtime.has("google.colab") and runtime.has("nbclient")
    for module in ("tutorial_lib", "transformers", "matplotlib", "scipy", "otter"):
        assert not runtime.has(module), f"{module} is in the stand-in runtime before any install"


def test_a_missing_package_fails_the_notebook(runtime, tmp_path):
    # What happens to a notebook that imports what its install cell did not install.
    notebook = new_notebook(cells=[new_code_cell("import google.colab, sys\nassert 'google.colab' in sys.modules"),
                                   new_code_cell("import matplotlib")])
    with pytest.raises(colab.NotebookFailed, match="No module named 'matplotlib'"):
        colab.run_notebook(runtime, notebook, tmp_path)


def test_a_broken_reference_fails_the_install_cell(runtime, repository, tmp_path):
    clone, _ = repository
    notebook = nbformat.read(clone / LAB, as_version=4)
    install = notebook.cells[install_cell_index(notebook)]
    broken = colab.with_local_repository(new_notebook(cells=[install]), clone, "no-such-branch")
    with pytest.raises(colab.NotebookFailed, match="CalledProcessError"):
        colab.run_notebook(runtime, broken, tmp_path)
    assert not runtime.has("tutorial_lib")


# The notebooks on the stand-in Colab.

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_runs_on_a_fresh_colab_runtime(name, runtime, repository, tmp_path):
    clone, commit = repository
    notebook = nbformat.read(clone / name, as_version=4)
    executed = colab.run_notebook(runtime, colab.with_local_repository(notebook, clone, commit),
                                  tmp_path, Path(name).name)
    assert "Installed tutorial_lib" in executed_outputs(executed, install_cell_index(notebook))
    shipped = subprocess.run([str(runtime.python), "-c", "import tutorial_lib; print(tutorial_lib.__file__)"],
                             env=runtime.env(), cwd=runtime.root, capture_output=True, text=True,
                             check=True).stdout
    assert str(runtime.root) in shipped, "the notebook did not use the installed package"
    # What other chapters read or run beside the package ships in it, as files.
    package = Path(shipped.strip()).parent
    for name in ("configs/mlm_wikitext2_bert_base.json", "benchmarks/bench_window.py",
                 "benchmarks/bench_deberta.py", "benchmarks/bench_encoder.py", "studies/records"):
        assert (package / name).exists() and not (package / name).is_symlink(), f"{name} is not in the package"


# Grading: the autograder's own environment, Otter's local runner.

def answer_cells(lab) -> list[str]:
    """The solution code of each solution cell of the source lab, in order, without the
    solution markers."""
    answers, stack = [], []
    for cell in lab.cells:
        first = cell.source.splitlines()[0] if cell.source else ""
        if cell.cell_type == "raw" and build_exercises.BOUNDARY.match(first):
            verb, block = build_exercises.BOUNDARY.match(first).groups()
            stack.append(block.lower()) if verb.lower() == "begin" else stack.pop()
        elif cell.cell_type == "code" and stack and stack[-1] == "solution":
            answers.append("\n".join(line for line in cell.source.splitlines()
                                     if not re.match(r"\s*#\s*(BEGIN|END) SOLUTION", line)))
    return answers


def submission(student, answers: list[str]):
    """The student version with its answer cells filled in, as a student hands it in."""
    filled = nbformat.from_dict(student)
    cells = [cell for cell in filled.cells if "otter_answer_cell" in cell.metadata.get("tags", [])]
    assert len(cells) == len(answers), "one answer per answer cell"
    for cell, answer in zip(cells, answers):
        cell.source = answer
    return filled


def autograder_requirements(archive: Path) -> list[str]:
    """The pip requirements of the grading environment an autograder zip describes."""
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        if "requirements.txt" in names:
            text = opened.read("requirements.txt").decode()
            return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        environment = yaml.safe_load(opened.read("environment.yml"))
    pip = [entry for entry in environment["dependencies"] if isinstance(entry, dict) and "pip" in entry]
    return [str(requirement) for entry in pip for requirement in entry["pip"]]


def scores(results: Path) -> dict[str, tuple[float, float]]:
    """``{question: (score, max_score)}`` from Otter's results.json (Gradescope's format,
    where the public tests' summary has no score)."""
    data = json.loads(results.read_text())
    return {test["name"]: (test["score"], test["max_score"]) for test in data["tests"] if "score" in test}


def test_the_autograder_grades_lab_5_in_its_own_environment(runtime, repository, tmp_path):
    clone, commit = repository
    lab = clone / LAB
    out = tmp_path / "build"
    env = dict(os.environ)
    if colab.SHARED_DATA.is_dir():
        env.setdefault("TUTORIAL_LIB_DATA", str(colab.SHARED_DATA))
    build_exercises.assign(lab, out, env, run_tests=False)
    source = nbformat.read(lab, as_version=4)
    secrets = build_exercises.read_secrets(source)
    student = build_exercises.plain_student_version(
        nbformat.read(out / "student" / lab.name, as_version=4), secrets)
    (archive,) = (out / "autograder").glob("*-autograder_*.zip")

    requirements = autograder_requirements(archive)
    assert any(requirement.startswith("tutorial-lib[notebooks] @ git+") for requirement in requirements), requirements
    local = f"git+file://localhost{clone}@{commit}"
    # --no-compile only saves time: Python compiles what it imports.
    runtime.pip("install", "--quiet", "--no-compile",
                *[colab.GIT_REQUIREMENT.sub(local, requirement) for requirement in requirements])

    answers = answer_cells(source)
    wrong = list(answers)
    # q1: the power-of-two slopes again instead of the odd ones, wrong only for head counts
    # that are not powers of two: the public checks (8 heads) pass, a hidden test fails.
    assert "slopes + odd[: num_heads - power]" in wrong[0]
    wrong[0] = wrong[0].replace("slopes + odd[: num_heads - power]", "slopes + slopes[: num_heads - power]")
    # q3: the factor itself, not its power d / (d - 2): wrong everywhere.
    assert "** (head_dim / (head_dim - 2))" in wrong[2]
    wrong[2] = wrong[2].replace(" ** (head_dim / (head_dim - 2))", "")
    points = {name: (float(v), float(v)) for name, v in (("q1_alibi", 2), ("q2_logn", 1), ("q3_ntk", 1),
                                                         ("q4_evaluate", 2))}
    # q1's two points are shared by its public and its hidden test: the wrong answer keeps
    # the public test's point. q3 fails both of its tests.
    expected = {"right": points, "wrong": {**points, "q1_alibi": (1.0, 2.0), "q3_ntk": (0.0, 1.0)}}
    # Both submissions at once, one thread each: the lab's models are small, and a grade
    # does not depend on the number of threads.
    env = {**runtime.env(), "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, filled in (("right", answers), ("wrong", wrong)):
        path = tmp_path / name / lab.name
        path.parent.mkdir()
        nbformat.write(submission(student, filled), path)
        (tmp_path / name / "results").mkdir()
        runs[name] = subprocess.Popen([str(runtime.root / "bin" / "otter"), "run", "-a", str(archive), "-o",
                                       str(tmp_path / name / "results"), str(path)], env=env, cwd=tmp_path / name,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, run in runs.items():
        output = run.communicate(timeout=900)[0]
        assert run.returncode == 0, output[-3000:]
        assert scores(tmp_path / name / "results" / "results.json") == expected[name], (name, output[-3000:])
