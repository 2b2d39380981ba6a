"""Build the instructors' versions of every lab with Otter Assign.

    python scripts/build_exercises.py                 # every labs/*.ipynb
    python scripts/build_exercises.py labs/03_deberta.ipynb

For each lab ``labs/<stem>.ipynb`` (written in Otter Assign's notebook format,
see ``book/instructors.md``) this writes

    dist/exercises/<stem>/student/      the notebook handed to students
    dist/exercises/<stem>/autograder/   the solution notebook and the
                                        autograder zip for ``otter grade``,
                                        ``otter run`` or Gradescope
    exercises/<stem>.ipynb              the student notebook again, committed:
                                        the book's Labs pages and Colab badges
                                        show it (``--check``: only compare)

Otter Assign runs every test, public and hidden, against the solutions; a lab
whose solutions fail a test fails the build. The student notebook is then made
independent of Otter (:func:`plain_student_version`: each ``grader.check`` cell
becomes the question's public tests as plain asserts, so it runs on Colab with
nothing but the library), and checked: it must contain no Otter markers, no use of
Otter, no line of a solution, no hidden test and no cell output. The exit status is
non-zero if any lab fails a step, or, with ``--check``, if a committed copy in
``exercises/`` differs from the fresh build.

Otter runs each test cell in its own copy of the notebook's namespace, without
the names that other test cells define, and compares what the cell prints with
its stored output. Before anything runs, :func:`check_test_cells` checks both
from the source: a test cell may use only names defined outside test cells or in
itself, may not rebind a name the notebook defines, and has no stored output
(under nbval the stored outputs are what the cells print). With those checks,
``--solutions-tested-by-nbval`` skips Otter's own run of the tests: ``make test``
executes every lab, solutions and tests, once under nbval (``make
notebooks-check``) and then only generates and checks the versions here.

Everything runs locally and offline: the tests execute in the current Python
environment (which must have ``tutorial_lib`` installed, ``pip install -e .``),
no Docker image is built and nothing is installed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
LABS = REPO_ROOT / "labs"
OUTPUT = REPO_ROOT / "dist" / "exercises"
# The committed student versions: what the book's Labs pages and Colab badges show.
STUDENT_COPIES = REPO_ROOT / "exercises"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

BOUNDARY = re.compile(r"#\s+(begin|end)\s+(question|prompt|solution|tests)\b", re.IGNORECASE)
CONFIG_CELL = re.compile(r"#\s+assignment\s+config\b", re.IGNORECASE)
BEGIN_TEST_CONFIG = re.compile(r'\s*"""\s*#\s*begin\s+test\s+config', re.IGNORECASE)
END_TEST_CONFIG = re.compile(r'\s*"""\s*#\s*end\s+test\s+config', re.IGNORECASE)
# Any of these in a student notebook means Otter did not process a block. Otter's
# in-code markers are upper case, so "# solution goes here" in a scaffold is fine.
MARKERS = re.compile(
    r"#\s*(BEGIN|END)\s+(SOLUTION|QUESTION|TESTS|PROMPT|TEST CONFIG)\b|# ?SOLUTION\b"
    r"|#\s*ASSIGNMENT CONFIG\b"
)
# The cell Otter puts after each question, and what the student version may not use.
GRADER_CHECK = re.compile(r"""\s*grader\.check\(\s*["']([^"']+)["']\s*\)\s*""")
USES_OTTER = re.compile(r"\bimport otter\b|\bfrom otter\b|\botter\.Notebook\b|\bgrader\.")
# Cell metadata a student version keeps (Otter's locks and the rendering tags).
KEPT_CELL_METADATA = ("tags", "deletable", "editable")
# A solution line shorter than this (spaces not counted) is too generic to look
# for on its own, e.g. ``return out``; it still counts as part of its block.
MIN_CHARS = 16


class LabError(Exception):
    """A lab that cannot be built or whose student version leaks."""


