"""Accuracy summaries as the paper reports them, and the paired statistics that compare two methods.

Comparisons are paired: two models scored on the *same* frozen episodes differ far less than their own
CIs suggest, because most of an episode's difficulty is shared. That only holds on identical episode
lists, so every paired function checks the lists' sha256 first (:class:`EpisodeMismatch`).

Two kinds of interval for a difference averaged over sources:

* :func:`episode_interval` counts episode sampling only (seeds averaged per episode first): right for
  "these two trained models differ on this benchmark", too narrow for "the *method* is better";
* :func:`two_level_interval` also counts training randomness (seeds × episodes, a crossed
  random-effects model): what a claim about a method needs. :func:`seed_t_interval` is the plain
  t interval on per-seed means, which drops the episode part (the episodes are shared by every seed).

:func:`equivalence` decides "equal" claims (TOST: equal within ±δ when the 90 % interval lies inside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np



@dataclass
class EpisodeScores:
    """One evaluation's per-episode accuracies (one mode) with the sha256 of each source's frozen episode
    list (read by :func:`smat_dist.eval.report.read_episode_scores`)."""

    path: Path  # the results.csv they were read with
    method: str  # the column label, e.g. SMAT or SMAT+full
    acc: Dict[str, Dict[int, float]]  # source -> episode index -> accuracy (%)
    sha: Dict[str, str]  # source -> episodes_sha256
    kind: Dict[str, str]  # source -> ID | OOD
    split: Dict[str, str]  # source -> split


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


class EpisodeMismatch(ValueError):
    """Two evaluations compared episode by episode were not scored on the same episode lists."""


@dataclass(frozen=True)
class Interval:
    """A difference (points) and its two-sided interval ``mean ± half`` at ``level``."""

    mean: float
    half: float
    level: float
    kind: str  # episodes | seeds | seeds×episodes
    seeds: int
    df: float = math.inf  # degrees of freedom of the t quantile (inf: normal)

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def __str__(self) -> str:
        return f"{self.mean:+.2f} ± {self.half:.2f}"


def _quantile(level: float, df: float) -> float:
    """Two-sided quantile; 1.96 at 95 % with df = inf, as :func:`mean_ci95`."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if math.isinf(df):
        if level == 0.95:
            return 1.96
        from scipy.stats import norm

        return float(norm.ppf(0.5 + level / 2))
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


# ----------------------------------------------------------------------------------------------- pairing
def check_same_episodes(a: EpisodeScores, b: EpisodeScores, sources: Sequence[str]) -> None:
    """Refuse to pair ``a`` and ``b`` on a source unless both were scored on the same frozen episode list
    (same sha256, same split, same episode indices); the message names the source and both files."""
    for s in sources:
        for x in (a, b):
            if s not in x.acc:
                raise EpisodeMismatch(f"{x.path}: no results for source {s!r}")
        if not a.sha.get(s) or not b.sha.get(s):
            raise EpisodeMismatch(f"source {s!r}: an episode-list hash is missing ({a.path}, {b.path}); "
                                  f"cannot check that they scored the same episodes")
        if a.sha[s] != b.sha[s] or a.split.get(s) != b.split.get(s):
            raise EpisodeMismatch(f"source {s!r}: different episode lists ({a.path}: {a.split.get(s)} "
                                  f"{a.sha[s][:12]}, {b.path}: {b.split.get(s)} {b.sha[s][:12]}); paired "
                                  f"differences need the same frozen episodes")
        if set(a.acc[s]) != set(b.acc[s]):
            raise EpisodeMismatch(f"source {s!r}: the same list hash but different episode indices in "
                                  f"{a.path} and {b.path}")


