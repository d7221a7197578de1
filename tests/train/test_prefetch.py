"""The torchrun and single-process launchers build episodes ahead in a thread: same episodes, same order."""

from __future__ import annotations

import threading

import pytest
import torch

from smat_dist.train.prefetch import Prefetched


def test_prefetched_is_the_same_sequence_and_raises_where_the_source_did():
    def source():
        yield from range(5)
        raise OSError("shard 7 unreadable")

    it = Prefetched(source(), depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(OSError, match="shard 7 unreadable"):
        next(it)
    assert list(Prefetched(iter(range(7)), depth=3)) == list(range(7))


def test_prefetch_builds_ahead_and_close_stops_the_thread():
    built = []
    gate = threading.Event()

    def source():
        for i in range(100):
            built.append(i)
            if i == 3:
                gate.set()
            yield i

    it = Prefetched(source(), depth=3)
    assert gate.wait(10)  # nothing consumed yet: the thread built ahead up to the queue's depth (+1 in hand)
    assert next(it) == 0
    it.close()
    assert not it._thread.is_alive() and len(built) <= 6
    with pytest.raises(StopIteration):
        next(it)


@pytest.fixture(scope="module")
def synth_one(tmp_path_factory):
    """One small synthetic source (a few seconds to build)."""
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("synth_one")
    build_synth(str(root), seed=0, scale=0.25, sources=["textures"],
                opts=WriteOptions(shard_bytes=1 << 20, tier="native", workers=1, progress=False))
    return root


def _fields(ep):
    return [ep.support_x, ep.support_y, ep.query_x, ep.query_y]


def test_a_launcher_stream_is_identical_with_and_without_prefetch(synth_one):
    """The data plane's episodes of two meta-steps of rank 1 of 2, built in a thread vs in the caller."""
    from smat_dist.config import RunConfig, load_config
    from smat_dist.data.loader import rank_indices
    from smat_dist.train.recipe import open_episodes

    from .conftest import REPO, TINY

    cfg = load_config(RunConfig, [REPO / "configs" / "smat.yaml"],
                      [*TINY, "data.episodes=shards", f"data.root={synth_one}", "model.backbone.img_size=16",
                       "data.image_size=16", "data.episode.num_ways=3", "data.episode.num_support=6",
                       "data.episode.num_query=6"])
    plain, loader = open_episodes(cfg, rank_indices(0, 3, 1, 2, num_steps=2), use_ray=False)
    expected = list(plain)
    loader.close()
    stream, loader = open_episodes(cfg, rank_indices(0, 3, 1, 2, num_steps=2), use_ray=False)
    got = list(Prefetched(stream, depth=cfg.data.max_in_flight))
    loader.close()
    assert [e.index for e in got] == [e.index for e in expected] == [1, 4]
    for a, b in zip(got, expected):
        assert a.source == b.source and a.classes == b.classes
        assert all(torch.equal(x, y) for x, y in zip(_fields(a), _fields(b)))
