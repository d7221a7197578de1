"""The package's floors hold: lower packages do not import the training wing.

The run record (:mod:`smat_dist.record`) sits below training, monitoring, evaluation and sweeps, so the
math (``smat``), the data plane, evaluation and monitoring never need ``smat_dist.train``. Parsed with
``ast`` (nothing is imported), so a function-local import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "smat_dist"
BELOW_TRAINING = ("smat", "data", "eval", "monitoring")


def imported_modules(tree: ast.AST, path: Path) -> Iterator[Tuple[ast.stmt, str]]:
    """(import statement, absolute module name) for every import in ``tree`` (relative ones resolved)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield node, ".".join(base + ((node.module,) if node.module else ()))
            else:
                yield node, node.module or ""


def test_lower_packages_do_not_import_training():
    upward: List[str] = []
    for sub in BELOW_TRAINING:
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node, module in imported_modules(tree, path):
                if module == "smat_dist.train" or module.startswith("smat_dist.train."):
                    upward.append(f"{path.relative_to(REPO)}:{node.lineno} imports {module}")
                elif isinstance(node, ast.ImportFrom) and module == "smat_dist" and any(
                        a.name == "train" for a in node.names):
                    upward.append(f"{path.relative_to(REPO)}:{node.lineno} imports smat_dist.train")
    assert not upward, "upward imports:\n" + "\n".join(upward)


MAX_LOCAL_IMPORTS = 40


def local_package_imports() -> List[str]:
    """``file:line`` of every import of ``smat_dist`` inside a function (each statement once)."""
    found: List[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
        seen = set()
        for node, module in imported_modules(tree, path):
            if id(node) in inside and id(node) not in seen and module.split(".")[0] == "smat_dist":
                seen.add(id(node))
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_function_local_imports_of_the_package_stay_few():
    """Our own modules are imported at the top, so the dependency graph is visible; a function-local import
    is kept only where a cycle or a heavy import (torch, Ray, DeepSpeed on a fast path) forces it, with a
    comment saying which."""
    found = local_package_imports()
    assert len(found) <= MAX_LOCAL_IMPORTS, f"{len(found)} function-local imports of smat_dist:\n" + "\n".join(found)


def test_the_measures_see_what_they_count():
    """The two checks above find a planted upward import and a planted local import."""
    path = PACKAGE / "eval" / "_planted_for_test.py"
    src = "import os\n\n\ndef f():\n    from smat_dist.train import recipe\n    from . import config\n    return recipe, config\n"
    tree = ast.parse(src)
    mods = [m for _, m in imported_modules(tree, path)]
    assert mods == ["os", "smat_dist.train", "smat_dist.eval"]