@dataclass
class LabSecrets:
    """What a lab's student version must not contain, read from the source notebook."""

    config: dict = field(default_factory=dict)
    solutions: list[list[str]] = field(default_factory=list)  # blocks of normalised lines
    hidden_tests: list[list[str]] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    # Lines the source hands to students anyway (outside solutions and hidden
    # tests), e.g. ``seed_everything(SEED)`` in the set-up cell and in a solution:
    # finding one of them in the student version is not a leak.
    public: list[str] = field(default_factory=list)
    # Each question's public tests, as written in the source (test configuration removed):
    # the student version runs them as plain cells where Otter would put grader.check.
    public_tests: dict[str, list[str]] = field(default_factory=dict)


def source_lines(cell) -> list[str]:
    return cell.source.splitlines()


def normalise(lines: list[str]) -> list[str]:
    """Strip indentation and drop blank and comment-only lines."""
    kept = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            kept.append(line)
    return kept


def solution_blocks(lines: list[str]) -> list[list[str]]:
    """The solution parts of one code cell of a solution block.

    Lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` form one block;
    a line ending in ``# SOLUTION`` is a block of its own (for ``x = value  #
    SOLUTION`` only ``value`` is secret: the student keeps ``x = ...``). A cell
    with neither marker is entirely solution: Otter would hand it out unchanged,
    so every line of it is searched for.
    """
    blocks: list[list[str]] = []
    current: list[str] | None = None
    marked = False
    for line in lines:
        stripped = line.rstrip()
        if re.match(r"\s*#\s*BEGIN SOLUTION", stripped):
            current, marked = [], True
            continue
        if stripped.endswith("# END SOLUTION"):
            if current is not None:
                blocks.append(current)
            current = None
            continue
        if current is not None:
            current.append(line)
            continue
        match = re.match(r"(.*?)\s*# ?SOLUTION\b", stripped)
        if match:
            marked = True
            code = match.group(1)
            assignment = re.match(r"\s*[\w.\[\]'\", ]+?\s*=(?!=)\s*(.+)", code)
            blocks.append([assignment.group(1) if assignment else code])
    if not marked:
        blocks.append(list(lines))
    return [normalise(block) for block in blocks if normalise(block)]


def test_body(lines: list[str]) -> tuple[bool, list[str]]:
    """Whether a test cell is hidden, and its code without the configuration."""
    hidden = False
    if lines and BEGIN_TEST_CONFIG.match(lines[0]):
        ends = [i for i, line in enumerate(lines) if END_TEST_CONFIG.match(line)]
        if not ends:
            raise LabError(f"test cell without '\"\"\" # END TEST CONFIG': {lines[0]!r}")
        end = ends[0]
        config = yaml.safe_load("\n".join(lines[1:end])) or {}
        return bool(config.get("hidden", False)), lines[end + 1 :]
    if lines and lines[0].lstrip().startswith("#"):
        hidden = bool(re.search(r"\bhidden\b", lines[0], re.IGNORECASE))
        if hidden:
            return True, lines[1:]
    return hidden, lines


def read_secrets(notebook) -> LabSecrets:
    """Walk the Otter blocks of a source lab notebook."""
    secrets = LabSecrets()
    stack: list[str] = []
    for index, cell in enumerate(notebook.cells, start=1):
        lines = source_lines(cell)
        if cell.cell_type == "markdown" and "```otter" in cell.source:
            raise LabError(
                f"cell {index}: write Otter blocks as raw cells, not ```otter fences "
                "(the book would render the fence as code)"
            )
        if cell.cell_type == "raw" and lines and CONFIG_CELL.match(lines[0]):
            secrets.config = yaml.safe_load("\n".join(lines[1:])) or {}
            continue
        if cell.cell_type == "raw" and lines and BOUNDARY.match(lines[0]):
            verb, block = BOUNDARY.match(lines[0]).groups()
            block = block.lower()
            if verb.lower() == "begin":
                stack.append(block)
                if block == "question":
                    question = yaml.safe_load("\n".join(lines[1:])) or {}
                    secrets.questions.append(str(question.get("name", f"cell {index}")))
                    secrets.public_tests[secrets.questions[-1]] = []
            elif not stack or stack.pop() != block:
                raise LabError(f"cell {index}: '# END {block.upper()}' does not close an open block")
            continue
        inside = stack[-1] if stack else None
        if inside == "solution":
            if cell.cell_type == "code":
                secrets.solutions += solution_blocks(lines)
            elif cell.cell_type == "markdown" and "otter_include" not in cell.metadata.get("tags", []):
                secrets.solutions += [block for block in [normalise(lines)] if block]
        elif inside == "tests" and cell.cell_type == "code":
            hidden, body = test_body(lines)
            if hidden and normalise(body):
                secrets.hidden_tests.append(normalise(body))
            elif not hidden and normalise(body) and secrets.questions:
                secrets.public_tests[secrets.questions[-1]].append("\n".join(body).strip("\n"))
        elif cell.cell_type == "code" and re.search(r"#\s*(BEGIN )?SOLUTION\b", cell.source):
            # Solution markers outside a solution block are only stripped when
            # strip_solutions_from_all_cells is set; look for leaks either way.
            secrets.solutions += solution_blocks(lines)
        elif inside != "tests":
            secrets.public += normalise(lines)
    if stack:
        raise LabError(f"unclosed Otter block(s): {', '.join(stack)}")
    if not secrets.config:
        raise LabError("no '# ASSIGNMENT CONFIG' raw cell")
    return secrets


