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
