"""The library's own source, as the chapters show it: highlighted, with a link to the file.

``source(obj)`` returns a :class:`Source` of a function, class or method defined in
``tutorial_lib``; ``show(obj)`` displays it. A notebook renders it as Markdown: the name,
a link to its lines on GitHub, then the code in a fenced ``python`` block (highlighted by
Jupyter, Colab and the book alike); without a notebook it prints as plain text under a
``# path, lines a-b`` header.

The links name :data:`REPOSITORY` at :data:`BRANCH`, which ``_config.yml`` sets for the
whole book (``python scripts/sync_repository_ref.py`` rewrites them here and in the
notebooks' outputs after a fork, and its ``--check`` fails while they disagree).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = "https://github.com/beyond-bert/beyond-bert"
BRANCH = "main"

_PACKAGE = Path(__file__).resolve().parent
# Folders of the package that are links to folders at the repository's root (package data).
_LINKED = ("benchmarks", "configs")


@dataclass(frozen=True)
class Source:
    """The source of one object: where it lives and its code."""

    name: str  # the qualified name, e.g. "ASA.loss"
    path: str  # relative to the repository root, e.g. "tutorial_lib/techniques/asa.py"
    first_line: int
    last_line: int
    code: str
    url: str  # the lines on GitHub

    def _repr_markdown_(self) -> str:
        # A fence longer than any run of backticks in the code cannot be closed by it.
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", self.code)),
                                     default=0))
        return (f"`{self.name}` in [`{self.path}`, lines {self.first_line}–{self.last_line}]"
                f"({self.url})\n\n"
                f"{fence}python\n{self.code}\n{fence}\n")

    def __str__(self) -> str:
        return f"# {self.path}, lines {self.first_line}-{self.last_line}\n{self.code}"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def repository_path(file: str | Path) -> str:
    """The path, relative to the repository root, of a source file of the package."""
    file = Path(file)
    for package in (Path(__file__).absolute().parent, _PACKAGE):
        try:
            relative = Path(file).absolute().relative_to(package)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] in _LINKED:
            return relative.as_posix()
        return (Path(_PACKAGE.name) / relative).as_posix()
    # In a repository checkout, a linked folder's files resolve to the repository root.
    resolved = file.resolve()
    for linked in _LINKED:
        if resolved.is_relative_to((_PACKAGE / linked).resolve()):
            return (Path(linked) / resolved.relative_to((_PACKAGE / linked).resolve())).as_posix()
    raise ValueError(f"file must be a source file of tutorial_lib, got {file} "
                     f"(outside {_PACKAGE})")


def source(obj, *, repository: str = REPOSITORY, branch: str = BRANCH) -> Source:
    """The source of ``obj``, a function, class or method of ``tutorial_lib``.

    Decorated functions are shown as written (``inspect.unwrap``); a bound method or a
    property shows its function; a method's code is dedented to the margin.
    """
    if isinstance(obj, property):
        obj = obj.fget
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
        raise TypeError(f"obj must be a function, class or method of tutorial_lib, "
                        f"got {type(obj).__name__}")
    module = getattr(obj, "__module__", "") or ""
    if module.split(".")[0] != "tutorial_lib":
        raise ValueError(f"obj must be defined in tutorial_lib, got {obj!r} from "
                         f"module {module or '?'}")
    path = repository_path(inspect.getsourcefile(obj))
    lines, first = inspect.getsourcelines(obj)
    code = textwrap.dedent("".join(lines)).rstrip("\n")  # a method: as if at the margin
    last = first + len(lines) - 1
    url = f"{repository.rstrip('/')}/blob/{branch}/{path}#L{first}-L{last}"
    return Source(name=obj.__qualname__, path=path, first_line=first, last_line=last,
                  code=code, url=url)


def show(obj, *, repository: str = REPOSITORY, branch: str = BRANCH) -> None:
    """Display :func:`source` of ``obj`` (in a notebook, as highlighted code with its link)."""
    shown = source(obj, repository=repository, branch=branch)
    try:
        from IPython.display import display
    except ImportError:  # no IPython: plain text
        print(shown)
    else:
        display(shown)