def doctest_code(text: str) -> list[str]:
    """The source lines of an OK-format (doctest) test case."""
    lines = []
    for line in text.splitlines():
        if line.startswith((">>> ", "... ")):
            lines.append(line[4:])
        elif line in (">>>", "..."):
            lines.append("")
    return lines


def student_texts(student_dir: Path, notebook) -> list[list[str]]:
    """Every piece of text a student receives, as normalised line lists."""
    texts = [normalise(source_lines(cell)) for cell in notebook.cells]
    for test in notebook.metadata.get("otter", {}).get("tests", {}).values():
        for suite in test.get("suites", []) if isinstance(test, dict) else []:
            for case in suite.get("cases", []):
                texts.append(normalise(doctest_code(case.get("code", ""))))
    for path in sorted(student_dir.rglob("*")):
        if path.is_file() and path.suffix in {".py", ".txt", ".md", ".yml", ".yaml", ".json"}:
            text = path.read_text(errors="replace")
            texts.append(normalise(text.splitlines()))
            texts.append(normalise(doctest_code(text)))
    return texts


def contains(haystack: list[str], needle: list[str]) -> bool:
    """Whether ``needle`` occurs as consecutive lines of ``haystack``."""
    if len(needle) == 1:
        return any(needle[0] in line for line in haystack)
    width = len(needle)
    return any(haystack[i : i + width] == needle for i in range(len(haystack) - width + 1))


def distinctive(line: str) -> bool:
    return len(re.sub(r"\s", "", line)) >= MIN_CHARS


def _bound_names(tree, top_level: bool = False) -> set[str]:
    """Names a piece of code binds (assignments, imports, defs, loops, arguments).

    With ``top_level``, only the names bound in the module's own namespace: what
    functions, classes, lambdas and comprehensions bind inside is local to them.
    """
    import ast

    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
              ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    bound: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        if top_level and node is not tree and isinstance(node, scopes):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                todo += node.decorator_list  # evaluated in the enclosing namespace
            continue
        todo += list(ast.iter_child_nodes(node))
    return bound


