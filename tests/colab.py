"""A stand-in for a fresh Google Colab runtime, for the end-to-end notebook tests.

A Colab runtime has Python, torch and Jupyter's kernel machinery, and imports the module
``google.colab`` before the first cell runs. Everything else a notebook needs must come
from the notebook's own install cell, which pip-installs the book's package from its
GitHub repository. :func:`make_runtime` builds that situation in a new virtual
environment: torch (the version ``constraints.txt`` pins) and what executes a notebook,
nothing of the book, and a ``google.colab`` stand-in that the kernel imports at start-up.
:func:`run_notebook` then executes a notebook top to bottom in that environment's
kernel, with the hosted repository in the install cell replaced by a local git
repository, so the install runs exactly the cell's command against the commit under
test instead of the published branch.

The test files import this module (``tests/`` is on ``sys.path``). The preinstalled
packages are installed once and kept in a cache folder (:func:`preinstalled`), so a new
runtime takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# What a Colab runtime brings besides the standard library: torch, and the kernel and
# client that run a notebook (and what they need). Their versions come from constraints.txt.
PREINSTALLED = ("torch", "ipykernel", "nbclient")
# The install cell's requirement, any repository and ref: '... @ git+<url>@<ref>'.
GIT_REQUIREMENT = re.compile(r"git\+https://github\.com/[\w.\-]+/[\w.\-]+?(?:\.git)?@[\w.\-/]+")

# Executes one notebook with nbclient, in the interpreter that runs it, from the folder
# it is given; a failing cell ends it with that cell's traceback and exit status 1.
_EXECUTE = textwrap.dedent("""
    import sys
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path, workdir, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": workdir}})
    try:
        client.execute()
    except CellExecutionError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    finally:
        nbformat.write(notebook, path)
""")


class NotebookFailed(AssertionError):
    """A notebook that did not run top to bottom in the stand-in runtime."""


@dataclass
class Runtime:
    """A stand-in Colab runtime: a virtual environment and the start-up folder of its kernel."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def ipython_dir(self) -> Path:
        return self.root / "ipython"

    def env(self) -> dict[str, str]:
        """The environment of the kernel: this runtime's Python first, its start-up folder,
        and the book's shared data where the repository has it (a runtime with network
        access would download the files instead)."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("VIRTUAL_ENV", "PYTHONPATH", "JUPYTER", "IPYTHON"))}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["IPYTHONDIR"] = str(self.ipython_dir)
        env["JUPYTER_DATA_DIR"] = str(self.root / "jupyter")
        env["MPLBACKEND"] = "Agg"
        if SHARED_DATA.is_dir() and "TUTORIAL_LIB_DATA" not in env:
            env["TUTORIAL_LIB_DATA"] = str(SHARED_DATA)
        return env

    def pip(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """``python -m pip ARGS`` in the runtime; raises with pip's output if it fails."""
        result = subprocess.run([str(self.python), "-m", "pip", *args], env=self.env(), cwd=self.root,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def has(self, module: str) -> bool:
        """Whether ``module`` is importable in the runtime."""
        # From the runtime's own folder: 'python -c' puts the current folder on sys.path,
        # and the repository's root would make the book's package importable.
        return subprocess.run([str(self.python), "-c", f"import {module}"], env=self.env(),
                              cwd=self.root, capture_output=True).returncode == 0


def pinned(names: tuple[str, ...]) -> list[str]:
    """``name==version`` for each name, from constraints.txt."""
    versions = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            versions[name.strip().lower().replace("_", "-")] = version.strip()
    return [f"{name}=={versions[name]}" if name in versions else name for name in names]


def preinstalled(cache: Path) -> Path:
    """The folder of the packages a Colab runtime brings (:data:`PREINSTALLED` and what
    they need), built once per set of versions and Python and kept in ``cache``.

    On Colab they sit in the system's site-packages, outside anything a notebook
    installs; here they are one folder that every stand-in runtime puts on its path
    (a ``.pth`` file), so a fresh runtime costs no torch install, and deleting one
    leaves them alone. pip treats them as installed and, like Colab's, never removes
    them: a notebook needing other versions gets them in the runtime itself.
    """
    requirements = pinned(PREINSTALLED)
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    folder = cache / f"colab-preinstalled-{key}"
    if not folder.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=cache))
        # Not compiling torch's thousands of modules halves the time; Python compiles
        # what it imports.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                        "--target", str(staging), *requirements], check=True, capture_output=True)
        try:
            staging.rename(folder)
        except OSError:  # built meanwhile by another run
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def make_runtime(root: Path, cache: Path) -> Runtime:
    """A new virtual environment at ``root`` that looks like a fresh Colab runtime, with
    the preinstalled packages kept in ``cache``."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
    runtime = Runtime(root)
    purelib = Path(subprocess.run([str(runtime.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "colab-preinstalled.pth").write_text(f"{preinstalled(cache)}\n")
    # 'google' stays a namespace package (no google/__init__.py), as on Colab.
    colab = purelib / "google" / "colab"
    colab.mkdir(parents=True)
    (colab / "__init__.py").write_text('"""Stand-in for Colab\'s module: only its presence matters."""\n')
    startup = runtime.ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # Colab imports it before any cell\n")
    return runtime


def remove_later(path: Path) -> None:
    """Delete ``path`` in a process of its own that outlives the tests: removing a runtime's
    tens of thousands of files can take minutes on a slow disk, which no test needs to wait for."""
    if path.exists():
        trash = path.with_name(path.name + f".removing-{os.getpid()}")
        path.rename(trash)
        subprocess.Popen(["rm", "-rf", str(trash)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _installs(cell) -> bool:
    """Whether a code cell is an install cell: it asks for ``google.colab`` and runs pip."""
    return "google.colab" in cell.source and '"pip"' in cell.source


def install_requirement(notebook) -> str:
    """The requirement the notebook's install cell hands to pip (its first
    ``requirement = "..."`` line); :class:`ValueError` if there is none."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and _installs(cell):
            match = re.search(r'^\s*requirement = "([^"]+)"', cell.source, re.MULTILINE)
            if match:
                return match.group(1)
    raise ValueError("the notebook has no install cell with a 'requirement = \"...\"' line")


def with_local_repository(notebook, repository: str, ref: str):
    """A copy of ``notebook`` whose install cell installs from ``git+file://localhost<repository>@<ref>``
    instead of the hosted repository; nothing else changes."""
    copy = nbformat.from_dict(notebook)
    local = f"git+file://localhost{Path(repository).resolve()}@{ref}"
    install_requirement(copy)  # raises if the notebook cannot be installed on Colab
    for cell in copy.cells:
        if cell.cell_type == "code" and _installs(cell):
            cell.source = GIT_REQUIREMENT.sub(local, cell.source)
    return copy


def run_notebook(runtime: Runtime, notebook, workdir: Path, name: str = "notebook.ipynb",
                 timeout: int = 600) -> Path:
    """Execute ``notebook`` (a notebook node) top to bottom in the runtime's kernel, from
    ``workdir``; returns the executed copy's path. :class:`NotebookFailed` with the failing
    cell's traceback if a cell raises."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / name
    nbformat.write(notebook, path)
    result = subprocess.run([str(runtime.python), "-c", _EXECUTE, str(path), str(workdir), str(timeout)],
                            env=runtime.env(), cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise NotebookFailed(f"{name} failed in the Colab stand-in:\n{result.stderr[-6000:]}")
    return path
