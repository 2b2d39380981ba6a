"""Make every notebook name the repository and branch of ``_config.yml``.

``_config.yml`` (``repository.url`` and ``repository.branch``) is the one place that
says where the book lives. The notebooks cannot read it on Colab, before anything is
installed, so each repeats it: the install cell's requirement
(``tutorial-lib[notebooks] @ git+<url>@<branch>``), the labs' Otter configuration
(``tutorial-lib[notebooks] @ git+<url>@<branch>``: the grading environment needs what
the labs import) and the labs' Open-in-Colab badge, and the links to the library's source on GitHub that
``tutorial_lib.source.show`` prints in the chapters (and its defaults in
``tutorial_lib/source.py``, which a notebook on Colab has no other way to learn). A lab's badge opens its student
version, ``exercises/<lab>.ipynb`` (built by ``scripts/build_exercises.py``), in the
source lab as in the student copy. This script rewrites those copies from
``_config.yml``; ``--check`` only lists the notebooks that disagree (exit status 1),
which the test suite runs.

    python scripts/sync_repository_ref.py           # after changing _config.yml (a fork)
    python scripts/sync_repository_ref.py --check
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
GIT_REQUIREMENT = re.compile(r"git\+https://github\.com/[\w.\-]+/[\w.\-]+?(?:\.git)?@[\w.\-/]+?(?=[\"\s\\]|$)")
COLAB = re.compile(r"https://colab\.research\.google\.com/github/[\w.\-]+/[\w.\-]+/blob/[\w.\-]+/")
# A Colab link to a lab, the source's or the student version's.
LAB_IN_COLAB = re.compile(r"(https://colab\.research\.google\.com/github/[^)\s\"]*?/blob/[\w.\-]+/)"
                          r"(?:labs|exercises)/([\w.\-]+\.ipynb)")
# The lab's requirement in its Otter configuration, without the notebooks extra.
OTTER_REQUIREMENT = re.compile(r"(-\s+)tutorial-lib\s*@\s*git\+")
# A link to a file of the repository on GitHub (tutorial_lib.source.show's output).
SOURCE_LINK = re.compile(r"https://github\.com/[\w.\-]+/[\w.\-]+/blob/[\w.\-]+/"
                         r"(?=(?:tutorial_lib|benchmarks|configs)/)")
# tutorial_lib/source.py's defaults.
LIBRARY_DEFAULTS = re.compile(r'^(REPOSITORY|BRANCH) = "[^"]*"$', re.MULTILINE)
LIBRARY_SOURCE = REPO_ROOT / "tutorial_lib" / "source.py"
FOLDERS = ("chapters", "labs", "exercises")


def repository() -> tuple[str, str]:
    """``(url, branch)`` from ``_config.yml``."""
    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())["repository"]
    return config["url"].rstrip("/"), config["branch"]


def notebooks() -> list[Path]:
    return [path for folder in FOLDERS for path in sorted((REPO_ROOT / folder).glob("*.ipynb"))]


def library_synced(text: str, url: str, branch: str) -> str:
    """``tutorial_lib/source.py``'s text with its defaults set to ``url`` and ``branch``."""
    return LIBRARY_DEFAULTS.sub(
        lambda m: f'{m[1]} = "{url if m[1] == "REPOSITORY" else branch}"', text)


def synced(text: str, url: str, branch: str) -> str:
    """``text`` with every git requirement and Colab link pointing at ``url``@``branch``,
    every Colab link to a lab opening its student version, and every Otter requirement
    of the book's library asking for the notebooks extra."""
    owner_repo = url.removeprefix("https://github.com/")
    text = GIT_REQUIREMENT.sub(f"git+{url}@{branch}", text)
    text = SOURCE_LINK.sub(f"{url}/blob/{branch}/", text)
    text = OTTER_REQUIREMENT.sub(r"\1tutorial-lib[notebooks] @ git+", text)
    text = COLAB.sub(f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/", text)
    return LAB_IN_COLAB.sub(r"\1exercises/\2", text)


def mismatches(paths: list[Path] | None = None) -> list[str]:
    """The notebooks whose copies disagree with ``_config.yml`` (relative paths)."""
    url, branch = repository()
    wrong = [str(path.relative_to(REPO_ROOT)) for path in (paths or notebooks())
             if synced(path.read_text(), url, branch) != path.read_text()]
    if paths is None and library_synced(LIBRARY_SOURCE.read_text(), url, branch) != LIBRARY_SOURCE.read_text():
        wrong.append(str(LIBRARY_SOURCE.relative_to(REPO_ROOT)))
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="list disagreements, change nothing")
    args = parser.parse_args(argv)
    wrong = mismatches()
    if args.check:
        for path in wrong:
            print(f"{path}: disagrees with _config.yml (repository, branch) or a lab link or requirement is stale")
        return 1 if wrong else 0
    url, branch = repository()
    for path in wrong:
        full = REPO_ROOT / path
        fix = library_synced if full == LIBRARY_SOURCE else synced
        full.write_text(fix(full.read_text(), url, branch))
        print(f"{path}: now names {url}@{branch}, labs open in exercises/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
