"""Remote reads that cannot hang or escape: servers on 127.0.0.1 that never answer, stall half-way or
redirect elsewhere; manifests whose names and checksums point outside their root; pipe: roots refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from smat_dist.data.cache import Ref, ShardCache
from smat_dist.data.cli import main as data_main
from smat_dist.data.config import DataConfig, RemoteConfig
from smat_dist.data.store import DataError
from smat_dist.errors import ConfigError

from .conftest import QuietHandler

FAST = RemoteConfig(connect_timeout_s=1.0, stall_timeout_s=1.0, file_timeout_s=5.0, attempts=2, retry_backoff_s=0.1)
FAST_SET = ["--set", "remote.connect_timeout_s=1", "--set", "remote.stall_timeout_s=1", "--set", "remote.attempts=2",
            "--set", "remote.retry_backoff_s=0.1"]


@contextmanager
def silent_server():
    """Accepts connections on 127.0.0.1 and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    conns, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        srv.close()


class StallingTars(QuietHandler):
    """Serves every file, except that a .tar stops after its first 64 KiB and then says nothing."""

    release = threading.Event()

    def copyfile(self, source, outputfile):
        if not self.path.endswith(".tar"):
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(64 << 10))
        outputfile.flush()
        StallingTars.release.wait(30)


def _refs(root, url, source, split):
    man = json.loads((root / source / "manifest.json").read_text())
    return [Ref(f"{url}/{source}/{sh['path']}", sh["sha256"], sh["bytes"], sh["path"])
            for sh in man["splits"][split]["shards"]]


def test_silent_server_fails_verify_and_reads_within_the_deadline(capsys, tmp_path):
    with silent_server() as url:
        t0 = time.monotonic()
        assert data_main(["verify", url, *FAST_SET]) == 2
        took = time.monotonic() - t0
        err = capsys.readouterr().err.strip().splitlines()
        # two attempts of 1 s plus 0.1 s backoff (and the command's imports); never "forever"
        assert took < 10, took
        assert len(err) == 1 and f"{url}/sources.json" in err[0] and "data.remote.connect_timeout_s" in err[0]
        cache = ShardCache(tmp_path / "cache", 1 << 30, limits=FAST)
        ref = Ref(f"{url}/s/train/shard-000000.tar", "a" * 64, 1000, "train/shard-000000.tar")
        t0 = time.monotonic()
        with pytest.raises(DataError) as err:
            cache.fetch(ref)
        assert time.monotonic() - t0 < 5 and str(err.value).startswith(f"{ref.url}: no answer within 1s")
        assert "(2 attempts)" in str(err.value) and "\n" not in str(err.value)
        assert not any((tmp_path / "cache" / "partial").iterdir()) and cache.usage() == 0


