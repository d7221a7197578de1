"""Roots given as URLs: a converted benchmark served by an HTTP server on 127.0.0.1 (or read through a
``pipe:`` command) must give exactly what the local path gives, through the node-local shard cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from smat_dist.data.cli import main as data_main
from smat_dist.data.config import EpisodeConfig
from smat_dist.data.loader import EpisodeLoader
from smat_dist.data.store import DataError, check_root

from .conftest import QuietHandler

TINY = dict(name="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _shard(root, source, split, i=0):
    man = json.loads((root / source / "manifest.json").read_text())
    return man["splits"][split]["shards"][i]["path"]


def test_episodes_and_pixels_over_http_are_byte_identical(synth_root, synth_url, tmp_path):
    cache = f"cache_dir={tmp_path / 'cache'}"
    for source, split in (("glyphs", "test"), ("objects", "train")):
        a, b = tmp_path / f"{source}-local.jsonl", tmp_path / f"{source}-url.jsonl"
        args = ["--source", source, "--split", split, "-n", "25", "--seed", "3", "--set", cache]
        assert data_main(["episodes", str(synth_root), *args, "-o", str(a)]) == 0
        assert data_main(["episodes", synth_url, *args, "-o", str(b)]) == 0
        assert len(a.read_bytes().splitlines()) == 25 and a.read_bytes() == b.read_bytes()
    for augment in ([], ["--augment"]):  # materialised pixels (read from the cached shards)
        pa, pb = tmp_path / "local.png", tmp_path / "url.png"
        args = ["--source", "objects", "--split", "train", "--index", "5", "--set", cache, *augment]
        assert data_main(["show", str(synth_root), *args, "-o", str(pa)]) == 0
        assert data_main(["show", synth_url, *args, "-o", str(pb)]) == 0
        assert pa.read_bytes() == pb.read_bytes()
    objects = (tmp_path / "cache" / "objects")
    assert any(objects.rglob("*.tar")) and not any((tmp_path / "cache" / "partial").iterdir())


def test_verify_over_http_passes_and_names_an_altered_shard(writable_copy, serve, capsys):
    root = writable_copy("glyphs", "digits")
    assert data_main(["index", str(root)]) == 0  # the source list a URL root is read by
    assert capsys.readouterr().out.strip() == f"{root / 'sources.json'}: digits, glyphs"
    url = serve(root)
    assert data_main(["verify", url]) == 0
    assert capsys.readouterr().out.split() == ["ok", "digits", "ok", "glyphs"]
    rel = _shard(root, "glyphs", "test", 1)
    data = bytearray((root / "glyphs" / rel).read_bytes())
    data[len(data) // 3] ^= 0x20
    (root / "glyphs" / rel).write_bytes(bytes(data))
    for quick in ([], ["--quick"]):
        assert data_main(["verify", url, *quick]) == 1
        out = capsys.readouterr()
        assert f"FAIL glyphs: {url}/glyphs/{rel}: sha256 mismatch" in out.err and "ok   digits" in out.out
        assert out.err.count("FAIL") == 1  # the damage is reported once, for that shard
    (root / "glyphs" / rel).write_bytes(bytes(data[:-1024]))  # served short
    assert data_main(["verify", url, "--source", "glyphs"]) == 1
    assert f"{url}/glyphs/{rel}: " in capsys.readouterr().err


def test_short_training_over_http_matches_local(synth_root, synth_url, make_cfg, tmp_path):
    from smat_dist.train.config import TrainConfig
    from smat_dist.smat import SMAT
    from smat_dist.smat.config import BackboneConfig, ModelConfig
    from smat_dist.train.launch import Trainer

    def run(root):
        cfg = make_cfg(root, image_size=16, train_sources=["glyphs", "textures"], cache_dir=str(tmp_path / "cache"),
                       episode=EpisodeConfig(num_ways=3, num_support=2, num_query=2))
        torch.manual_seed(0)
        model = SMAT(ModelConfig(backbone=BackboneConfig(**TINY)))
        steps = []
        with EpisodeLoader(cfg, "train", seed=0, use_ray=False) as loader:
            Trainer(model, TrainConfig(tasks_per_step=2, max_steps=3, seed=0)).fit(loader, on_step=steps.append)
            stats = loader.stats()
        return steps, model.state_dict(), stats

    local, state_local, _ = run(synth_root)
    remote, state_remote, stats = run(synth_url)
    assert len(local) == len(remote) == 3 and stats["cache_downloads"] > 0 and stats["episodes"] == 6
    for a, b in zip(local, remote):
        assert a.loss == b.loss and a.step == b.step
    for k in state_local:
        assert torch.equal(state_local[k], state_remote[k]), k


def test_evaluation_over_http_matches_local(synth_root, synth_url, tmp_path):
    from smat_dist.eval.cli import main as eval_main
    from tests.eval.conftest import make_tiny_export

    run = tmp_path / "run"
    make_tiny_export(run)
    common = ["--checkpoint", str(run), "-q", "episodes=4", "sources=[textures,digits]",
              f"data.cache_dir={tmp_path / 'cache'}"]
    assert eval_main([*common, "--data", str(synth_root), "--episodes-dir", str(tmp_path / "lists"),
                      "--out", str(tmp_path / "local")]) == 0
    assert eval_main([*common, "--data", synth_url, "--out", str(tmp_path / "url")]) == 0
    # the frozen lists of a URL root go next to the results; they are the same lists
    assert (tmp_path / "url" / "episodes" / "test").is_dir() and not (tmp_path / "http:").exists()
    for name in ("results.csv", "episodes.csv"):
        a, b = (tmp_path / "local" / name).read_text(), (tmp_path / "url" / name).read_text()
        assert a == b and len(a.splitlines()) > 2


def test_pipe_url_root(synth_root, tmp_path):
    url = f"pipe:cat {synth_root}/{{shard}}"
    cache = f"cache_dir={tmp_path / 'cache'}"
    a, b = tmp_path / "local.jsonl", tmp_path / "pipe.jsonl"
    args = ["--source", "textures", "--split", "train", "-n", "10", "--set", cache]
    assert data_main(["episodes", str(synth_root), *args, "-o", str(a)]) == 0
    assert data_main(["episodes", url, *args, "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert data_main(["verify", url, "--source", "digits"]) == 0
    # a pipe: root without the placeholder is refused up front
    assert data_main(["episodes", "pipe:cat /nowhere", "--source", "x", "-n", "1"]) == 2


def test_check_root_reads_manifests_only_and_names_what_is_wrong(synth_root, synth_url, make_cfg, serve, tmp_path):
    cache = str(tmp_path / "cache")
    t0 = time.perf_counter()
    assert check_root(make_cfg(synth_root)) == ["doodles", "glyphs", "objects", "textures"]
    assert check_root(make_cfg(synth_url, cache_dir=cache), "test", ["signs", "digits"]) == ["signs", "digits"]
    assert check_root(make_cfg(synth_url, cache_dir=cache, eval_sources=["patterns"]), "test") == ["patterns"]
    assert time.perf_counter() - t0 < 5
    cases = [
        (make_cfg(tmp_path / "nowhere"), "train", None, f"dataset root not found: {tmp_path / 'nowhere'}"),
        (make_cfg(synth_root, train_sources=["glyphs", "nope"]), "train", None, "source 'nope' not found under"),
        (make_cfg(synth_url, cache_dir=cache), "train", ["digits"],
         f"has no 'train' split (has ['test']): {synth_url}/digits/manifest.json"),
        (make_cfg(synth_url + "/nothing-here", cache_dir=cache), "train", None, f"{synth_url}/nothing-here/sources.json"),
        (make_cfg(synth_url + "/nothing-here", cache_dir=cache), "train", ["glyphs"],
         f"manifest unreadable: {synth_url}/nothing-here/glyphs/manifest.json"),
    ]
    for cfg, split, sources, msg in cases:
        with pytest.raises(DataError) as err:
            check_root(cfg, split, sources)
        assert msg in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # no shard, index or cache directory was touched


def test_episode_actors_over_http_match_local(ray_clean, synth_root, synth_url, make_cfg, tmp_path):
    """The deployment shape: Ray actors on the node share one shard cache and prefetch ahead."""
    local = make_cfg(synth_root, num_actors=2)
    remote = make_cfg(synth_url, num_actors=2, cache_dir=str(tmp_path / "cache"), prefetch_shards=2)
    idx = list(range(10))
    with EpisodeLoader(local, "train", seed=1) as a, EpisodeLoader(remote, "train", seed=1) as b:
        assert b.prefetching and not a.prefetching
        for ea, eb in zip(a.iterate(idx), b.iterate(idx)):
            assert ea.index == eb.index and torch.equal(ea.support_x, eb.support_x)
            assert torch.equal(ea.query_y, eb.query_y)
        st = b.stats()
    assert st["episodes"] == 10 and st["prefetch_requested"] > 0
    assert st["cache_downloads"] >= 1 and st["cache_retries"] == 0


def test_prefetch_is_bounded_and_changes_nothing(synth_root, synth_url, make_cfg, tmp_path, monkeypatch):
    from smat_dist.data.cache import Prefetcher

    seen = []
    want = Prefetcher.want

    def spy(self, refs):
        n = want(self, refs)
        seen.append(self.pending)
        return n

    monkeypatch.setattr(Prefetcher, "want", spy)
    cfg = make_cfg(synth_url, cache_dir=str(tmp_path / "cache"), prefetch_shards=3)
    plain = make_cfg(synth_root)
    idx = list(range(12))
    with EpisodeLoader(cfg, "train", seed=2, use_ray=False) as a, EpisodeLoader(plain, "train", seed=2,
                                                                                  use_ray=False) as b:
        for ea, eb in zip(a.iterate(idx), b.iterate(idx)):
            assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
        st = a.stats()
    assert seen and max(seen) <= 3 and st["prefetch_requested"] > 0
    assert st["cache_downloads"] == len({p.name for p in (tmp_path / "cache" / "objects").rglob("*.*")})


class PutHandler(QuietHandler):
    """Static files, plus HTTP PUT into the served directory (an object store's upload)."""

    protocol_version = "HTTP/1.1"  # answers curl's "Expect: 100-continue" at once

    def do_PUT(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # curl -T - (stdin)
            body = bytearray()
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                body += self.rfile.read(n)
                self.rfile.readline()
                if n == 0:
                    break
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        dest = Path(self.translate_path(self.path))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(bytes(body))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_upload_over_http_and_through_a_pipe_then_stage_and_read_it(synth_root, serve, tmp_path, capsys):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    url = serve(bucket, PutHandler)
    assert data_main(["upload", str(synth_root), url, "--source", "digits"]) == 0
    assert data_main(["upload", str(synth_root), url, "--source", "glyphs"]) == 0
    man = json.loads((synth_root / "glyphs" / "manifest.json").read_text())
    n_files = sum(len(sp["shards"]) + 2 for sp in man["splits"].values()) + 2  # + index, classes; spec, manifest
    assert capsys.readouterr().out.splitlines()[-1] == f"uploaded glyphs: {n_files} files -> {url}"
    assert json.loads((bucket / "sources.json").read_text())["sources"] == ["digits", "glyphs"]  # merged
    assert data_main(["verify", url]) == 0
    assert data_main(["info", url]) == 0 and "bilevel" in capsys.readouterr().out
    local = tmp_path / "node-local"
    assert data_main(["stage", url, str(local), "--source", "glyphs"]) == 0
    assert capsys.readouterr().out.strip() == f"staged glyphs -> {local / 'glyphs'}"
    assert data_main(["verify", str(local)]) == 0
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert data_main(["episodes", str(synth_root), "--source", "glyphs", "-n", "5", "-o", str(a)]) == 0
    assert data_main(["episodes", str(local), "--source", "glyphs", "-n", "5", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()

    piped = tmp_path / "piped"
    target = f'pipe:mkdir -p "$(dirname {piped}/{{shard}})" && cat > {piped}/{{shard}}'
    assert data_main(["upload", str(synth_root), target, "--source", "digits"]) == 0
    assert json.loads((piped / "sources.json").read_text())["sources"] == ["digits"]
    assert data_main(["verify", serve(piped)]) == 0
    assert data_main(["upload", str(synth_root), "pipe:false {shard}", "--source", "digits"]) == 2
    assert "upload of" in capsys.readouterr().err
