"""The book's notebooks carry no control characters in their Markdown and code.

A string written with a single backslash in Python turns ``\\times`` into a tab
followed by ``imes`` and ``\\beta`` into a backspace: MathJax then shows broken
mathematics without any error. Tabs have no place in the book's text either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted([*REPO_ROOT.glob("chapters/*.ipynb"), *REPO_ROOT.glob("labs/*.ipynb"),
                    *REPO_ROOT.glob("exercises/*.ipynb")])
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\t")


def control_characters(text: str) -> list[str]:
    """Each control character in ``text`` with a little context, as repr strings."""
    return [repr(text[max(0, m.start() - 15):m.end() + 10]) for m in CONTROL.finditer(text)]


def test_the_check_finds_a_swallowed_backslash():
    assert control_characters("$n\times n$")  # a tab: what "\times" becomes
    assert control_characters("$\beta$")  # a backspace
    assert not control_characters("$n\\times n$\nnext line")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_no_control_characters_in_cells(notebook):
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    found = [f"cell {index} ({cell['cell_type']}): {snippet}"
             for index, cell in enumerate(cells)
             for snippet in control_characters("".join(cell["source"]))]
    assert not found, f"{notebook.name} has control characters:\n" + "\n".join(found)


def test_every_notebook_names_the_repository_and_branch_of_the_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sync_repository_ref", Path(__file__).resolve().parents[1] / "scripts" / "sync_repository_ref.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert sync.mismatches() == [], "run: python scripts/sync_repository_ref.py"
    # The rewrite reaches each kind of copy, as the notebooks' JSON spells it.
    fork = ('"requirement = \\"tutorial-lib[notebooks] @ git+https://github.com/someone/fork@dev\\"\\n",\n'
            '"  - tutorial-lib @ git+https://github.com/someone/fork@v2\\n",\n'
            '"(https://colab.research.google.com/github/someone/fork/blob/dev/labs/x.ipynb)"')
    url, branch = sync.repository()
    rewritten = sync.synced(fork, url, branch)
    assert "someone" not in rewritten and rewritten.count(f"{url}@{branch}") == 2
    # A lab's badge opens its student version; Otter's grading environment gets the
    # notebooks extra, everything a lab imports.
    assert f"colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/{branch}/exercises/x.ipynb" in rewritten
    assert f"  - tutorial-lib[notebooks] @ git+{url}@{branch}" in rewritten
    # The chapters' links to the library's source, and the library's own defaults.
    link = '"[`x.py`](https://github.com/someone/fork/blob/dev/tutorial_lib/x.py#L1-L2)"'
    assert sync.synced(link, url, branch) == link.replace("someone/fork/blob/dev",
                                                          f"{url.removeprefix('https://github.com/')}/blob/{branch}")
    library = 'REPOSITORY = "https://github.com/someone/fork"\nBRANCH = "dev"\n'
    assert sync.library_synced(library, url, branch) == f'REPOSITORY = "{url}"\nBRANCH = "{branch}"\n'
    assert sync.synced(rewritten, url, branch) == rewritten
