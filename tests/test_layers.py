"""The library's dependency rule, read from the source of every ``tutorial_lib`` module.

The folders of ``tutorial_lib`` are its layers (see the package docstring); a module
imports only its own layer and those above it:

* ``core``: only ``core``, and outside the package only ``torch``, ``numpy`` and the
  standard library;
* ``data``: ``core`` and ``data``;
* ``training``: ``core``, ``data`` and ``training``;
* ``techniques``: ``core`` and ``data``; another technique only where
  :data:`TECHNIQUE_IMPORTS` lists the pair;
* ``assembly`` (maps config options to techniques) and ``interop``: the layers above;
* ``studies``: anything; nothing outside ``studies`` imports ``tutorial_lib.studies``.

Imports are found with :mod:`ast`: ``import x`` and ``from x import y`` anywhere in a
file (inside functions too), relative imports resolved, ``from package import module``
counted as an import of the module, and ``importlib.import_module("...")`` /
``__import__("...")`` with a literal name. A name in a docstring or comment is not an
import. The package's own modules (``tutorial_lib/__init__.py``, ``train.py``) may
import anything but the studies.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest

import tutorial_lib

PACKAGE = "tutorial_lib"
PACKAGE_DIR = Path(tutorial_lib.__file__).resolve().parent

# (importing technique, imported technique): a technique that builds on another one.
TECHNIQUE_IMPORTS: frozenset[tuple[str, str]] = frozenset({
    ("sift", "adversarial"),  # SiFT is a perturbation at adversarial's embedding-sum site
})

# Top-level modules that are not a folder: their layer.
TOP_LEVEL = {"assembly": "assembly", "interop": "interop", "train": "package", "source": "package",
             "": "package"}
FOLDERS = ("core", "data", "training", "techniques", "studies")

# The tutorial_lib layers each layer may import (techniques: see TECHNIQUE_IMPORTS too).
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "training": {"core", "data", "training"},
    "techniques": {"core", "data", "techniques"},
    "assembly": {"core", "data", "training", "techniques", "assembly"},
    "interop": {"core", "data", "training", "techniques", "assembly", "interop"},
    "studies": {"core", "data", "training", "techniques", "assembly", "interop", "studies",
                "package"},
    "package": {"core", "data", "training", "techniques", "assembly", "interop", "package"},
}
# Outside the package, the core may import only these (and the standard library).
CORE_THIRD_PARTY = {"torch", "numpy"}


# -- the checker --------------------------------------------------------------------------

def module_names(package_dir: Path) -> dict[Path, str]:
    """Every ``.py`` file under ``package_dir`` and its dotted module name."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[path] = ".".join(parts)
    return names


def imported_modules(source: str, module: str, is_package: bool,
                     known: set[str]) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every module the source imports, in file order.

    ``known`` is the set of the package's modules: ``from a import b`` imports the
    module ``a.b`` when it is one, else (a name defined in ``a``) the module ``a``.
    """
    found = []
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(here):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the "
                                     f"top-level package")
                base = ".".join(here[:len(here) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else target))
        elif isinstance(node, ast.Call) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else \
                function.id if isinstance(function, ast.Name) else None
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def layer_of(module: str) -> str:
    """The layer of a ``tutorial_lib`` module: its folder, or ``TOP_LEVEL``'s entry."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    name = parts[1] if len(parts) > 1 else ""
    if name not in TOP_LEVEL:
        raise KeyError(f"{module} belongs to no layer: add it to TOP_LEVEL or FOLDERS in "
                       f"tests/test_layers.py")
    return TOP_LEVEL[name]


def technique_of(module: str) -> str | None:
    """``adversarial`` for ``tutorial_lib.techniques.adversarial[.anything]``; the
    package ``tutorial_lib.techniques`` itself is the technique ``""``."""
    parts = module.split(".")
    if parts[1:2] != ["techniques"]:
        return None
    return parts[2] if len(parts) > 2 else ""


def violations(package_dir: Path,
               technique_imports: frozenset[tuple[str, str]] = TECHNIQUE_IMPORTS) -> list[str]:
    """Every import under ``package_dir`` that breaks the dependency rule, one line each."""
    names = module_names(package_dir)
    known = set(names.values())
    package = package_dir.name
    found = []
    for path, module in names.items():
        layer = layer_of(module)
        where = f"{path.relative_to(package_dir.parent).as_posix()}"
        for line, target in imported_modules(path.read_text("utf-8"), module,
                                             path.name == "__init__.py", known):
            top = target.split(".")[0]
            if top != package:
                if layer == "core" and top not in CORE_THIRD_PARTY \
                        and top not in sys.stdlib_module_names:
                    found.append(f"{where}:{line}: {module} (core) imports {target} "
                                 f"(only torch, numpy and the standard library are allowed)")
                continue
            target_layer = layer_of(target)
            if target_layer == "studies" and layer != "studies":
                found.append(f"{where}:{line}: {module} ({layer}) imports {target}: only the "
                             f"studies import the studies")
            elif target_layer not in ALLOWED[layer]:
                found.append(f"{where}:{line}: {module} ({layer}) imports {target} "
                             f"({target_layer})")
            elif layer == "techniques" and target_layer == "techniques":
                pair = (technique_of(module), technique_of(target))
                if pair[0] != pair[1] and pair not in technique_imports:
                    found.append(f"{where}:{line}: {module} (technique {pair[0]!r}) imports "
                                 f"{target} (technique {pair[1]!r}), which TECHNIQUE_IMPORTS "
                                 f"does not allow")
    return found