def paired_differences(a: Sequence[EpisodeScores], b: Sequence[EpisodeScores],
                       sources: Sequence[str]) -> Dict[str, np.ndarray]:
    """source -> (S, E) array of per-episode differences a − b (points), row s = seed s of both.

    ``a[s]`` and ``b[s]`` are the evaluations of seed s of the two methods (pair the seeds that share a
    training stream; a single evaluation each gives S = 1). Every evaluation of both sides must be on the
    same episode lists (:func:`check_same_episodes`); columns follow the episode index.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired seeds: {len(a)} evaluations against {len(b)}; give one per seed on each side")
    if not sources:
        raise ValueError("no sources to compare")
    for x in list(a[1:]) + list(b):
        check_same_episodes(a[0], x, sources)
    out = {}
    for s in sources:
        idx = sorted(a[0].acc[s])
        out[s] = np.array([[x.acc[s][i] - y.acc[s][i] for i in idx] for x, y in zip(a, b)], dtype=np.float64)
    return out


def _matrices(diffs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {}
    for s, d in diffs.items():
        d = np.asarray(d, dtype=np.float64)
        out[s] = d[None, :] if d.ndim == 1 else d
        if out[s].ndim != 2 or out[s].shape[1] < 2:
            raise ValueError(f"source {s!r}: need an (S, E) array with E >= 2 episodes, got shape {d.shape}")
    if len({d.shape[0] for d in out.values()}) != 1:
        raise ValueError("every source needs the same seeds")
    return out


# ----------------------------------------------------------------------------------------------- intervals
def episode_interval(diffs: Mapping[str, np.ndarray], level: float = 0.95) -> Interval:
    """Mean over sources of the per-source mean difference, with the episode-sampling interval: seeds
    averaged per episode, then z·sqrt(Σ_s sd_s²/n_s)/k over the k sources (independent episodes per source).
    Training randomness is not in it (see :func:`two_level_interval`)."""
    d = _matrices(diffs)
    k = len(d)
    means = [float(x.mean()) for x in d.values()]
    var = sum(float(x.mean(0).var(ddof=1)) / x.shape[1] for x in d.values()) / k ** 2
    return Interval(sum(means) / k, _quantile(level, math.inf) * math.sqrt(var), level, "episodes",
                    next(iter(d.values())).shape[0])


def t_interval(values: Iterable[float], level: float = 0.95, kind: str = "seeds") -> Interval:
    """Mean ± t half-width (n − 1 df) of per-seed values: a seed-level quantity such as a run's α statistics."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size < 2:
        raise ValueError("a t interval needs at least 2 values")
    df = a.size - 1
    return Interval(float(a.mean()), _quantile(level, df) * float(a.std(ddof=1)) / math.sqrt(a.size), level, kind,
                    int(a.size), df)


def seed_t_interval(diffs: Mapping[str, np.ndarray], level: float = 0.95) -> Interval:
    """t interval (S − 1 df) on the S per-seed differences (each averaged over episodes and sources).
    It holds the seeds' spread but not the sampling of the episodes, which every seed shares."""
    d = _matrices(diffs)
    per_seed = np.mean([x.mean(1) for x in d.values()], axis=0)  # (S,)
    if per_seed.size < 2:
        raise ValueError("a seed-level interval needs at least 2 seeds")
    return t_interval(per_seed, level)


def variance_components(d: np.ndarray) -> Dict[str, float]:
    """Method-of-moments variance components of an (S, E) table under d_se = μ + a_s + b_e + ε_se
    (seed effect a, episode effect b shared by the seeds, residual ε): mean squares and estimates."""
    S, E = d.shape
    g = d.mean()
    seed_m, ep_m = d.mean(1), d.mean(0)
    ms_seed = E * float(((seed_m - g) ** 2).sum()) / (S - 1) if S > 1 else math.nan
    ms_ep = S * float(((ep_m - g) ** 2).sum()) / (E - 1)
    resid = d - seed_m[:, None] - ep_m[None, :] + g
    ms_res = float((resid ** 2).sum()) / ((S - 1) * (E - 1)) if S > 1 else math.nan
    return dict(ms_seed=ms_seed, ms_episode=ms_ep, ms_residual=ms_res,
                seed=max(0.0, (ms_seed - ms_res) / E) if S > 1 else math.nan,
                episode=max(0.0, (ms_ep - ms_res) / S) if S > 1 else math.nan,
                residual=ms_res)


