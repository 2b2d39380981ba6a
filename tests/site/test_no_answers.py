"""The built site gives no lab's answers away: no solution code and no hidden test.

The Labs pages show the student versions (``exercises/``); the source labs in ``labs/``,
solutions and hidden tests included, are for instructors and are not built. This reads
every file of ``_build/html`` as text (HTML tags removed, entities decoded, so code split
into highlighted spans reads as written) and looks for each distinctive line of every
lab's solutions and hidden tests that its student version does not itself contain.

Needs only the built site, no browser: ``pytest tests/site/test_no_answers.py``.
"""

from __future__ import annotations

import html
import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LABS = sorted((REPO_ROOT / "labs").glob("*.ipynb"))
TEXT_SUFFIXES = {".html", ".txt", ".ipynb", ".md", ".js", ".json", ".py"}

spec = importlib.util.spec_from_file_location("build_exercises", REPO_ROOT / "scripts" / "build_exercises.py")
build_exercises = importlib.util.module_from_spec(spec)
sys.modules.setdefault(spec.name, build_exercises)
spec.loader.exec_module(build_exercises)


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def page_text(path: Path) -> str:
    """A built file as the text a reader can see or copy, without whitespace."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".html":
        text = re.sub(r"<(script|style)\b.*?</\1>", " ", text, flags=re.DOTALL | re.IGNORECASE)
        text = re.sub(r"<[^>]+>", "", text)
    return squeeze(html.unescape(text))


def given_text(lab: Path, student: Path | None, secrets) -> str:
    """What students are given anyway, without whitespace: the lab's public lines and its
    student version. A secret inside it (a hidden test's line that is part of a public
    one) tells them nothing."""
    given = squeeze("\n".join(secrets.public))
    if student is not None and student.is_file():
        given += squeeze("".join(cell.source for cell in nbformat.read(student, as_version=4).cells))
    return given


def secrets_of(lab: Path, student: Path | None) -> tuple[list[str], list[str]]:
    """``(blocks, lines)``: each solution and hidden-test block of the lab as one string,
    and each distinctive line of them, whitespace removed, leaving out what students are
    given anyway."""
    secrets = build_exercises.read_secrets(nbformat.read(lab, as_version=4))
    given = given_text(lab, student, secrets)
    blocks = {"".join(squeeze(line) for line in block) for block in secrets.solutions + secrets.hidden_tests
              if len(block) > 1}
    lines = {squeeze(line) for block in secrets.solutions + secrets.hidden_tests for line in block
             if build_exercises.distinctive(line)}
    return (sorted(block for block in blocks if block not in given),
            sorted(line for line in lines if line not in given))


def leaks(texts: dict[str, str], lab: Path, student: Path | None) -> list[str]:
    """``page: secret`` for each solution or hidden test of ``lab`` found in the site's
    ``texts``: a whole block (two lines or more) on any page, or a distinctive line on the
    lab's own pages. (Chapters may share single lines with a lab's answers, such as
    ``delta.requires_grad_()``: they teach the same techniques.)"""
    blocks, lines = secrets_of(lab, student)
    found = [f"{page}: {block[:120]}" for block in blocks for page, text in texts.items() if block in text]
    own = {page: text for page, text in texts.items()
           if Path(page).stem == lab.stem and "exercises" in Path(page).parts}
    found += [f"{page}: {line}" for line in lines for page, text in own.items() if line in text]
    return found


@pytest.fixture(scope="module")
def site_texts(site) -> dict[str, str]:
    return {str(path.relative_to(site)): page_text(path) for path in sorted(site.rglob("*"))
            if path.is_file() and path.suffix in TEXT_SUFFIXES}


def test_the_source_labs_are_not_built(site):
    assert not (site / "labs").exists(), "the site has pages built from labs/, the instructors' source"
    assert (site / "exercises").is_dir(), "the site has no student versions of the labs"


@pytest.mark.parametrize("lab", LABS, ids=lambda path: path.stem)
def test_the_site_has_none_of_the_labs_answers(lab, site_texts):
    found = leaks(site_texts, lab, REPO_ROOT / "exercises" / lab.name)
    assert not found, f"{lab.name}: solution or hidden-test lines on the site:\n  " + "\n  ".join(found[:20])


def test_the_check_finds_a_solution_on_a_page():
    lab = next(path for path in LABS if path.stem.startswith("05_")) if LABS else None
    if lab is None:
        pytest.skip("no lab")
    student = REPO_ROOT / "exercises" / lab.name
    blocks, lines = secrets_of(lab, student)
    assert blocks and lines, "the lab has no secrets to look for"
    # The source lab, rendered as the lab's page or as any other page, leaks...
    source = page_text_from_notebook(lab)
    assert len(leaks({f"exercises/{lab.stem}.html": source}, lab, student)) >= len(blocks) + len(lines)
    assert len(leaks({"chapters/other.html": source}, lab, student)) >= len(blocks)
    # ...and the student version does not.
    assert not leaks({f"exercises/{lab.stem}.html": page_text_from_notebook(student)}, lab, student)


def page_text_from_notebook(path: Path) -> str:
    """A notebook's cells as a page would show them, escaped and tagged as in HTML."""
    cells = nbformat.read(path, as_version=4).cells
    return squeeze(html.unescape("".join(f"<pre>{html.escape(cell.source)}</pre>" for cell in cells)))
