"""Paired comparisons: episode-list checks, intervals with and without training randomness (coverage on
synthetic seeds × episodes data with known variance components), equivalence, and `smat-eval --compare
--paired`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from smat_dist.eval.report import ReportError, ResultRow, paired_table, read_episode_scores, write_episodes, write_results
from smat_dist.eval.stats import (EpisodeMismatch, EpisodeScores, difference_interval, episode_interval, equivalence,
                                  paired_differences, seed_t_interval, two_level_interval, variance_components)


def _scores(acc, *, sha="s1", split="test", path="x/results.csv", kind="ID"):
    return EpisodeScores(path=Path(path), method="M", acc={s: dict(v) for s, v in acc.items()},
                         sha={s: sha for s in acc}, kind={s: kind for s in acc}, split={s: split for s in acc})


# ----------------------------------------------------------------------------------------------- pairing
def test_pairing_aligns_by_episode_index_and_seed():
    a0 = _scores({"x": {2: 50.0, 0: 70.0, 1: 60.0}})
    a1 = _scores({"x": {0: 72.0, 1: 61.0, 2: 55.0}})
    b0 = _scores({"x": {0: 60.0, 1: 60.0, 2: 40.0}})
    b1 = _scores({"x": {1: 60.0, 0: 70.0, 2: 50.0}})
    d = paired_differences([a0, a1], [b0, b1], ["x"])
    np.testing.assert_array_equal(d["x"], [[10.0, 0.0, 10.0], [2.0, 1.0, 5.0]])


@pytest.mark.parametrize("change,match", [
    (dict(sha="s2"), "different episode lists"),
    (dict(split="valid"), "different episode lists"),
    (dict(sha=""), "hash is missing"),
])
def test_pairing_refuses_different_episode_lists(change, match):
    a = _scores({"x": {0: 1.0, 1: 2.0}}, path="a/results.csv")
    b = _scores({"x": {0: 1.0, 1: 2.0}}, path="b/results.csv", **change)
    with pytest.raises(EpisodeMismatch, match=match) as e:
        paired_differences([a], [b], ["x"])
    assert "'x'" in str(e.value)


def test_pairing_refuses_missing_sources_indices_and_unequal_seeds():
    a = _scores({"x": {0: 1.0, 1: 2.0}})
    with pytest.raises(EpisodeMismatch, match="no results for source 'y'"):
        paired_differences([a], [a], ["x", "y"])
    with pytest.raises(EpisodeMismatch, match="different episode indices"):
        paired_differences([a], [_scores({"x": {0: 1.0, 2: 2.0}})], ["x"])
    with pytest.raises(ValueError, match="one per seed"):
        paired_differences([a, a], [a], ["x"])
    # every seed of both sides is checked, not only the first pair
    with pytest.raises(EpisodeMismatch):
        paired_differences([a, _scores({"x": {0: 1.0, 1: 2.0}}, sha="other")], [a, a], ["x"])


# ----------------------------------------------------------------------------------------------- intervals
def test_episode_interval_is_the_studys_earlier_statistic():
    """Seeds averaged per episode, then 1.96·sqrt(Σ_s sd_s²/n_s)/k (what tools/study.py computed before)."""
    rng = np.random.default_rng(0)
    d = {"x": rng.normal(1, 3, (3, 40)), "y": rng.normal(0, 2, (3, 25))}
    iv = episode_interval(d)
    means = [v.mean() for v in d.values()]
    cis = [1.96 * v.mean(0).std(ddof=1) / math.sqrt(v.shape[1]) for v in d.values()]
    assert iv.mean == pytest.approx(sum(means) / 2, rel=1e-12)
    assert iv.half == pytest.approx(math.sqrt(sum(c * c for c in cis)) / 2, rel=1e-12)
    assert iv.kind == "episodes" and iv.seeds == 3


def test_variance_components_recover_known_values():
    rng = np.random.default_rng(1)
    S, E = 400, 400
    d = 0.3 + rng.normal(0, 1.0, (S, 1)) + rng.normal(0, 2.0, (1, E)) + rng.normal(0, 3.0, (S, E))
    vc = variance_components(d)
    assert vc["seed"] == pytest.approx(1.0, rel=0.2)
    assert vc["episode"] == pytest.approx(4.0, rel=0.2)
    assert vc["residual"] == pytest.approx(9.0, rel=0.02)


def _simulate(rng, *, S, E, k, mu, sd_seed, sd_ep, sd_res):
    """k sources; a seed effect shared by the sources (a seed that trains a better model is better on every
    source), episode effects shared by the seeds (the frozen lists), residual noise."""
    seed = rng.normal(0, sd_seed, (S, 1))
    return {f"s{j}": mu + seed + rng.normal(0, sd_ep, (1, E)) + rng.normal(0, sd_res, (S, E)) for j in range(k)}


def _coverage(fn, *, sd_seed, sd_ep=2.0, sd_res=3.0, S=5, E=100, k=3, reps=400, seed=0):
    rng = np.random.default_rng(seed)
    hits, halves = 0, []
    for _ in range(reps):
        iv = fn(_simulate(rng, S=S, E=E, k=k, mu=1.0, sd_seed=sd_seed, sd_ep=sd_ep, sd_res=sd_res))
        hits += iv.lo <= 1.0 <= iv.hi
        halves.append(iv.half)
    return hits / reps, float(np.mean(halves))


@pytest.mark.parametrize("sd_seed", [0.0, 0.5, 1.5])
def test_two_level_interval_covers_at_the_nominal_rate(sd_seed):
    # 400 replicates: binomial sd of the coverage ≈ 0.011 at 0.95
    cov, _ = _coverage(two_level_interval, sd_seed=sd_seed)
    assert 0.92 <= cov <= 0.985, cov


def test_two_level_interval_widens_with_seed_variance_and_the_episode_interval_does_not():
    two = [_coverage(two_level_interval, sd_seed=s, reps=100)[1] for s in (0.0, 0.5, 1.5)]
    assert two[0] < two[1] < two[2]
    cov_ep, half_ep = _coverage(episode_interval, sd_seed=1.5, reps=200)
    assert cov_ep < 0.6  # the earlier statistic: blind to training randomness
    assert half_ep < two[2] / 3


def test_seed_t_interval_misses_the_shared_episode_sampling():
    """With no seed effect but episode effects shared by every seed, the per-seed means agree with each
    other, so the plain seed-level t interval is too narrow; the two-level one is not."""
    cov_t, _ = _coverage(seed_t_interval, sd_seed=0.0, sd_ep=4.0, sd_res=1.0, reps=200)
    cov_two, _ = _coverage(two_level_interval, sd_seed=0.0, sd_ep=4.0, sd_res=1.0, reps=200)
    assert cov_t < 0.7 < 0.92 <= cov_two


def test_intervals_need_seeds_and_difference_interval_falls_back_to_episodes():
    d = {"x": np.arange(10.0)}
    with pytest.raises(ValueError, match="at least 2 seeds"):
        two_level_interval(d)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_t_interval(d)
    assert difference_interval(d).kind == "episodes"
    assert difference_interval({"x": np.ones((2, 10))}).kind == "seeds×episodes"
    t2 = seed_t_interval({"x": np.array([[1.0] * 4, [3.0] * 4])})
    # two seeds at 1 and 3: mean 2, sd √2, t(0.975, 1 df) = 12.706
    assert (t2.mean, t2.df) == (2.0, 1) and t2.half == pytest.approx(12.7062 * math.sqrt(2) / math.sqrt(2), rel=1e-4)


def test_equivalence_verdicts():
    rng = np.random.default_rng(3)
    tight = {"x": 0.05 + rng.normal(0, 0.5, (5, 200))}
    assert equivalence(tight, 0.5).verdict == "equivalent"
    far = {"x": 3.0 + rng.normal(0, 0.5, (5, 200))}
    assert equivalence(far, 0.5).verdict == "different"
    noisy = {"x": 0.1 + rng.normal(0, 1.0, (3, 1)) + rng.normal(0, 5.0, (3, 100))}
    eq = equivalence(noisy, 0.5)
    assert eq.verdict == "unresolved" and eq.ci90.half < eq.ci95.half and eq.ci90.level == 0.90
    with pytest.raises(ValueError, match="margin"):
        equivalence(tight, 0.0)


# ----------------------------------------------------------------------------------------------- files, CLI
def _write_eval(directory: Path, method: str, accs: dict, *, sha="abc"):
    directory.mkdir(parents=True)
    rows, eps = [], []
    for src, (kind, vals) in accs.items():
        rows.append(ResultRow(src, kind, "test", method, "none", float(np.mean(vals)), 1.0, 1.0, len(vals), sha, 0,
                              "", "off", "ckpt"))
        eps += [[src, kind, "test", i, 5, 10, 20, method, v] for i, v in enumerate(vals)]
    write_results(rows, directory / "results.csv")
    write_episodes(eps, directory / "episodes.csv")
    return directory / "results.csv"


def test_read_episode_scores_and_its_errors(tmp_path):
    p = _write_eval(tmp_path / "a", "PMF", {"x": ("ID", [50.0, 60.0]), "y": ("OOD", [10.0, 20.0, 30.0])})
    s = read_episode_scores(tmp_path / "a")
    assert s.acc == {"x": {0: 50.0, 1: 60.0}, "y": {0: 10.0, 1: 20.0, 2: 30.0}}
    assert s.sha == {"x": "abc", "y": "abc"} and s.kind == {"x": "ID", "y": "OOD"} and s.path == p
    with pytest.raises(ReportError, match="no results of mode 'full'"):
        read_episode_scores(p, "full")
    (tmp_path / "a" / "episodes.csv").write_text((tmp_path / "a" / "episodes.csv").read_text().rsplit("\n", 2)[0] + "\n")
    with pytest.raises(ReportError, match="2 episodes of 'y'.*n = 3"):
        read_episode_scores(p)
    (tmp_path / "a" / "episodes.csv").unlink()
    with pytest.raises(ReportError, match="episodes.csv: no such file"):
        read_episode_scores(p)


def test_compare_paired_cli(tmp_path, capsys):
    from smat_dist.eval.cli import main

    rng = np.random.default_rng(0)
    base = {"x": rng.uniform(40, 80, 30), "y": rng.uniform(10, 40, 30)}
    ref, other = [], []
    for seed in range(3):
        ref.append(_write_eval(tmp_path / f"pmf{seed}", "PMF", {"x": ("ID", base["x"] + seed),
                                                                 "y": ("OOD", base["y"])}))
        other.append(_write_eval(tmp_path / f"smat{seed}", "SMAT", {"x": ("ID", base["x"] + seed + 1.0),
                                                                    "y": ("OOD", base["y"] + 2.0 + seed)}))
    assert main(["--compare", ",".join(map(str, ref)), ",".join(map(str, other)), "--paired", "--margin", "0.5",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "SMAT (smat0) × 3 seeds − ref" in out
    assert "| x | ID | +1.00 ± 0.00 |" in out  # the same +1 on every episode and seed
    assert "| **OOD avg** | | **+3.00 ± " in out  # seeds differ (2, 3, 4): a real two-level interval
    assert "| ID avg equivalent within ±0.5? | | different |" in out
    assert "seeds × episodes" in out and (tmp_path / "cmp" / "paired.md").read_text() in out
    # one evaluation per side: an episode-only interval, said so
    assert main(["--compare", str(ref[0]), str(other[0]), "--paired"]) == 0
    assert "over episodes only" in capsys.readouterr().out
    # a different episode list is refused (exit 2, the source named)
    bad = _write_eval(tmp_path / "bad", "SMAT", {"x": ("ID", base["x"]), "y": ("OOD", base["y"])}, sha="zzz")
    assert main(["--compare", str(ref[0]), str(bad), "--paired"]) == 2
    assert "source 'x': different episode lists" in capsys.readouterr().err
    assert main(["--compare", ",".join(map(str, ref)), str(other[0]), "--paired"]) == 2
    assert "same number of seeds" in capsys.readouterr().err
    assert main(["--compare", str(ref[0]), str(other[0]), "--margin", "1"]) == 2


def test_paired_table_is_symmetric_in_sign():
    a = _scores({"x": {0: 60.0, 1: 70.0, 2: 65.0}}, path="a/results.csv")
    b = _scores({"x": {0: 58.0, 1: 69.0, 2: 66.0}}, path="b/results.csv")
    t_ab, t_ba = paired_table([[b], [a]]), paired_table([[a], [b]])
    assert "| x | ID | +0.67 ± " in t_ab and "| x | ID | -0.67 ± " in t_ba
