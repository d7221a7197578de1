"""Packages whose public names live in submodules imported on first use.

``import smat_dist.data`` (or ``.eval``, ``.smat``) must stay light: converter worker processes, the
launchers' preflight and config loading import them and need neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], Any], List[str]]:
    """``(__getattr__, __all__)`` for ``package``: name -> the submodule (relative) that defines it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__, sorted(exports)


__all__ = ["lazy_exports"]
