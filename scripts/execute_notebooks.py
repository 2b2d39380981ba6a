"""Re-execute the book's notebooks in place, each in a fresh kernel.

The book is built from committed outputs (``execute_notebooks: "off"`` in
``_config.yml``), so after changing a chapter, a lab or the library, run this
script and commit the refreshed notebooks.

    python scripts/execute_notebooks.py                      # every notebook
    python scripts/execute_notebooks.py chapters/03_deberta.ipynb labs/03_deberta.ipynb

Each notebook runs with the ``python3`` kernel and its own folder as the working
directory, exactly as a reader who opens it in Jupyter would run it. The wall
time of every notebook is printed; the script exits non-zero if any notebook
raised, and leaves such a notebook unchanged on disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_FOLDERS = ("chapters", "labs")


def all_notebooks() -> list[Path]:
    """Every committed notebook of the book, chapters first, in file-name order."""
    found = []
    for folder in NOTEBOOK_FOLDERS:
        found += sorted(
            path
            for path in (REPO_ROOT / folder).glob("*.ipynb")
            if ".ipynb_checkpoints" not in path.parts
        )
    return found


def execute(path: Path, timeout: int, kernel_name: str) -> float:
    """Run ``path`` top to bottom in a fresh kernel, write it back, return seconds."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,  # per cell
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
        allow_errors=False,
        record_timing=False,  # keep cell metadata free of timestamps
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks",
        nargs="*",
        type=Path,
        help="notebooks to run (default: every .ipynb in chapters/ and labs/)",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=1800,
        help="seconds one cell may run before the notebook is abandoned (default 1800)",
    )
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    args = parser.parse_args(argv)

    paths = [path.resolve() for path in args.notebooks] or all_notebooks()
    if not paths:
        print("no notebooks in chapters/ or labs/: nothing to run")
        return 0
    missing = [path for path in paths if not path.is_file()]
    if missing:
        for path in missing:
            print(f"no such notebook: {path}", file=sys.stderr)
        return 1

    failed = []
    total = 0.0
    for path in paths:
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        print(f"{shown} ...", end=" ", flush=True)
        start = time.perf_counter()
        try:
            seconds = execute(path, args.timeout, args.kernel)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
            seconds = time.perf_counter() - start
            print(f"FAILED after {seconds:.1f} s", flush=True)
            print(error, file=sys.stderr)
            failed.append(shown)
        else:
            print(f"{seconds:.1f} s", flush=True)
        total += seconds

    print(f"{len(paths)} notebook(s) in {total:.1f} s")
    if failed:
        print("failed: " + ", ".join(map(str, failed)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
