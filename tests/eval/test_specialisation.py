"""alpha_specialisation: source information in α against episode-to-episode variation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smat_dist.eval.analyse import alpha_specialisation


def _alphas(rng, centres, n, noise):
    out = {}
    for name, centre in centres.items():
        raw = np.clip(np.asarray(centre) + rng.normal(0, noise, (n, len(centre))), 1e-6, None)
        out[name] = raw / raw.sum(1, keepdims=True)
    return out


def test_alpha_fixed_by_the_source_is_fully_specialised():
    alphas = {"a": np.tile([0.9, 0.1], (6, 1)), "b": np.tile([0.1, 0.9], (6, 1)), "c": np.tile([0.5, 0.5], (6, 1))}
    r = alpha_specialisation(alphas)
    assert r["eta2"] == pytest.approx(1.0)
    assert r["decode"] == 1.0 and r["chance"] == pytest.approx(1 / 3)
    assert r["spread"] == pytest.approx(0.8)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert r["entropy"] == pytest.approx((2 * h + 1) / 3)  # a and b at h, c uniform


def test_source_blind_peaked_alpha_has_a_spread_but_no_specialisation():
    """The null the study tests against: α peaked and noisy but drawn the same way for every source."""
    rng = np.random.default_rng(0)
    same = [0.25, 0.25, 0.25, 0.25]
    alphas = _alphas(rng, {s: same for s in "abcde"}, 100, noise=0.3)
    r = alpha_specialisation(alphas)
    assert r["spread"] > 0.03  # source means differ by chance
    assert r["eta2"] < 0.03
    assert abs(r["decode"] - 0.2) < 0.08


def test_source_structure_shows_in_eta2_and_decoding():
    rng = np.random.default_rng(1)
    alphas = _alphas(rng, {"a": [0.7, 0.1, 0.1, 0.1], "b": [0.1, 0.7, 0.1, 0.1], "c": [0.25] * 4}, 50, noise=0.1)
    r = alpha_specialisation(alphas)
    assert r["eta2"] > 0.5
    assert r["decode"] > 0.9


def test_needs_two_sources_with_two_episodes():
    with pytest.raises(ValueError, match="at least 2 sources"):
        alpha_specialisation({"a": np.ones((5, 2)) / 2})
    with pytest.raises(ValueError, match="at least 2 sources"):
        alpha_specialisation({"a": np.ones((5, 2)) / 2, "b": np.ones((1, 2)) / 2})