# -- the real tree ----------------------------------------------------------------------

def test_the_library_keeps_its_dependency_rule():
    assert violations(PACKAGE_DIR) == []


def test_the_checker_sees_the_library_s_imports():
    """Guards the test above against passing because it found nothing."""
    names = module_names(PACKAGE_DIR)
    known = set(names.values())
    edges = set()
    for path, module in names.items():
        for _, target in imported_modules(path.read_text("utf-8"), module,
                                          path.name == "__init__.py", known):
            edges.add((module, target))
    assert ("tutorial_lib.core.model", "tutorial_lib.core.attention") in edges
    assert ("tutorial_lib.assembly", "tutorial_lib.techniques.deberta") in edges  # from-import
    assert ("tutorial_lib.interop", "tutorial_lib.data.tokenization") in edges  # in a function
    assert ("tutorial_lib", "tutorial_lib.assembly") in edges
    assert {layer_of(module) for module in known} == set(FOLDERS) | {"assembly", "interop",
                                                                     "package"}


# -- the checker catches violations -----------------------------------------------------

SYNTHETIC = {
    "__init__.py": "",
    "core/__init__.py": '"""Nothing here imports tutorial_lib.techniques."""\n',
    "core/model.py": """
        '''Mentions tutorial_lib.training and tutorial_lib.studies in prose only.'''
        import torch
        import numpy as np
        from . import attention
        from .attention import Thing
        from ..techniques import deberta

        def later():
            import tutorial_lib.training.loop
        """,
    "core/attention.py": """
        import math
        import requests
        from tutorial_lib import assembly
        Thing = 1
        """,
    "core/positions.py": """
        from tutorial_lib import PRESETS
        """,
    "data/__init__.py": "",
    "data/batching.py": """
        from ..core.model import IGNORE_INDEX
        from tutorial_lib.training.loop import train
        """,
    "training/__init__.py": "",
    "training/loop.py": """
        from tutorial_lib.data import batching
        from tutorial_lib.techniques.adversarial import FGM
        """,
    "techniques/__init__.py": "",
    "techniques/adversarial.py": """
        from tutorial_lib.core import model
        from .deberta import Table
        """,
    "techniques/deberta.py": """
        from tutorial_lib.data.batching import model_inputs
        Table = 1
        """,
    "assembly.py": """
        from tutorial_lib.techniques import deberta
        from tutorial_lib.studies import harness
        """,
    "interop.py": """
        import importlib
        studies = importlib.import_module("tutorial_lib.studies.harness")
        """,
    "studies/__init__.py": "",
    "studies/harness.py": """
        from tutorial_lib import assembly, interop
        from . import harness
        """,
}


def synthetic_tree(root: Path) -> Path:
    package = root / PACKAGE
    for name, source in SYNTHETIC.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return package


def test_the_checker_reports_every_kind_of_violation(tmp_path):
    package = synthetic_tree(tmp_path)
    found = violations(package)
    pairs = sorted((line.split(":")[0], line.split(" imports ")[1].split(" ")[0].rstrip(":"))
                   for line in found)
    assert pairs == sorted([
        ("tutorial_lib/core/model.py", "tutorial_lib.techniques.deberta"),  # relative
        ("tutorial_lib/core/model.py", "tutorial_lib.training.loop"),  # inside a function
        ("tutorial_lib/core/attention.py", "requests"),  # third party in the core
        ("tutorial_lib/core/attention.py", "tutorial_lib.assembly"),  # from package import module
        ("tutorial_lib/core/positions.py", "tutorial_lib"),  # the package itself
        ("tutorial_lib/data/batching.py", "tutorial_lib.training.loop"),
        ("tutorial_lib/training/loop.py", "tutorial_lib.techniques.adversarial"),
        ("tutorial_lib/techniques/adversarial.py", "tutorial_lib.techniques.deberta"),
        ("tutorial_lib/assembly.py", "tutorial_lib.studies.harness"),
        ("tutorial_lib/interop.py", "tutorial_lib.studies.harness"),  # import_module
    ]), "\n".join(found)
    assert any("core/model.py:7:" in line for line in found)  # line numbers are reported
    # An allowed pair of techniques is no longer reported.
    allowed = violations(package, frozenset({("adversarial", "deberta")}))
    assert set(found) - set(allowed) == {line for line in found
                                         if "techniques/adversarial.py" in line}


def test_a_module_outside_the_layers_is_reported(tmp_path):
    package = synthetic_tree(tmp_path)
    (package / "helpers.py").write_text("")
    with pytest.raises(KeyError, match="tutorial_lib.helpers belongs to no layer"):
        violations(package)
