"""The synthetic benchmark: structure, determinism, and hierarchy-aware sampling on it."""

from __future__ import annotations

import json

import numpy as np
import torch

from smat_dist.data.builder import EpisodeBuilder
from smat_dist.data.config import EpisodeConfig
from smat_dist.data.sampler import EpisodeSampler, episode_rng
from smat_dist.data.spec import spanning_leaves
from smat_dist.data.store import Catalog
from smat_dist.data.synth import ALL_SOURCES, ID_SOURCES, OOD_SOURCES, build_synth
from smat_dist.data.writer import WriteOptions


def _shas(root, name):
    man = json.loads((root / name / "manifest.json").read_text())
    return [sh["sha256"] for sp in man["splits"].values() for sh in sp["shards"]]


def test_structure(synth_root):
    cat = Catalog(synth_root)
    assert cat.sources() == sorted(ALL_SOURCES)
    for s in ID_SOURCES:
        assert cat.store(s).splits() == ["train", "valid", "test"]
    for s in OOD_SOURCES:
        assert cat.store(s).splits() == ["test"]
    kinds = {s: cat.store(s).spec.kind for s in ALL_SOURCES}
    assert kinds["objects"] == "hierarchical" and kinds["glyphs"] == "bilevel"
    assert sum(len(cat.store(s).spec.classes("train")) for s in ID_SOURCES) >= 200
    for s in ALL_SOURCES:  # enough images everywhere for VWVS (>= 2 per class; in practice >= 16)
        assert min(cat.store(s).spec.images_per_class.values()) >= 16


def test_deterministic_by_seed(tmp_path):
    opts = WriteOptions(shard_bytes=1 << 20, tier="native", workers=1, progress=False)
    for d, seed in (("a", 3), ("b", 3), ("c", 4)):
        build_synth(str(tmp_path / d), seed=seed, sources=["digits", "patterns"], opts=opts)
    for s in ("digits", "patterns"):
        assert _shas(tmp_path / "a", s) == _shas(tmp_path / "b", s)
        assert _shas(tmp_path / "a", s) != _shas(tmp_path / "c", s)


def test_dag_and_alphabet_episodes_on_the_benchmark(synth_root):
    cat = Catalog(synth_root)
    objects, glyphs = cat.store("objects").spec, cat.store("glyphs").spec
    for split in ("train", "test"):
        s = EpisodeSampler(objects, split, EpisodeConfig())
        span = spanning_leaves(objects.graph[split])
        node_sets = [{c for c, w in objects.class_names.items() if w in span[n]} for n, _ in s.dag_nodes]
        assert len(s.dag_nodes) >= 5
        for g in range(1000):
            d = s.sample(episode_rng(0, 1, g, 0))
            assert any(set(d.classes) <= ns for ns in node_sets)
        a = EpisodeSampler(glyphs, split, EpisodeConfig())
        alpha_of = {c: i for i, ids in enumerate(glyphs.superclasses[split]) for c in ids}
        for g in range(1000):
            d = a.sample(episode_rng(0, 2, g, 0))
            assert len({alpha_of[c] for c in d.classes}) == 1


def test_few_shot_is_possible_but_not_trivial(synth_root, make_cfg):
    """A raw-pixel nearest-centroid learner is well above chance and well below perfect."""
    cfg = make_cfg(synth_root, episode=EpisodeConfig(num_ways=5, num_support=5, num_query=10))
    for source in ("objects", "glyphs", "signs", "patterns"):
        b = EpisodeBuilder(cfg, "test", seed=0, sources=[source])
        accs = []
        for g in range(8):
            e = b.build(g).to_episode(cfg.transform.mean, cfg.transform.std)
            xs, xq = e.support_x.flatten(1), e.query_x.flatten(1)
            xs, xq = xs - xs.mean(1, keepdim=True), xq - xq.mean(1, keepdim=True)
            protos = torch.stack([xs[e.support_y == c].mean(0) for c in range(e.ways)])
            accs.append((torch.cdist(xq, protos).argmin(1) == e.query_y).float().mean().item())
        acc = float(np.mean(accs))
        assert 0.3 < acc < 0.95, (source, acc)
