"""Crash-safe writes: the target is the old or the whole new content, never a temporary; JSON reads
that fail in one line naming the file."""

from __future__ import annotations

import json
import os

import pytest

from smat_dist.fsutil import atomic_write_json, atomic_write_text, publish, read_json


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    p = tmp_path / "a" / "run_config.yaml"
    atomic_write_text(p, "old\n")
    atomic_write_text(p, "new\n")
    assert p.read_text() == "new\n"
    atomic_write_json(tmp_path / "s.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(x.name for x in tmp_path.rglob("*") if x.is_file()) == ["run_config.yaml", "s.json"]


def test_publish_renames_a_finished_directory_over_the_target(tmp_path):
    final = tmp_path / "checkpoint_step_00000002"
    final.mkdir()
    (final / "stale").write_text("x")
    partial = tmp_path / "checkpoint_step_00000002.partial"
    (partial / "step_00000002").mkdir(parents=True)
    (partial / "step_00000002" / "state.pt").write_bytes(b"PK")
    publish(partial, final)
    assert not partial.exists() and not (final / "stale").exists()
    assert (final / "step_00000002" / "state.pt").read_bytes() == b"PK"


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "model.json"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("smat_dist.fsutil.os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"


def test_read_json_names_the_missing_or_broken_file(tmp_path):
    class Bad(Exception):
        pass

    good = atomic_write_json(tmp_path / "spec.json", {"a": [1, 2]})
    assert read_json(good, Bad, "dataset spec") == {"a": [1, 2]}
    with pytest.raises(Bad, match=rf"^dataset spec not found: {tmp_path / 'none.json'}$"):
        read_json(tmp_path / "none.json", Bad, "dataset spec")
    (tmp_path / "torn.json").write_text('{"a": [1,')
    with pytest.raises(Bad, match=rf"^{tmp_path / 'torn.json'}: not valid JSON"):
        read_json(tmp_path / "torn.json", Bad, "dataset spec")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe")
    with pytest.raises(Bad, match="binary.json: not valid JSON"):
        read_json(tmp_path / "binary.json", Bad, "dataset spec")


def test_dir_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    import socket
    import signal
    import subprocess
    import sys

    from smat_dist.fsutil import DirLock, Locked

    with DirLock(tmp_path):
        with pytest.raises(Locked, match=rf"in use by a test \(host {socket.gethostname()}, pid {os.getpid()}, "):
            DirLock(tmp_path, what="a test").__enter__()
    with DirLock(tmp_path):  # released at the end of the with
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from smat_dist.fsutil import DirLock\n"
                               f"l = DirLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Locked) as err:
            DirLock(tmp_path).__enter__()
        assert err.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with DirLock(tmp_path):  # kill -9 released it: no stale lock
        pass
