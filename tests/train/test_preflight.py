"""First contact: a run that cannot start says why in one line, exit 2, before Ray starts or ranks spawn;
a run never leaves (or trusts) a half-written file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smat_dist.export import read_export
from smat_dist.record import MetricsLog, read_rows
from smat_dist.train.checkpoint import META_FILE, CheckpointError, find_latest, inspect, scan
from smat_dist.train.distributed import Runtime
from smat_dist.train.launch import run
from smat_dist.weightsfile import WeightsError, check_weights_file

from .conftest import REPO, TINY, assert_same, tiny_run_config

pytestmark = pytest.mark.timeout(600)


def smat_train(out: Path, *extra: str, module: str = "smat_dist.train.cli") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", module, "--config", str(REPO / "configs" / "smat.yaml"), *TINY,
           "train.tasks_per_step=2", "train.max_steps=2", f"train.output_dir={out}", "train.run_name=r", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """A finished single-process run (checkpoints at steps 1 and 2, export)."""
    out = tmp_path_factory.mktemp("local")
    run(tiny_run_config(out, "done", "train.tasks_per_step=2", "train.max_steps=2", "train.checkpoint_every=1"),
        Runtime("local"))
    return out / "done"


@pytest.mark.parametrize("damage", ["empty", "no_sidecar", "torn_sidecar", "torn_pt"])
def test_bad_resume_from_is_one_line_naming_the_file_within_seconds(damage, local_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    if damage == "empty":
        ckpt.mkdir()
        needle = f"{ckpt}: not a smat-dist checkpoint (no {META_FILE})"
    else:
        shutil.copytree(find_latest(local_run), ckpt)
        if damage == "no_sidecar":
            (ckpt / META_FILE).unlink()
            needle = f"no {META_FILE}"
        elif damage == "torn_sidecar":
            text = (ckpt / META_FILE).read_text()
            (ckpt / META_FILE).write_text(text[: len(text) // 2])
            needle = f"{ckpt / META_FILE}: unreadable checkpoint sidecar"
        else:
            pt = next(ckpt.rglob("*.pt"))
            pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
            needle = f"{pt}: truncated or corrupt"
    t0 = time.perf_counter()
    proc = smat_train(tmp_path, f"dist.resume_from={ckpt}", module="smat_dist.train")
    elapsed = time.perf_counter() - t0
    assert_one_line_error(proc, needle)
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert not (tmp_path / "r" / "checkpoint_step_00000001").exists()  # nothing started


def test_ray_launcher_checks_before_ray_starts(tmp_path):
    t0 = time.perf_counter()
    proc = smat_train(tmp_path, f"dist.resume_from={tmp_path / 'nowhere'}")
    assert_one_line_error(proc, f"{tmp_path / 'nowhere'}: no such checkpoint directory")
    assert time.perf_counter() - t0 < 5.0
    assert "Ray" not in proc.stdout + proc.stderr  # no cluster was started


def test_missing_or_truncated_backbone_weights(local_run, tmp_path):
    proc = smat_train(tmp_path, f"model.backbone.checkpoint={tmp_path / 'dino.pth'}", module="smat_dist.train")
    assert_one_line_error(proc, "model.backbone.checkpoint: no such file", str(tmp_path / "dino.pth"))
    torn = tmp_path / "backbone.safetensors"
    data = (local_run / "model.safetensors").read_bytes()
    torn.write_bytes(data[: len(data) - 100])
    proc = smat_train(tmp_path, f"model.backbone.checkpoint={torn}", module="smat_dist.train")
    assert_one_line_error(proc, f"{torn}: truncated safetensors file")


def test_weights_file_checks_read_headers_only(local_run, tmp_path):
    check_weights_file(local_run / "model.safetensors", "x")  # whole: passes
    for cut in (4, 100, 5000):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes((local_run / "model.safetensors").read_bytes()[:cut])
        with pytest.raises(WeightsError, match=str(p)):
            check_weights_file(p, "x")


def test_a_run_whose_checkpoints_are_all_broken_refuses_to_start_afresh(local_run, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(local_run, run_dir)
    for d in run_dir.glob("checkpoint_step_*"):
        (d / META_FILE).write_text("{")
    latest, broken = scan(run_dir)
    assert latest is None and len(broken) == 2
    proc = smat_train(tmp_path, module="smat_dist.train")
    assert_one_line_error(proc, "no complete checkpoint to resume from", "remove")


def test_worker_error_is_one_line_with_the_traceback_in_the_run_log(tmp_path):
    proc = smat_train(tmp_path, "debug.fault_at_step=1", module="smat_dist.train")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "InjectedFault: injected fault" in lines[0] and "train.log" in lines[0], proc.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "_fault_hook" in log


def test_a_damaged_export_is_rewritten_when_the_finished_run_is_run_again(local_run, tmp_path):
    shutil.copytree(local_run, tmp_path / "done")
    export = tmp_path / "done" / "model.safetensors"
    good = {k: v.clone() for k, v in read_export(export)[0].items()}  # not views of the file we damage
    export.write_bytes(export.read_bytes()[: export.stat().st_size // 3])
    run(tiny_run_config(tmp_path, "done", "train.tasks_per_step=2", "train.max_steps=2", "train.checkpoint_every=1"),
        Runtime("local"))
    assert_same(read_export(export)[0], good)  # rebuilt from the final checkpoint
    assert [r["step"] for r in read_rows(tmp_path / "done" / "metrics.jsonl")] == [1, 2]


def test_torn_metrics_line_is_cut_on_resume_and_skipped_by_readers(tmp_path, caplog):
    from smat_dist.sweep.report import read_training

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "sparsity_test": [0.5]}, {"step": 2, "sparsity_test": [0.7]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "spar')
    assert [r["step"] for r in read_rows(path)] == [1, 2]
    assert "torn metrics line" in caplog.text
    assert read_training(tmp_path) == {"steps": 2, "sparsity_reached": 0.7, "sparsity_train": None}
    MetricsLog(path).truncate_after(1)
    assert path.read_text() == json.dumps(rows[0]) + "\n"


def test_inspect_names_a_missing_engine_file(local_run, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(find_latest(local_run), ckpt)
    meta = inspect(ckpt)
    (ckpt / meta.tag / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=f"{ckpt / meta.tag / 'state.pt'}: missing"):
        inspect(ckpt)


@pytest.mark.parametrize("module", ["smat_dist.train.cli", "smat_dist.train"])
def test_a_missing_data_root_is_one_line_before_anything_starts(module, tmp_path):
    t0 = time.perf_counter()
    proc = smat_train(tmp_path, "data.episodes=shards", "data.image_size=16", f"data.root={tmp_path / 'md'}",
                      module=module)
    assert_one_line_error(proc, str(tmp_path / "md"))
    assert time.perf_counter() - t0 < 5.0
    assert not (tmp_path / "r" / "train.log").exists()


def test_a_resume_under_another_model_is_refused_in_preflight_and_leaves_the_run_alone(local_run, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(local_run, run_dir)
    before = (run_dir / "run_config.yaml").read_text()
    assert "num_experts: 8" in before
    t0 = time.perf_counter()
    proc = smat_train(tmp_path, "model.gates.num_experts=3", module="smat_dist.train")
    elapsed = time.perf_counter() - t0
    assert_one_line_error(proc, "written with model.gates.num_experts=8, this run has model.gates.num_experts=3")
    assert elapsed < 15.0, f"{elapsed:.1f} s"
    assert (run_dir / "run_config.yaml").read_text() == before  # the refused settings were not recorded


def test_an_output_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = smat_train(tmp_path, f"train.output_dir={tmp_path / 'file' / 'runs'}")
    assert_one_line_error(proc, f"{tmp_path / 'file'} is a file, not a directory", "train.output_dir")
