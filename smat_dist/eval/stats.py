"""Accuracy summaries as the paper reports them."""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import numpy as np


def mean_ci95(values: Iterable[float]) -> Tuple[float, float, float, int]:
    """(mean, 95% CI half-width, sample std, n) of per-episode accuracies.

    Half-width = 1.96·s/√n with the *sample* std s (ddof=1), as SMAT's tester; Meta-Dataset uses the
    population std (a factor √(n/(n-1)), 1.0008 at n=600). NaN for the CI and std when n < 2.
    """
    a = np.asarray(list(values), dtype=np.float64)
    n = int(a.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(a.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    std = float(a.std(ddof=1))
    return mean, 1.96 * std / math.sqrt(n), std, n


__all__ = ["mean_ci95"]