def _code(cell) -> str:
    # IPython magics and shell lines are not Python; they never define test names.
    return "\n".join(line for line in cell.source.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


def check_test_cells(notebook) -> list[str]:
    """Problems that would make Otter's run of a test cell differ from nbval's.

    Otter runs every test cell alone against the notebook's namespace, so a test
    cell must not need a name that only another test cell defines, and must not
    rebind a name that the notebook itself defines (under nbval, where cells share
    one namespace, that would change what later cells see). Otter also compares
    what a test prints with the cell's stored output, which must therefore be empty.
    """
    import ast
    import builtins

    notebook_names: set[str] = set(dir(builtins))
    tests = []  # (cell number, tree, cell)
    stack: list[str] = []
    for index, cell in enumerate(notebook.cells, start=1):
        lines = source_lines(cell)
        if cell.cell_type == "raw" and lines and BOUNDARY.match(lines[0]):
            verb, block = BOUNDARY.match(lines[0]).groups()
            if verb.lower() == "begin":
                stack.append(block.lower())
            elif stack:
                stack.pop()
            continue
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_code(cell))
        except SyntaxError as error:
            raise LabError(f"cell {index} is not valid Python: {error}") from None
        if stack and stack[-1] == "tests":
            tests.append((index, tree, cell))
        else:
            notebook_names |= _bound_names(tree, top_level=True)
    problems = []
    for index, tree, cell in tests:
        own = _bound_names(tree)
        used = {node.id for node in ast.walk(tree)
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        missing = sorted(used - own - notebook_names)
        if missing:
            problems.append(f"test cell {index} uses {', '.join(missing)}, defined only in other "
                            "test cells (Otter runs each test cell on its own)")
        clobbered = sorted((_bound_names(tree, top_level=True) & notebook_names)
                           - set(dir(builtins)) - {"_"})
        if clobbered:
            problems.append(f"test cell {index} rebinds {', '.join(clobbered)}, which the notebook "
                            "defines; use other names in tests")
        if cell.get("outputs"):
            problems.append(f"test cell {index} has a stored output; a test must print nothing "
                            "(Otter compares the output)")
    return problems


def public_check_source(question: str, tests: list[str]) -> str:
    """The cell that replaces Otter's ``grader.check(question)``: the public tests as code."""
    if not tests:
        return (f"# {question} has no public checks: the autograder's tests are hidden.\n"
                f'print("{question}: no public checks")')
    head = (f"# Public checks of {question}: this cell runs without an error when they pass.\n"
            "# Graded submissions also face hidden tests.\n")
    return head + "\n\n".join(tests) + f'\nprint("{question}: the public checks pass")'


def plain_student_version(otter_student, secrets: LabSecrets):
    """The student version without Otter: Otter's student notebook with its set-up cell
    (``import otter``) removed, each ``grader.check("q")`` cell replaced by q's public
    tests as plain code, no tests in the metadata (only the assignment's name, which
    Otter's grader checks in a submission), answer cells unfolded (the source
    folds its solutions with ``hide-input``), and metadata and cell ids that do not
    depend on when or where it was built."""
    cells = []
    for cell in otter_student.cells:
        if cell.cell_type == "code" and "otter.Notebook(" in cell.source:
            continue
        match = GRADER_CHECK.fullmatch(cell.source) if cell.cell_type == "code" else None
        if match:
            question = match.group(1)
            if question not in secrets.public_tests:
                raise LabError(f"Otter checks an unknown question {question!r}")
            cell = nbformat.v4.new_code_cell(public_check_source(question, secrets.public_tests[question]))
        else:
            cell = nbformat.from_dict(cell)
            cell.metadata = nbformat.from_dict({key: value for key, value in cell.metadata.items()
                                                if key in KEPT_CELL_METADATA})
            tags = cell.metadata.get("tags", [])
            if "otter_answer_cell" in tags and "hide-input" in tags:
                cell.metadata["tags"] = [tag for tag in tags if tag != "hide-input"]
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index:03d}"
    metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    # Otter's runner refuses a submission that does not name its assignment.
    name = otter_student.metadata.get("otter", {}).get("assignment_name")
    if name:
        metadata["otter"] = {"assignment_name": name}
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata)


def student_copy_problems(lab: Path, out: Path, write: bool) -> list[str]:
    """Compare the committed student version ``exercises/<lab>`` with the one just
    built in ``out``; with ``write``, replace it instead."""
    built = (out / "student" / lab.name).read_text(encoding="utf-8")
    committed = STUDENT_COPIES / lab.name
    shown = committed.relative_to(REPO_ROOT) if committed.is_relative_to(REPO_ROOT) else committed
    source = lab.relative_to(REPO_ROOT) if lab.is_relative_to(REPO_ROOT) else lab
    if write:
        STUDENT_COPIES.mkdir(exist_ok=True)
        committed.write_text(built, encoding="utf-8")
        return []
    if not committed.is_file():
        return [f"{shown} is missing: run `make exercises` and commit it"]
    if committed.read_text(encoding="utf-8") != built:
        return [f"{shown} is not the student version of the current {source}: "
                "run `make exercises` and commit it"]
    return []


