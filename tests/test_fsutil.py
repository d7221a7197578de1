"""Crash-safe writes: the target is the old or the whole new content, never a temporary."""

from __future__ import annotations

import json

import pytest

from smat_dist.fsutil import atomic_write_json, atomic_write_text, publish


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
