"""Checkpoints are whole or absent: a kill at any point of a checkpoint write leaves the run resumable
from its last whole checkpoint, by the next attempt alone (no person deleting anything), with metrics
rows 1..N once each and the same final parameters as a run that was never killed. One run per
directory: a second run with the same name is refused in one line naming the holder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smat_dist.train.checkpoint import META_FILE, find_latest, inspect, scan, unfinished

from .conftest import REPO, TINY, assert_same, export_params, tiny_run_config

pytestmark = pytest.mark.timeout(600)

RUN = ["train.tasks_per_step=2", "train.max_steps=4", "train.checkpoint_every=2"]


def local_train(out: Path, name: str, *extra: str, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "smat_dist.train", "--config", str(REPO / "configs" / "smat.yaml"), *TINY, *RUN,
           f"train.output_dir={out}", f"train.run_name={name}", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out)


def steps(run_dir: Path) -> list:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clean_local(tmp_path_factory) -> Path:
    """The reference run, in a process of its own like the runs it is compared with: this process's torch
    state (threads, and whatever earlier tests set) would change the last bits of the parameters."""
    out = tmp_path_factory.mktemp("clean")
    done = local_train(out, "clean")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out / "clean"


# (checkpoint step, kill point, step the retry resumes from): the first checkpoint's write killed before
# its sidecar is written, with the sidecar in the .partial directory, just after it is published; the
# second checkpoint's killed before its sidecar
CASES = [(2, "files", 0), (2, "sidecar", 0), (2, "committed", 2), (4, "files", 2)]


@pytest.mark.parametrize("step,point,resumes", CASES, ids=[f"{s}-{p}" for s, p, _ in CASES])
def test_a_kill_during_a_checkpoint_write_resumes_from_the_last_whole_one(step, point, resumes, clean_local,
                                                                            tmp_path):
    kill = (f"debug.kill_in_checkpoint={step}", f"debug.kill_point={point}")
    first = local_train(tmp_path, "k", *kill)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    run_dir = tmp_path / "k"
    latest, damaged = scan(run_dir)
    assert damaged == []  # an interrupted write is unfinished, not damage that blocks a retry
    assert (inspect(latest).step if latest else 0) == resumes
    # The retry is the same command (a RayJob's or a sweep's automatic retry): the hook fires once.
    second = local_train(tmp_path, "k", *kill)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert (f"at step {resumes}/4" in second.stdout) == (resumes > 0), second.stdout
    assert steps(run_dir) == [1, 2, 3, 4]
    assert_same(export_params(run_dir / "model.safetensors"), export_params(clean_local / "model.safetensors"))
    left = sorted(d.name for d in run_dir.glob("checkpoint_*"))
    assert left == ["checkpoint_step_00000002", "checkpoint_step_00000004"], left  # debris pruned
    assert not any(unfinished(run_dir / d) for d in left)


def test_an_old_zero_byte_sidecar_is_an_unfinished_write_not_a_blocker(clean_local, tmp_path):
    """What the previous version left after a kill during Ray's copy of the first checkpoint."""
    run_dir = tmp_path / "old"
    (run_dir / "checkpoint_2026-12-04_10-00-00.000000").mkdir(parents=True)
    (run_dir / "checkpoint_2026-12-04_10-00-00.000000" / META_FILE).write_bytes(b"")
    assert scan(run_dir) == (None, [])
    proc = local_train(tmp_path, "old")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert steps(run_dir) == [1, 2, 3, 4]
    assert_same(export_params(run_dir / "model.safetensors"), export_params(clean_local / "model.safetensors"))


@pytest.mark.parametrize("step,point,resumes", [(2, "files", 0), (4, "committed", 4)], ids=["2-files", "4-committed"])
def test_ray_worker_killed_during_a_checkpoint_write_restarts_from_the_last_whole_one(step, point, resumes,
                                                                                       two_workers, runs_dir):
    """Rank 0's process dies by SIGKILL inside the checkpoint write; Ray Train restarts the worker group
    (dist.max_failures=1), which resumes from the latest whole checkpoint by the same definition
    preflight uses: after the commit of step 4 that is step 4, whether or not Ray's own record of
    reported checkpoints has caught up."""
    from smat_dist.train.ray_launcher import train

    _, clean = two_workers
    name = f"ray-kill-{step}-{point}"
    cfg = tiny_run_config(runs_dir, name, "dist.num_workers=2", *RUN, "dist.max_failures=1",
                          f"debug.kill_in_checkpoint={step}", f"debug.kill_point={point}")
    res = train(cfg)
    assert (res.run_dir / f".killed_in_checkpoint_{step}_{point}").exists()  # it really died once
    log = (res.run_dir / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    if resumes:
        assert len(resumed) == 1 and f"checkpoint_step_{resumes:08d} at step {resumes}/4" in resumed[0], log
    else:
        assert resumed == [], log
    assert steps(res.run_dir) == [1, 2, 3, 4]
    assert_same(export_params(res.export), export_params(clean.export))
    assert inspect(find_latest(res.run_dir)).step == 4


# ------------------------------------------------------------------------------------------ run lock
def test_a_second_run_with_the_same_name_is_refused_naming_the_holder(tmp_path):
    first = local_train(tmp_path, "same", "debug.halt_at_step=1", wait=False)
    run_dir = tmp_path / "same"
    try:
        deadline = time.time() + 120
        while not (run_dir / ".halted_at_step_1").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        rows_before = (run_dir / "metrics.jsonl").read_text()
        for module in ("smat_dist.train", "smat_dist.train.cli"):  # single process / torchrun, and the Ray driver
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            env["PYTHONPATH"] = str(REPO)
            t0 = time.time()
            second = subprocess.run([sys.executable, "-m", module, "--config", str(REPO / "configs" / "smat.yaml"),
                                     *TINY, *RUN, f"train.output_dir={tmp_path}", "train.run_name=same"],
                                    env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1, second.stderr
            assert f"{run_dir} is in use by another run (host {socket.gethostname()}, pid {first.pid}, started " \
                   in lines[0] and "choose another train.run_name" in lines[0], lines[0]
            assert time.time() - t0 < 30, "refused before Ray or torch start"
        assert (run_dir / "metrics.jsonl").read_text() == rows_before  # the holder's files untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    # kill -9 released the lock with the process: the same command now resumes and finishes
    again = local_train(tmp_path, "same", "debug.halt_at_step=1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps(run_dir) == [1, 2, 3, 4]


def test_a_run_stored_on_object_storage_locks_a_state_file_on_the_driver(tmp_path, monkeypatch):
    from smat_dist.train.runlock import RunLocked, run_lock

    monkeypatch.setenv("SMAT_STATE_DIR", str(tmp_path / "state"))
    with run_lock("s3://bucket/runs/x") as held:
        assert held.path.parent.parent == tmp_path / "state" / "run-locks"
        with pytest.raises(RunLocked, match=r"^s3://bucket/runs/x is in use by another run \(host "):
            run_lock("s3://bucket/runs/x").__enter__()
        with run_lock("s3://bucket/runs/y"):  # another run, another lock
            pass
