"""Episode delivery: determinism across actor counts, resume, backpressure, frozen lists, on Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from smat_dist.data.builder import EpisodeBuilder
from smat_dist.data.config import EpisodeConfig
from smat_dist.data.loader import EpisodeLoader, rank_indices, tasks_of_rank
from smat_dist.data.store import DataError
from smat_dist.data.tario import BLOCK


# Smaller-than-MD episodes keep these Ray tests quick; the protocol itself is tested in test_sampler.
SMALL = dict(max_support_set_size=120, max_num_query=4)


def _same(a, b):
    assert a.index == b.index and a.source == b.source and a.classes == b.classes
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f"episode {a.index}: {f} differs"


def test_rank_indices_partition_the_stream():
    w1 = list(rank_indices(0, 8, 0, 1, num_steps=5))
    assert w1 == list(range(40))
    parts = [list(rank_indices(0, 8, r, 4, num_steps=5)) for r in range(4)]
    assert sorted(sum(parts, [])) == w1 and all(len(p) == 10 for p in parts)
    assert parts[1][:4] == [1, 5, 9, 13]
    assert list(rank_indices(3, 8, 1, 4, num_steps=2)) == parts[1][6:]  # resume at step 3
    # any meta-batch on any world size: 3 tasks on 2 ranks, 2 + 1 per step, the union is one rank's
    uneven = [list(rank_indices(0, 3, r, 2, num_steps=4)) for r in range(2)]
    assert sorted(sum(uneven, [])) == list(range(12))
    assert uneven[0][:2] == [0, 2] and uneven[1][:2] == [1, 4]
    assert [tasks_of_rank(3, r, 2) for r in range(2)] == [2, 1] == [len(p) // 4 for p in uneven]
    assert [tasks_of_rank(10, r, 4) for r in range(4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError):
        next(rank_indices(0, 6, 4, 4))


def test_same_seed_same_episodes_with_1_and_3_actors(ray_clean, synth_root, make_cfg):
    cfg = make_cfg(synth_root, max_in_flight=3, episode=EpisodeConfig(**SMALL))
    idx = list(range(10))
    with EpisodeLoader(cfg, "train", seed=5, use_ray=False) as local:
        ref = list(local.iterate(idx))
    assert len({e.source for e in ref}) > 1  # multi-source stream
    assert any(e.support_x.shape[0] != f.support_x.shape[0] for e, f in zip(ref, ref[1:]))
    for n in (1, 3):
        with EpisodeLoader(cfg, "train", seed=5, num_actors=n) as loader:
            got = list(loader.iterate(idx))
            assert loader.stats()["episodes"] == len(idx) and loader.stats()["actors"] == n
        assert [e.index for e in got] == idx
        for a, b in zip(ref, got):
            _same(a, b)
    with EpisodeLoader(cfg, "train", seed=6, use_ray=False) as other:
        e = other.episode(0)
    assert e.classes != ref[0].classes or not torch.equal(e.support_x, ref[0].support_x)


def test_resume_from_cursor_gives_the_identical_tail(ray_clean, synth_root, make_cfg):
    cfg = make_cfg(synth_root, num_actors=2, max_in_flight=2, episode=EpisodeConfig(**SMALL))
    with EpisodeLoader(cfg, "train", seed=0) as loader:
        full = list(loader.iterate(rank_indices(0, 4, 1, 2, num_steps=4)))  # rank 1 of 2, steps 0..3
    with EpisodeLoader(cfg, "train", seed=0) as resumed:  # a fresh pool, as after a restart
        tail = list(resumed.iterate(rank_indices(2, 4, 1, 2, num_steps=2)))
    assert [e.index for e in full] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert [e.index for e in tail] == [9, 11, 13, 15]
    for a, b in zip(full[4:], tail):
        _same(a, b)
    # world-size invariance: episode g is the same whichever rank layout asked for it
    b = EpisodeBuilder(cfg, "train", seed=0)
    assert [b.plan(g) for g in (9, 11)] == [b.plan(g) for g in list(rank_indices(2, 4, 0, 1, num_steps=1))[1::2]]


def test_backpressure_and_ordered_output(ray_clean, synth_root, make_cfg):
    import ray

    cfg = make_cfg(synth_root, num_actors=2, max_in_flight=2)
    with EpisodeLoader(cfg, "test", seed=0, sources=["digits"]) as loader:
        it = loader.iterate([7, 3, 7, 0, 1, 2, 4, 5])
        first = next(it)
        time.sleep(1.0)  # a slow consumer: actors must not run ahead
        built = sum(ray.get(a.stats.remote())["episodes"] for a in loader._actors)
        assert built <= 1 + cfg.max_in_flight
        rest = []
        for e in it:
            assert loader.in_flight <= cfg.max_in_flight
            rest.append(e)
        got = [first] + rest
        assert [e.index for e in got] == [7, 3, 7, 0, 1, 2, 4, 5]
        _same(got[0], got[2])
        st = loader.stats()
        assert st["max_in_flight_seen"] == 2 and st["episodes"] == 8 and st["in_flight"] == 0


def test_frozen_episodes_through_actors(ray_clean, synth_root, make_cfg):
    cfg = make_cfg(synth_root, num_actors=2)
    b = EpisodeBuilder(cfg, "test", seed=0, sources=["signs"])
    specs = [b.plan(g) for g in range(4)]
    with EpisodeLoader(cfg, "test", seed=0, sources=["signs"]) as loader:
        got = list(loader.iterate_specs(specs))
        direct = list(loader.iterate(range(4)))  # test split: eval transform, no augmentation
    for s, e, d in zip(specs, got, direct):
        t = cfg.transform
        ref = b.materialise(s).to_episode(t.mean, t.std)
        _same(e, ref)
        _same(e, d)
        assert e.support_x.shape[1:] == (3, 32, 32) and e.support_x.dtype == torch.float32
        assert e.support_y.tolist() == [lab for _, lab in s.support]
        assert abs(float(e.query_x.mean())) < 3.0


def test_corruption_is_counted_through_actors(ray_clean, writable_copy, make_cfg):
    root = writable_copy("digits")
    cfg = make_cfg(root, num_actors=2)
    b = EpisodeBuilder(cfg, "test", seed=0, sources=["digits"])
    spec = b.plan(0)
    idx = b.catalog.store("digits").index("test")
    for key, _ in spec.support[:3]:
        p, o, _ = idx.locate(idx.row_of_key(key))
        with open(p, "r+b") as f:
            f.seek(o - BLOCK)  # break the image member's header checksum
            f.write(b"X")
    with EpisodeLoader(cfg, "test", seed=0, sources=["digits"]) as loader:
        e = loader.episode(0)
        st = loader.stats()
    assert st["skipped_corrupt"] == 3 and st["skipped_member"] == 3 and st["replaced"] == 3
    assert np.bincount(e.support_y.numpy()).tolist() == np.bincount([l for _, l in spec.support]).tolist()


def test_unschedulable_actors_fail_clearly(ray_clean, synth_root, make_cfg):
    cfg = make_cfg(synth_root, actor_cpus=64.0, actor_start_timeout_s=2.0)
    with pytest.raises(DataError, match="did not start"):
        EpisodeLoader(cfg, "test", sources=["digits"])
