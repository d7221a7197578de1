"""The node-local shard cache: budget, sharing between processes, corrupt and short downloads."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import socket
import threading
import time

import pytest

from smat_dist.data.cache import Ref, ShardCache
from smat_dist.data.store import DataError

from .conftest import QuietHandler


def _refs(root, url, source, split):
    man = json.loads((root / source / "manifest.json").read_text())
    return [Ref(f"{url}/{source}/{sh['path']}", sh["sha256"], sh["bytes"], sh["path"])
            for sh in man["splits"][split]["shards"]]


class Slow(QuietHandler):
    """Sends files in 32 KiB pieces, 4 ms apart: a 1 MB shard takes ~0.15 s to arrive."""

    def copyfile(self, source, outputfile):
        while True:
            b = source.read(32 << 10)
            if not b:
                return
            outputfile.write(b)
            outputfile.flush()
            time.sleep(0.004)


def test_budget_holds_while_serving_more_shards_than_fit(synth_root, synth_url, make_cfg, tmp_path):
    from smat_dist.data.builder import EpisodeBuilder

    shards = _refs(synth_root, synth_url, "objects", "train")
    budget = 4 * max(r.size for r in shards) + (64 << 10)  # four shards and the index
    assert sum(r.size for r in shards) > 2 * budget
    cache_dir = tmp_path / "cache"
    cfg = make_cfg(synth_url, cache_dir=str(cache_dir), cache_max_gb=budget / 2**30, prefetch_shards=2)
    local = EpisodeBuilder(make_cfg(synth_root), "train", seed=5, sources=["objects"])
    remote = EpisodeBuilder(cfg, "train", seed=5, sources=["objects"])
    peak, stop = [0], threading.Event()
    watcher = ShardCache(cache_dir, budget)

    def watch():  # entries + partial downloads on disk, as a consistent snapshot
        while not stop.is_set():
            peak[0] = max(peak[0], watcher.usage())

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        touched = set()
        for g in range(40):
            a = local.build(g)
            b = remote.build(g, warm=[g + 1, g + 2])
            assert (a.support == b.support).all() and (a.query == b.query).all() and a.support_keys == b.support_keys
            touched |= {r.sha256 for r in remote.shard_refs(remote.plan(g))}
    finally:
        stop.set()
        w.join()
        remote.close()
    st = remote.stats()
    assert len(touched) > 4 and st["cache_evictions"] > 0 and st["cache_downloads"] > len(touched) - 1
    assert 0 < peak[0] <= budget and remote.catalog.cache.usage() <= budget


def test_a_finished_download_moves_into_place_under_the_cache_wide_lock(synth_root, synth_url, tmp_path, monkeypatch):
    """Budget scans list entries, then partial files: a rename between the two would hide a whole
    shard from the scan (one download over budget, as seen in CI). The move must hold the lock."""
    import fcntl

    import smat_dist.data.cache as cache_mod

    cache = ShardCache(tmp_path / "cache", 1 << 30)
    held = []
    real_replace = os.replace

    def replace(src, dst):
        fd = os.open(tmp_path / "cache" / ".lock", os.O_RDWR)
        try:  # another open file description: refused while the cache-wide lock is held
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", replace)
    ref = _refs(synth_root, synth_url, "digits", "test")[0]
    path = cache.fetch(ref)
    assert held == [True] and path.stat().st_size == ref.size and cache.usage() == ref.size


def _share_worker(args):
    """One process of the sharing test: fetch every ref (own order), hash what it got."""
    cache_dir, budget, refs, seed = args
    cache = ShardCache(cache_dir, budget)
    order = list(refs)
    random.Random(seed).shuffle(order)
    bad = []
    for ref in order:
        for _ in range(5):
            path = cache.fetch(ref)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                break
            except FileNotFoundError:  # evicted by the other process in between: fetch again
                continue
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            bad.append((ref.name, len(data)))
        tail = cache.pread(ref, ref.size - 1024, 1024)  # the reader's path
        if tail != data[-1024:]:
            bad.append((ref.name, "pread"))
    return bad, cache.stats()


@pytest.mark.parametrize("fits", [True, False])
def test_two_processes_share_one_cache_and_never_read_a_partial_shard(synth_root, serve, tmp_path, fits):
    url = serve(synth_root, Slow)
    refs = _refs(synth_root, url, "glyphs", "train") + _refs(synth_root, url, "textures", "train")
    budget = (sum(r.size for r in refs) + 1) if fits else 3 * max(r.size for r in refs)
    cache_dir = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_share_worker, [(str(cache_dir), budget, refs, seed) for seed in (1, 2)])
    assert [bad for bad, _ in results] == [[], []]
    downloads = sum(st["cache_downloads"] for _, st in results)
    if fits:  # each shard crossed the network once; the other process read that copy
        assert downloads == len(refs) and sum(st["cache_evictions"] for _, st in results) == 0
    else:
        assert downloads >= len(refs) and ShardCache(cache_dir, budget).usage() <= budget
    assert not any((cache_dir / "partial").iterdir())


class Corrupting(QuietHandler):
    """Serves every .tar with one byte flipped."""

    def copyfile(self, source, outputfile):
        data = bytearray(source.read())
        if self.path.endswith(".tar"):
            data[len(data) // 2] ^= 1
        outputfile.write(bytes(data))


class FlakyOnce(QuietHandler):
    """The first request of each .tar is cut off half-way; later ones are whole."""

    seen = set()

    def copyfile(self, source, outputfile):
        data = source.read()
        if self.path.endswith(".tar") and self.path not in FlakyOnce.seen:
            FlakyOnce.seen.add(self.path)
            outputfile.write(data[: len(data) // 2])
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        outputfile.write(data)


def test_corrupt_download_is_retried_then_named(synth_root, serve, tmp_path):
    url = serve(synth_root, Corrupting)
    ref = _refs(synth_root, url, "digits", "test")[0]
    cache = ShardCache(tmp_path / "cache", 1 << 30, retry_delay_s=0.01)
    with pytest.raises(DataError, match=f"{ref.url}: download failed 3 times: sha256 differs"):
        cache.fetch(ref)
    assert cache.stats()["cache_retries"] == 3 and cache.usage() == 0
    assert not any((tmp_path / "cache" / "partial").iterdir())


def test_short_download_is_retried_and_then_served(synth_root, serve, tmp_path):
    url = serve(synth_root, FlakyOnce)
    ref = _refs(synth_root, url, "digits", "test")[1]
    cache = ShardCache(tmp_path / "cache", 1 << 30, retry_delay_s=0.01)
    path = cache.fetch(ref)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256
    assert cache.stats()["cache_retries"] == 1 and cache.stats()["cache_downloads"] == 1


def test_dead_downloads_release_their_reservation(synth_root, synth_url, tmp_path):
    refs = _refs(synth_root, synth_url, "digits", "test")
    cache = ShardCache(tmp_path / "cache", refs[0].size + refs[1].size)
    host = socket.gethostname().replace(".", "-")
    with mp.get_context("spawn").Pool(1) as pool:  # a pid that is certainly gone afterwards
        dead = pool.apply(os.getpid)
    stale = tmp_path / "cache" / "partial" / f"{'0' * 64}.{refs[0].size}.{host}.{dead}.0.part"
    stale.write_bytes(b"half")
    for r in refs:  # both fit only once the dead download's reservation is dropped
        cache.fetch(r)
    assert not stale.exists() and cache.stats()["cache_evictions"] == 0 and cache.usage() == refs[0].size + refs[1].size
    with pytest.raises(DataError, match="do not fit the shard cache budget"):
        ShardCache(tmp_path / "small", refs[0].size - 1).fetch(refs[0])
