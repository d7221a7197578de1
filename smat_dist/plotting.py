"""Figures without a display: the one home of matplotlib's headless set-up and of writing a figure.

matplotlib is imported on first use: it is slow to import and only the reports draw (``smat-eval
analyse``, the sweep report, ``tools/study.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` and free it (pyplot keeps every open figure alive otherwise)."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


__all__ = ["pyplot", "save"]