def two_level_interval(diffs: Mapping[str, np.ndarray], level: float = 0.95) -> Interval:
    """Mean over sources of the mean difference, with an interval that holds training randomness (seeds)
    and episode sampling.

    Per source, d_se = μ + a_s + b_e + ε_se (crossed: every seed is scored on the same episodes), so
    Var(mean) = σ_a²/S + σ_b²/E + σ_ε²/(SE). The seed part, σ_a²/S + σ_ε²/(SE), is estimated by the spread
    of the per-seed means (averaged over sources, so a seed that is better everywhere counts once); the
    episode part by (MS_episode − MS_residual)/(S·E) per source (independent episodes across sources,
    floored at 0). The t quantile's degrees of freedom come from Welch–Satterthwaite: ≈ S − 1 when the
    seed part dominates, large when episodes do. Needs S ≥ 2.
    """
    d = _matrices(diffs)
    k = len(d)
    S = next(iter(d.values())).shape[0]
    if S < 2:
        raise ValueError("a two-level interval needs at least 2 seeds (with one, use episode_interval)")
    per_seed = np.mean([x.mean(1) for x in d.values()], axis=0)
    v_seed = float(per_seed.var(ddof=1)) / S
    v_ep = sum(variance_components(x)["episode"] / x.shape[1] for x in d.values()) / k ** 2
    df_ep = sum(x.shape[1] - 1 for x in d.values())
    var = v_seed + v_ep
    if var == 0.0:
        return Interval(float(per_seed.mean()), 0.0, level, "seeds×episodes", S, math.inf)
    df = var ** 2 / (v_seed ** 2 / (S - 1) + v_ep ** 2 / df_ep)
    return Interval(float(per_seed.mean()), _quantile(level, df) * math.sqrt(var), level, "seeds×episodes", S, df)


def difference_interval(diffs: Mapping[str, np.ndarray], level: float = 0.95) -> Interval:
    """:func:`two_level_interval` when there are ≥ 2 seeds, else :func:`episode_interval` (its ``kind``
    says which, so a table can say what its ± covers)."""
    d = _matrices(diffs)
    return two_level_interval(d, level) if next(iter(d.values())).shape[0] > 1 else episode_interval(d, level)


# ----------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Equivalence:
    """TOST at ``margin``: ``verdict`` is "equivalent" (the 90 % interval lies inside ±margin), "different"
    (the 95 % interval excludes 0) or "unresolved" (neither); both can hold for a tiny, resolved effect,
    then "equivalent" wins as the claim it supports is "equal within ±margin"."""

    verdict: str
    margin: float
    ci90: Interval
    ci95: Interval

    def __str__(self) -> str:
        return f"{self.verdict} (±{self.margin:g}; 90 % {self.ci90.lo:+.2f}…{self.ci90.hi:+.2f})"


def equivalence(diffs: Mapping[str, np.ndarray], margin: float) -> Equivalence:
    """Is the difference within ±``margin`` points? Two one-sided tests at 5 % each = the 90 % interval
    (:func:`difference_interval`: two-level with ≥ 2 seeds) inside (−margin, +margin)."""
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be > 0 points, got {margin}")
    ci90, ci95 = difference_interval(diffs, 0.90), difference_interval(diffs, 0.95)
    if -margin < ci90.lo and ci90.hi < margin:
        verdict = "equivalent"
    elif ci95.excludes_zero():
        verdict = "different"
    else:
        verdict = "unresolved"
    return Equivalence(verdict, margin, ci90, ci95)


def compare_sources(a: Sequence[EpisodeScores], b: Sequence[EpisodeScores], sources: Sequence[str], *,
                    level: float = 0.95, margin: Optional[float] = None) -> Tuple[Interval, Optional[Equivalence]]:
    """The paired difference a − b averaged over ``sources`` (seeds paired by position), its interval
    (two-level with ≥ 2 seeds) and, with ``margin``, the equivalence verdict; refuses mismatched lists."""
    d = paired_differences(a, b, sources)
    return difference_interval(d, level), (equivalence(d, margin) if margin is not None else None)


__all__ = ["EpisodeMismatch", "EpisodeScores", "Equivalence", "Interval", "check_same_episodes", "compare_sources",
           "difference_interval", "episode_interval", "equivalence", "mean_ci95", "paired_differences",
           "seed_t_interval", "t_interval", "two_level_interval", "variance_components"]
