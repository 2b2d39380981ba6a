"""The transformers floor cannot drift from its check and its documentation.

``scripts/check_transformers_floor.py`` installs the oldest transformers that
``pyproject.toml`` accepts into a fresh virtual environment and runs the tests that use
it (minutes, and a package registry): CI does not run it. These tests are the cheap
part, with no environment and no install: the script reads the floor that
``pyproject.toml`` declares, the README names that floor and the check, and the
pieces the check builds (its constraints, chapter 0's collator, the test selection)
are what it says they are.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "check_transformers_floor", REPO_ROOT / "scripts" / "check_transformers_floor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


check = load_script()


def pyproject_floors() -> dict[str, str]:
    """``{extra: floor}`` for each extra of ``pyproject.toml`` that requires transformers."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floors = {}
    for extra, requirements in extras.items():
        for requirement in requirements:
            match = re.fullmatch(r"transformers\s*>=\s*([0-9.]+)", requirement.strip())
            if match:
                floors[extra] = match[1]
    return floors


def test_the_script_reads_the_floor_pyproject_declares():
    floors = pyproject_floors()
    assert set(floors) == {"notebooks", "test"}, floors
    assert len(set(floors.values())) == 1, f"the extras disagree: {floors}"
    assert check.declared_floor() == floors["test"]


def test_the_readme_names_the_floor_and_its_check():
    readme = (REPO_ROOT / "README.md").read_text()
    floor = check.declared_floor()
    assert re.search(rf"transformers {re.escape(floor)}(?!\.?\d)", readme), \
        f"README.md should name the tested floor 'transformers {floor}'"
    assert "python scripts/check_transformers_floor.py" in readme
    assert "constraints.txt" in readme


def test_disagreeing_or_missing_floors_are_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = []\n[project.optional-dependencies]\n'
                         'a = ["transformers>=5.19"]\nb = ["transformers>=4.50", "sentence-transformers>=2.2"]\n')
    with pytest.raises(ValueError, match="floors"):
        check.declared_floor(pyproject)
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["transformers"]\n')
    with pytest.raises(ValueError, match="no >= floor"):
        check.declared_floor(pyproject)
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["sentence-transformers>=2.2",'
                         ' "Transformers[torch] >= 5.19 ; python_version >= \'3.10\'"]\n')
    assert check.declared_floor(pyproject) == "5.19"


def test_the_constraints_pin_the_floor_keep_torch_and_free_what_moves_with_it():
    lines = check.floor_constraints("5.19").splitlines()
    pins = {check.normalized(line.split("==")[0]): line.split("==")[1]
            for line in lines if "==" in line and not line.startswith("#")}
    assert pins["transformers"] == "5.19"
    assert pins["torch"] == "2.13.0"
    for name in ("tokenizers", "huggingface-hub", "hf-xet", "safetensors", "sentence-transformers"):
        assert name not in pins, name
    original = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    kept = [line for line in original if line.split("==")[0].lower().replace("_", "-")
            not in check.RESOLVED_WITH_TRANSFORMERS]
    assert lines[:len(kept)] == kept  # every other line as it is


def test_the_check_finds_chapter_0s_collator_and_the_tests_that_use_transformers():
    collator = check.chapter_0_collator()
    assert collator.startswith("hf_tokenizer = transformers.PreTrainedTokenizerFast(")
    assert "transformers.DataCollatorForLanguageModeling(" in collator and "seed=0" in collator
    assert "import transformers" in check.notebook_imports()
    compile(check.snippet("5.19"), "floor_snippet.py", "exec")
    files = check.test_files()
    for name in ("test_interop", "test_deberta", "test_pretrained_minilm", "test_tokenization",
                 "test_transformers_floor"):
        assert f"tests/{name}.py" in files, name
    assert "tests/test_layers.py" not in files and "tests/test_data.py" not in files