def check_student(lab: Path, secrets: LabSecrets, out: Path) -> list[str]:
    """Problems with the student version of ``lab``; empty when it is clean."""
    problems = []
    student_nb_path = out / "student" / lab.name
    if not student_nb_path.is_file():
        return [f"no student notebook at {student_nb_path}"]
    if not list((out / "autograder").glob(f"{lab.stem}-autograder_*.zip")):
        problems.append("no autograder zip was written")
    student = nbformat.read(student_nb_path, as_version=4)

    for index, cell in enumerate(student.cells, start=1):
        marker = MARKERS.search(cell.source)
        if marker:
            problems.append(f"student cell {index} still has the marker {marker.group(0)!r}")
        otter_use = USES_OTTER.search(cell.source) if cell.cell_type == "code" else None
        if otter_use:
            problems.append(f"student cell {index} uses Otter ({otter_use.group(0)!r}); the student "
                            "version runs its public checks as plain code")
        if cell.cell_type == "code" and cell.get("outputs"):
            problems.append(f"student cell {index} has outputs (they can give answers away)")
        if cell.cell_type == "code":
            # Otter rewrites "x = value  # SOLUTION" to "x = ...": a statement continued
            # over several such lines can come out as code that does not parse.
            python = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                               for line in cell.source.splitlines())
            try:
                ast.parse(python)
            except SyntaxError as error:
                problems.append(f"student cell {index} is not valid Python ({error.msg}, "
                                f"line {error.lineno}: {(error.text or '').strip()!r})")

    texts = student_texts(out / "student", student)
    every_line = [line for text in texts for line in text]
    leaked = []
    for block in secrets.solutions:
        # A whole block, even one made of short lines, or any distinctive line of
        # it (also inside a longer line, e.g. a hint in a Markdown cell).
        if len(block) > 1 and any(contains(text, block) for text in texts):
            leaked.append(block[0])
        leaked += [line for line in block if distinctive(line)
                   and not any(line in given for given in secrets.public)
                   and any(line in other for other in every_line)]
    for line in dict.fromkeys(leaked):
        problems.append(f"solution code reached the student version: {line!r}")
    for block in secrets.hidden_tests:
        if any(contains(text, block) for text in texts):
            problems.append(f"hidden test reached the student version: {block[0]!r}")
    metadata = json.dumps(student.metadata.get("otter", {}))
    if '"hidden": true' in metadata:
        problems.append("the student notebook's metadata lists a hidden test case")
    if set(student.metadata.get("otter", {})) - {"assignment_name"}:
        problems.append("the student notebook's metadata holds more of Otter than the assignment's "
                        "name (its tests?)")
    return problems


def assign(lab: Path, out: Path, env: dict[str, str], run_tests: bool = True) -> None:
    """Run ``otter assign``, which also runs all tests against the solutions unless
    ``run_tests`` is false (then it reads a copy of the lab whose configuration says so)."""
    import tempfile

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        source = lab
        if not run_tests:
            notebook = nbformat.read(lab, as_version=4)
            for cell in notebook.cells:
                if cell.cell_type == "raw" and CONFIG_CELL.match(cell.source.lstrip()):
                    config = yaml.safe_load("\n".join(source_lines(cell)[1:])) or {}
                    config["run_tests"] = False
                    cell.source = "# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=False)
            source = Path(scratch) / lab.name  # the same name: Otter names its output after it
            nbformat.write(notebook, source)
        command = [sys.executable, "-m", "otter", "assign", "--no-pdfs", str(source), str(out)]
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        log = (result.stdout + result.stderr).strip()
        # Otter ends with a traceback whose last exception holds the test report.
        report = log[log.rfind("\nRuntimeError:") + 1 :] if "\nRuntimeError:" in log else log
        raise LabError(f"otter assign failed (exit {result.returncode}):\n{report}")