def test_training_command_against_a_silent_server_exits_2_naming_the_url(tmp_path):
    """The whole command line: preflight reads sources.json from the silent server and gives up."""
    with silent_server() as url:
        t0 = time.monotonic()
        r = subprocess.run(  # smat-train: preflight runs before Ray starts
            [sys.executable, "-c", "import sys; from smat_dist.train.cli import main; sys.exit(main())",
             "--config", "configs/demo/smat.yaml", f"data.root={url}", "model.backbone.checkpoint=null",
             f"train.output_dir={tmp_path}", "data.remote.connect_timeout_s=1", "data.remote.attempts=1"],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        took = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"{url}/sources.json" in lines[0] and "no answer within 1s" in lines[0] and "Traceback" not in r.stderr
    assert took < 60


def test_stalled_shard_is_abandoned_and_its_partial_file_removed(synth_root, serve, tmp_path, capsys):
    StallingTars.release.clear()
    url = serve(synth_root, StallingTars)
    try:
        ref = _refs(synth_root, url, "digits", "test")[0]
        cache = ShardCache(tmp_path / "cache", 1 << 30, limits=FAST)
        seen = []

        def watch():  # the partial file exists while bytes arrive, and is gone afterwards
            while not done.is_set():
                seen.extend(p.stat().st_size for p in (tmp_path / "cache" / "partial").glob("*.part"))
                time.sleep(0.05)

        done = threading.Event()
        w = threading.Thread(target=watch, daemon=True)
        w.start()
        t0 = time.monotonic()
        with pytest.raises(DataError) as err:
            cache.fetch(ref)
        done.set()
        w.join()
        assert time.monotonic() - t0 < 6
        assert str(err.value) == f"{ref.url}: no data for 1s (data.remote.stall_timeout_s) (2 attempts)"
        # bytes did arrive before the stall (up to the 64 KiB sent; the last read may still be in a buffer)...
        assert 0 < max(seen) <= 64 << 10
        assert not any((tmp_path / "cache" / "partial").iterdir()) and cache.usage() == 0  # ...and were removed
        # the streaming reader (verify of a URL root) gives up the same way, naming the shard
        assert data_main(["verify", url, "--source", "digits", *FAST_SET]) == 1
        err = capsys.readouterr().err
        n_tars = len(_refs(synth_root, url, "digits", "test"))
        assert f"{ref.url}: no data for 1s" in err and err.count("FAIL") == n_tars == err.count("no data for 1s")
        # a loader read: the episode command that materialises pixels fails in one line
        assert data_main(["show", url, "--source", "digits", "-o", str(tmp_path / "e.png"),
                          "--set", f"cache_dir={tmp_path / 'cache2'}", *FAST_SET]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no data for 1s" in err[0] and f"{url}/digits/test/shard-" in err[0]
        assert not any((tmp_path / "cache2" / "partial").iterdir())
    finally:
        StallingTars.release.set()


def test_retry_resumes_a_cut_stream_and_the_bytes_are_whole(synth_root, serve, tmp_path):
    from smat_dist.data.location import open_url

    class CutOnce(QuietHandler):
        seen = set()

        def copyfile(self, source, outputfile):
            data = source.read()
            if self.path not in CutOnce.seen:
                CutOnce.seen.add(self.path)
                outputfile.write(data[: len(data) // 3])
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            outputfile.write(data)

    url = serve(synth_root, CutOnce)
    ref = _refs(synth_root, url, "glyphs", "train")[0]
    with open_url(ref.url, FAST) as f:
        data = f.read()
        assert f.retries == 1
    assert data == (synth_root / "glyphs" / ref.name).read_bytes()


class Redirect(QuietHandler):
    """Answers every GET with a 302 to ``target`` + the same path."""

    target = ""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", type(self).target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_redirects_follow_the_same_host_only_unless_allowed(synth_root, serve, tmp_path, capsys):
    from smat_dist.data.curl import redirect_allowed
    from smat_dist.data.location import open_url

    real = serve(synth_root)  # another port of 127.0.0.1: another host
    elsewhere = type("ToReal", (Redirect,), {"target": real})
    hop = serve(synth_root, elsewhere)
    rel = "glyphs/manifest.json"
    with pytest.raises(OSError) as err:
        open_url(f"{hop}/{rel}", FAST).read()
    msg = str(err.value)
    assert msg.startswith(f"{hop}/{rel}: redirect (302) to {real}/{rel} refused") and "attempts" not in msg
    assert data_main(["verify", hop, "--source", "glyphs"]) == 1
    assert f"FAIL glyphs: {hop}/{rel}: unreadable manifest (redirect (302) to {real}/{rel} refused" in \
        capsys.readouterr().err
    anywhere = RemoteConfig(redirects="any")
    assert open_url(f"{hop}/{rel}", anywhere).read() == (synth_root / rel).read_bytes()
    assert data_main(["verify", hop, "--source", "glyphs", "--set", "remote.redirects=any"]) == 0
    # a same-host redirect (a relative Location) is followed; "none" refuses it too
    same = type("ToSame", (Redirect,), {"do_GET": lambda self: (
        QuietHandler.do_GET(self) if self.path.startswith("/real") else Redirect.do_GET(self)), "target": "/real"})
    os.symlink(synth_root, tmp_path / "real")
    here = serve(tmp_path, same)
    assert open_url(f"{here}/{rel}", FAST).read() == (synth_root / rel).read_bytes()
    with pytest.raises(OSError, match="data.remote.redirects=none follows none"):
        open_url(f"{here}/{rel}", RemoteConfig(redirects="none")).read()
    # what "host" means: scheme, host as written, port
    assert redirect_allowed("http://a:80/x", "http://a/y", "same_host")
    assert not redirect_allowed("http://127.0.0.1:8000/x", "http://localhost:8000/x", "same_host")
    assert not redirect_allowed("https://a/x", "http://a/x", "same_host")
    assert not redirect_allowed("http://a/x", "file:///etc/passwd", "any")
    with pytest.raises(ConfigError, match="data.remote.redirects must be one of"):
        DataConfig(root=str(synth_root), remote=RemoteConfig(redirects="all")).validate()


def _evil_copy(synth_root, tmp_path, edit):
    root = tmp_path / "root"
    shutil.copytree(synth_root / "digits", root / "digits")
    mp = root / "digits" / "manifest.json"
    man = json.loads(mp.read_text())
    edit(man["splits"]["test"]["shards"][0])
    mp.write_text(json.dumps(man))
    (root / "sources.json").write_text(json.dumps({"format": "smat-dist-wds", "version": 1, "sources": ["digits"]}))
    return root


def test_traversal_in_a_manifest_is_refused_and_nothing_is_written_outside(synth_root, serve, make_cfg, tmp_path,
                                                                          capsys):
    from smat_dist.data.builder import EpisodeBuilder

    escape = tmp_path / "escape"
    evil_sha = "../" * 12 + str(escape / "known").lstrip("/")
    root = _evil_copy(synth_root, tmp_path, lambda sh: sh.update(sha256=evil_sha))
    url = serve(root)
    man_url = f"{url}/digits/manifest.json"
    cache = tmp_path / "cache"
    before = set(tmp_path.iterdir())
    for r in (url, str(root)):
        with pytest.raises(DataError) as err:
            EpisodeBuilder(make_cfg(r, cache_dir=str(cache), remote=FAST), "test", seed=0, sources=["digits"]).build(0)
        msg = str(err.value)
        where = man_url if r == url else str(root / "digits" / "manifest.json")
        assert msg.startswith(f"{where}: field splits.test.shards[0].sha256: not 64 lowercase hex digits")
        assert "\n" not in msg
        assert data_main(["verify", r]) == 1
        assert "field splits.test.shards[0].sha256" in capsys.readouterr().err
    # the cache itself refuses such a name even when handed one directly
    with pytest.raises(DataError, match="malformed"):
        ShardCache(cache, 1 << 30, limits=FAST).fetch(Ref(f"{url}/digits/x.tar", evil_sha, 10, "x.tar"))
    assert not escape.exists() and set(tmp_path.iterdir()) - before <= {cache}
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".part"]


def test_shard_path_outside_the_root_is_one_line(synth_root, make_cfg, tmp_path, capsys):
    from smat_dist.data.store import check_root

    root = _evil_copy(synth_root, tmp_path, lambda sh: sh.update(path="../../../x"))
    r = subprocess.run([sys.executable, "-m", "smat_dist.data.cli", "episodes", str(root), "--source", "digits",
                        "-n", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "field splits.test.shards[0].path: not a relative path inside the source" in r.stderr
    with pytest.raises(DataError, match=r"shards\[0\].path"):
        check_root(make_cfg(root), "test", ["digits"])
    for i, bad in enumerate(("/etc/passwd", "test\\..\\..\\x")):
        root2 = _evil_copy(synth_root, tmp_path / str(i), lambda sh, b=bad: sh.update(path=b))
        with pytest.raises(DataError, match=r"shards\[0\].path"):
            check_root(make_cfg(root2), "test", ["digits"])


def test_pipe_roots_can_be_refused_by_config_and_by_environment(synth_root, make_cfg, monkeypatch, capsys):
    root = f"pipe:cat {synth_root}/{{shard}}"
    assert make_cfg(root).remote.allow_pipe  # allowed by default
    with pytest.raises(ConfigError, match=r"data.root: 'pipe:cat .*': pipe: roots run a command and are refused "
                                          r"\(data.remote.allow_pipe=false\)"):
        make_cfg(root, remote=RemoteConfig(allow_pipe=False))
    assert data_main(["episodes", root, "--source", "digits", "-n", "1", "--set", "remote.allow_pipe=false"]) == 2
    assert "allow_pipe=false" in capsys.readouterr().err
    monkeypatch.setenv("SMAT_DATA_ALLOW_PIPE", "0")  # an operator's policy: no config re-enables it
    with pytest.raises(ConfigError, match="SMAT_DATA_ALLOW_PIPE=0 in the environment"):
        make_cfg(root, remote=RemoteConfig(allow_pipe=True))
    assert data_main(["verify", root, "--source", "digits"]) == 2
    assert data_main(["upload", str(synth_root), "pipe:cat > /dev/null {shard}", "--source", "digits"]) == 2
    assert "SMAT_DATA_ALLOW_PIPE" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("connect_timeout_s", 0), ("stall_timeout_s", -1), ("file_timeout_s", "inf"),
                                       ("attempts", 0), ("retry_backoff_s", -0.5)])
def test_remote_settings_are_checked_at_load(key, value):
    from smat_dist.config import load_config

    with pytest.raises(ConfigError, match=f"data.remote.{key}"):
        load_config(DataConfig, [], [f"remote.{key}={value}"])
