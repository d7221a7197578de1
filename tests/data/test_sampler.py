"""The Meta-Dataset episode protocol, on hand-made specs, no pixels."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from smat_dist.data.config import EpisodeConfig
from smat_dist.data.sampler import (EpisodeSampler, MultiSourceSampler, SamplerError, compute_num_query, episode_rng,
                                    select_rows, shots_per_class, stream_tag, support_set_size)
from smat_dist.data.spec import GraphNode, bilevel_spec, flat_spec, hierarchical_spec, spanning_leaves

N_EPISODES = 2000


def _flat(counts_train, counts_test=(30,) * 6):
    counts = list(counts_train) + list(counts_test)
    return flat_spec("flat", {"train": len(counts_train), "test": len(counts_test)},
                     dict(enumerate(counts)), {i: f"c{i}" for i in range(len(counts))})


def _rows(spec, split):
    out, start = {}, 0
    for c in spec.classes(split):
        out[c] = (start, start + spec.images_per_class[c])
        start += spec.images_per_class[c]
    return out


def _tree_spec():
    """root > A (6 nodes x 10 leaves), B (4 leaves), C (C1, C2: 4 leaves each, + one leaf shared with A1)."""
    nodes = []
    leaves = []

    def leaf(name, parents):
        nodes.append(GraphNode(name, name, [], parents))
        leaves.append(name)

    a_kids = [f"A{i}" for i in range(1, 7)]
    nodes.append(GraphNode("root", "root", ["A", "B", "C"], []))
    nodes.append(GraphNode("A", "A", a_kids, ["root"]))
    for k in a_kids:
        kids = [f"{k}_l{j}" for j in range(10)]
        nodes.append(GraphNode(k, k, kids, ["A"]))
        for j, lf in enumerate(kids):
            leaf(lf, [k, "C"] if lf == "A1_l0" else [k])
    nodes.append(GraphNode("B", "B", [f"B_l{j}" for j in range(4)], ["root"]))
    for j in range(4):
        leaf(f"B_l{j}", ["B"])
    nodes.append(GraphNode("C", "C", ["C1", "C2", "A1_l0"], ["root"]))
    for k in ("C1", "C2"):
        nodes.append(GraphNode(k, k, [f"{k}_l{j}" for j in range(4)], ["C"]))
        for j in range(4):
            leaf(f"{k}_l{j}", [k])
    names = {i: w for i, w in enumerate(sorted(leaves))}
    rng = np.random.default_rng(1)
    counts = {i: int(rng.integers(20, 300)) for i in names}
    return hierarchical_spec("tree", {"train": nodes, "valid": [], "test": []}, counts, names)


# ---------------------------------------------------------------- formulas, by hand


def test_formulas_match_hand_computed_case():
    n = np.array([20, 160, 13])
    q = compute_num_query(n, 10, None)
    assert q == 6  # min(10, 13 // 2)
    r = n - q  # [14, 154, 7]
    # contributions min(100, r) = [14, 100, 7]; floor(0.3*c + 1) = 5 + 31 + 3
    assert support_set_size(0.3, r, 100, 500) == 39
    assert support_set_size(0.3, r, 100, 20) == 20  # capped by max_support_set_size
    assert support_set_size(0.0, r, 100, 500) == 3  # beta = 0 still gives every class one shot
    # weights n * e^u with u = [0, ln 2, ln 0.5] -> [20, 320, 6.5]; p * (39 - 3) = [2.08, 33.25, 0.68]
    k = shots_per_class(np.array([0.0, math.log(2), math.log(0.5)]), n, r, 39)
    assert k.tolist() == [3, 34, 1]
    # per-class cap by the remaining images: a tiny class cannot get more than r_c
    # weights [500, 8]; p * 398 = [391.7, 6.27] -> [392, 7], and 7 is capped to r = 2
    k = shots_per_class(np.array([math.log(0.5), math.log(2)]), np.array([1000, 4]), np.array([990, 2]), 400)
    assert k.tolist() == [392, 2]


def test_fixed_shot_query_formula_and_errors():
    assert compute_num_query(np.array([20, 7]), 10, 5) == 2  # min(10, 7 - 5)
    assert compute_num_query(np.array([20, 7]), 10, (1, 3)) == 4  # uses the upper end of the range
    with pytest.raises(SamplerError):
        compute_num_query(np.array([20, 5]), 10, 5)  # no image left for the query
    with pytest.raises(SamplerError):
        compute_num_query(np.array([20, 1]), 10, None)  # VWVS needs >= 2 per class
    with pytest.raises(SamplerError):
        support_set_size(0.5, np.array([5] * 10), 100, 9)  # fewer support slots than ways


# ---------------------------------------------------------------- VWVS invariants over many episodes


def test_vwvs_invariants_over_2000_episodes():
    rng0 = np.random.default_rng(0)
    counts = [6, 7, 9] + rng0.integers(20, 400, 57).tolist()  # a few fungi-like tiny classes
    spec = _flat(counts)
    s = EpisodeSampler(spec, "train", EpisodeConfig())
    rows = _rows(spec, "train")
    ways_seen, support_sizes = [], []
    for g in range(N_EPISODES):
        d = s.sample(episode_rng(0, 1, g, 0))
        n_c = np.array([spec.images_per_class[c] for c in d.classes])
        assert 5 <= d.ways <= min(50, 60)
        assert len(set(d.classes)) == d.ways and set(d.classes) <= set(spec.classes("train"))
        assert d.query == min(10, int(n_c.min()) // 2)
        assert min(d.shots) >= 1 and sum(d.shots) <= 500
        assert all(k + d.query <= n for k, n in zip(d.shots, n_c))
        sup, qry = select_rows(d, rows, episode_rng(0, 1, g, 1))
        for c, srow, qrow in zip(d.classes, sup, qry):
            lo, hi = rows[c]
            both = np.concatenate([srow, qrow])
            assert len(qrow) == d.query  # balanced query
            assert len(np.unique(both)) == len(both)  # no image twice, so none in support and query
            assert both.min() >= lo and both.max() < hi
        ways_seen.append(d.ways)
        support_sizes.append(sum(d.shots))
    # the full range of ways is used and is uniform-ish (mean of U{5..50} = 27.5)
    assert min(ways_seen) == 5 and max(ways_seen) == 50
    assert abs(np.mean(ways_seen) - 27.5) < 1.5
    assert max(support_sizes) > 450  # the 500 cap is reached in practice


def test_dag_episodes_stay_inside_one_node():
    spec = _tree_spec()
    s = EpisodeSampler(spec, "train", EpisodeConfig())
    span = spanning_leaves(spec.graph["train"])
    # eligible: spans 5..392 kept leaves -> root (72), A (60), A1..A6 (10, 10, ...), C (9); not B/C1/C2 (4)
    assert [w for w, _ in s.dag_nodes] == sorted(["root", "A", "C"] + [f"A{i}" for i in range(1, 7)])
    wn_of = spec.class_names
    node_sets = {w: {c for c, name in wn_of.items() if name in span[w]} for w, _ in s.dag_nodes}
    hits = Counter()
    for g in range(N_EPISODES):
        d = s.sample(episode_rng(3, 2, g, 0))
        cls = set(d.classes)
        inside = [w for w, leaves in node_sets.items() if cls <= leaves]
        assert inside, f"episode {g} classes span no single eligible node"
        exact = [w for w in inside if node_sets[w] == cls]
        if d.ways == 50:  # root (72) or A (60) subsampled to max_ways_upper_bound
            assert not exact
        else:
            assert exact, f"episode {g}: {d.ways} classes are not a whole node"
            hits[exact[0]] += 1
        assert 5 <= d.ways <= 50
    assert hits["C"] > 0 and sum(hits.values()) > 0.6 * N_EPISODES  # 7 of 9 nodes are taken whole


def test_alphabet_episodes_stay_inside_one_alphabet():
    sizes = [5, 12, 30, 55]
    counts = {i: 20 for i in range(sum(sizes))}
    spec = bilevel_spec("alpha", {"train": 4}, sizes, [f"a{i}" for i in range(4)], counts,
                        {i: f"ch{i}" for i in counts})
    s = EpisodeSampler(spec, "train", EpisodeConfig())
    alpha_of = {c: a for a, ids in enumerate(spec.superclasses["train"]) for c in ids}
    per_alpha = Counter()
    for g in range(N_EPISODES):
        d = s.sample(episode_rng(0, 9, g, 0))
        alphas = {alpha_of[c] for c in d.classes}
        assert len(alphas) == 1
        a = alphas.pop()
        assert 5 <= d.ways <= min(50, sizes[a])
        assert d.query == 10
        per_alpha[a] += 1
    assert all(abs(per_alpha[a] / N_EPISODES - 0.25) < 0.05 for a in range(4))  # alphabet picked uniformly


def test_hierarchy_can_be_ignored_and_errors_are_raised():
    spec = _tree_spec()
    flat = EpisodeSampler(spec, "train", EpisodeConfig(ignore_dag_ontology=True))
    assert not flat.use_dag
    ways = [flat.sample(episode_rng(0, 0, g, 0)).ways for g in range(300)]
    assert max(ways) == 50 and min(ways) == 5
    small = bilevel_spec("a", {"train": 2}, [4, 9], ["x", "y"], {i: 20 for i in range(13)}, {i: str(i) for i in range(13)})
    with pytest.raises(SamplerError, match="min_ways"):
        EpisodeSampler(small, "train", EpisodeConfig())  # an alphabet smaller than min_ways
    with pytest.raises(SamplerError):
        EpisodeSampler(_flat([20] * 4), "train", EpisodeConfig())  # 4 classes < min_ways


# ---------------------------------------------------------------- fixed modes


def test_fixed_way_shot_query():
    spec = _flat([30] * 40)
    s = EpisodeSampler(spec, "train", EpisodeConfig(num_ways=10, num_support=2, num_query=10))
    for g in range(200):
        d = s.sample(episode_rng(0, 0, g, 0))
        assert d.ways == 10 and set(d.shots) == {2} and d.query == 10
    r = EpisodeSampler(spec, "train", EpisodeConfig(num_ways=5, num_support_range=[1, 4]))
    ks = set()
    for g in range(200):
        d = r.sample(episode_rng(0, 0, g, 0))
        assert d.ways == 5 and len(set(d.shots)) == 1  # balanced
        assert d.query == min(10, 30 - 4)
        ks.add(d.shots[0])
    assert ks == {1, 2, 3, 4}
    # fixed ways bypass the hierarchies, as in MD
    tree = EpisodeSampler(_tree_spec(), "train", EpisodeConfig(num_ways=5, num_support=1))
    assert not tree.use_dag
    with pytest.raises(SamplerError, match="shots"):
        EpisodeSampler(_flat([3] * 10), "train", EpisodeConfig(num_ways=5, num_support=2, num_query=5)).sample(
            episode_rng(0, 0, 0, 0))


# ---------------------------------------------------------------- sources and seeds


def test_source_choice_uniform_and_weighted():
    a, b = _flat([30] * 10), _flat([30] * 12)
    a.name, b.name = "a", "b"
    samplers = {"a": EpisodeSampler(a, "train", EpisodeConfig()), "b": EpisodeSampler(b, "train", EpisodeConfig())}
    uni = Counter(MultiSourceSampler(samplers, ["a", "b"]).sample(episode_rng(0, 0, g, 0)).source for g in range(4000))
    wtd = Counter(MultiSourceSampler(samplers, ["a", "b"], [3, 1]).sample(episode_rng(0, 0, g, 0)).source
                  for g in range(4000))
    assert abs(uni["a"] / 4000 - 0.5) < 0.03
    assert abs(wtd["a"] / 4000 - 0.75) < 0.03
    with pytest.raises(SamplerError):
        MultiSourceSampler(samplers, ["a", "b"], [1.0])


def test_episode_is_a_pure_function_of_seed_stream_and_index():
    spec = _flat([30] * 60)
    s = EpisodeSampler(spec, "train", EpisodeConfig())
    tag = stream_tag("train", ["flat"])
    forward = [s.sample(episode_rng(7, tag, g, 0)) for g in range(50)]
    backward = [s.sample(episode_rng(7, tag, g, 0)) for g in reversed(range(50))][::-1]
    assert forward == backward
    assert forward != [s.sample(episode_rng(8, tag, g, 0)) for g in range(50)]
    assert len({(d.classes, d.shots) for d in forward}) == 50
    assert stream_tag("train", ["a", "b"]) != stream_tag("train", ["a"]) != stream_tag("test", ["a"])
    with pytest.raises(ValueError):
        episode_rng(0, 0, -1, 0)