def build(lab: Path, env: dict[str, str], run_tests: bool = True,
          student_copy: str | None = None) -> list[str]:
    """Build one lab into ``dist/exercises/<lab>``; the problems found, empty when none.

    ``student_copy`` is ``"write"`` to update the committed copy in ``exercises/``,
    ``"check"`` to report a committed copy that differs from the fresh build, or None.
    """
    notebook = nbformat.read(lab, as_version=4)
    secrets = read_secrets(notebook)
    problems = check_test_cells(notebook)
    if problems:
        return problems
    if secrets.config.get("run_tests") is False:
        raise LabError("ASSIGNMENT CONFIG sets run_tests: false; the solutions must be tested")
    if secrets.config.get("generate") is False:
        raise LabError("ASSIGNMENT CONFIG sets generate: false; the autograder zip is needed")
    if not secrets.questions:
        raise LabError("no '# BEGIN QUESTION' block: a lab needs autograded exercises")
    out = OUTPUT / lab.stem
    try:
        assign(lab, out, env, run_tests=run_tests)
        student_path = out / "student" / lab.name
        if student_path.is_file():
            otter_student = nbformat.read(student_path, as_version=4)
            nbformat.write(plain_student_version(otter_student, secrets), student_path)
        problems = check_student(lab, secrets, out)
        if not problems and student_copy:
            problems = student_copy_problems(lab, out, write=student_copy == "write")
    except LabError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if problems:
        # Never leave a leaking student version where it could be handed out.
        shutil.rmtree(out, ignore_errors=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labs", nargs="*", type=Path, help="lab notebooks (default: labs/*.ipynb)")
    parser.add_argument("--check", action="store_true",
                        help="do not update exercises/ (the committed student versions): fail "
                             "if a copy there differs from the fresh build, is missing or has no lab")
    parser.add_argument("--solutions-tested-by-nbval", action="store_true",
                        help="skip Otter's run of the tests: the labs, solutions and tests, "
                             "were just executed and checked by nbval (make notebooks-check)")
    args = parser.parse_args(argv)

    labs = [path.resolve() for path in args.labs]
    if not labs:
        labs = sorted(LABS.glob("*.ipynb"))
        if not labs:
            print("no labs in labs/: nothing to build")
            return 0
        # A full build leaves nothing behind from labs that no longer exist.
        shutil.rmtree(OUTPUT, ignore_errors=True)

    env = dict(os.environ)
    # Otter runs each lab in a temporary folder, so relative data paths do not
    # reach the shared data; point the library's loaders at it explicitly.
    if "TUTORIAL_LIB_DATA" not in env and SHARED_DATA.is_dir():
        env["TUTORIAL_LIB_DATA"] = str(SHARED_DATA)

    failed = []
    for lab in labs:
        shown = lab.relative_to(REPO_ROOT) if lab.is_relative_to(REPO_ROOT) else lab
        print(f"{shown} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            if not lab.is_file():
                raise LabError("no such notebook")
            problems = build(lab, env, run_tests=not args.solutions_tested_by_nbval,
                             student_copy="check" if args.check else "write")
        except LabError as error:
            problems = [str(error)]
        seconds = time.perf_counter() - start
        if problems:
            failed.append(shown)
            print(f"FAILED ({seconds:.1f} s)")
            for problem in problems:
                print("  " + problem.replace("\n", "\n  "))
        else:
            print(f"ok ({seconds:.1f} s) -> {(OUTPUT / lab.stem).relative_to(REPO_ROOT)}")

    if not args.labs:
        # A full build also accounts for every committed copy: one whose lab is gone
        # would stay on the book's site.
        sources = {lab.name for lab in labs}
        for orphan in sorted(STUDENT_COPIES.glob("*.ipynb")):
            if orphan.name in sources:
                continue
            if args.check:
                failed.append(orphan.relative_to(REPO_ROOT))
                print(f"{orphan.relative_to(REPO_ROOT)}: no lab labs/{orphan.name} builds it; delete it")
            else:
                orphan.unlink()
                print(f"{orphan.relative_to(REPO_ROOT)}: deleted, its lab is gone")

    if failed:
        print(f"{len(failed)} of {len(labs)} lab(s) failed: " + ", ".join(map(str, failed)), file=sys.stderr)
        return 1
    print(f"{len(labs)} lab(s) built in {OUTPUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
