"""smat-train as users run it: a killed driver resumes by run name; `ray job submit` to a head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ..conftest import free_port, ray_head_port_args
from .conftest import REPO, TINY

pytestmark = pytest.mark.timeout(900)

BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    # A driver started earlier in this process (ray.init) sets RAY_AUTH_MODE=token in os.environ; a
    # user's fresh shell has neither that nor RAY_ADDRESS.
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    env.update(extra)
    return env


def _train_cmd(out: Path, name: str, *extra: str) -> list:
    return [sys.executable, "-m", "smat_dist.train.cli", "--config", str(REPO / "configs" / "smat.yaml"), *TINY,
            f"train.output_dir={out}", f"train.run_name={name}", *extra]


def _steps(run_dir: Path) -> list:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line)["step"] for line in p.read_text().splitlines() if line.strip()]


def test_killed_driver_resumes_with_the_same_run_name(tmp_path):
    args = ("dist.num_workers=2", "train.tasks_per_step=2", "train.max_steps=300", "train.checkpoint_every=5",
            "dist.local_num_cpus=2")
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_train_cmd(tmp_path, "crash", *args), env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    run_dir = tmp_path / "crash"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpts = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and (p / "smat_checkpoint.json").exists()]
            if ckpts and len(_steps(run_dir)) >= 12:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = max(_steps(run_dir))
    assert 12 <= done_before < 300
    second = subprocess.run(_train_cmd(tmp_path, "crash", *args), env=_env(), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resumed from" in out
    steps = _steps(run_dir)
    assert steps == list(range(1, 301))  # every step once: nothing lost, nothing doubled
    assert (run_dir / "model.safetensors").exists()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="the ray CLI is not installed next to python")
def test_ray_job_submit_to_a_local_head_with_token_auth(tmp_path):
    gcs, dash = free_port(), free_port()
    ray = str(BIN / "ray")
    raytmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # AF_UNIX socket paths must stay < 108 bytes
    home = tmp_path / "home"  # a fresh ~/.ray, as on a new machine
    home.mkdir()
    env = _env(RAY_TMPDIR=str(raytmp), HOME=str(home))
    # The README's first step on a new head: create the cluster token; `ray start` then turns token auth on.
    gen = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    # `--block` in its own session: the test stops exactly this head by its process group. (`ray stop`
    # would kill every Ray on the machine, including this pytest process's own, whose driver then exits.)
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", *ray_head_port_args(), "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={raytmp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not _accepts(dash):
        assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        # Token authentication stays on (Ray's default): the client sends the token.
        submit_env = dict(env, RAY_AUTH_MODE="token")
        address = f"http://127.0.0.1:{dash}"
        runtime_env = json.dumps({"excludes": [".venv", "runs", "data", ".git"]})
        cmd = [ray, "job", "submit", "--address", address, "--submission-id", "smat-job-test", "--no-wait",
               "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
               "smat-train", "--config", "configs/smat.yaml", *TINY, "dist.num_workers=2",
               "train.tasks_per_step=2", "train.max_steps=3", "train.checkpoint_every=3",
               f"train.output_dir={tmp_path / 'out'}", "train.run_name=submitted"]
        deadline = time.time() + 180  # the head's job agent needs a few seconds after `ray start`
        while True:
            sub = subprocess.run(cmd, env=submit_env, capture_output=True, text=True, timeout=300)
            if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        status = ""
        deadline = time.time() + 480
        while time.time() < deadline:
            st = subprocess.run([ray, "job", "status", "--address", address, "smat-job-test"], env=submit_env,
                                capture_output=True, text=True, timeout=60)
            status = st.stdout + st.stderr
            if any(s in status.lower() for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(2)
        logs = subprocess.run([ray, "job", "logs", "--address", address, "smat-job-test"], env=submit_env,
                              capture_output=True, text=True, timeout=60).stdout
        assert "succeeded" in status.lower(), status + logs[-4000:]
        assert "[smat-train] done" in logs
        assert (tmp_path / "out" / "submitted" / "model.safetensors").exists()
        # Token authentication really is on: the same request with a wrong token is refused.
        bad = subprocess.run([ray, "job", "status", "--address", address, "smat-job-test"],
                             env=dict(submit_env, RAY_AUTH_TOKEN="0" * 32), capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "succeeded" not in bad.stdout.lower(), bad.stdout + bad.stderr
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=60)
        shutil.rmtree(raytmp, ignore_errors=True)


def _descendants(root: int) -> set:
    """``root`` and every process below it (Ray's GCS, raylet, dashboard and workers descend from a local
    driver that started them)."""
    children: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int(next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("PPid:")).split()[1])
            except (OSError, StopIteration, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_a_local_two_worker_run_listens_on_loopback_only(tmp_path):
    """While a local 2-worker run trains (halted after a checkpoint so it stays up), no process of it — the
    driver, Ray's own processes, the workers with torch's rendezvous store and gloo — listens on anything
    but 127.0.0.1."""
    args = ("dist.num_workers=2", "train.tasks_per_step=2", "train.max_steps=4", "train.checkpoint_every=2",
            "dist.local_num_cpus=2", "debug.halt_at_step=2")
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(_train_cmd(tmp_path, "ports", *args), env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    try:
        marker = tmp_path / "ports" / ".halted_at_step_2"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), (tmp_path / "run.log").read_text()[-3000:]
        pids = _descendants(proc.pid)
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        ours = [(ln.split()[3], ln.split()[-1]) for ln in out.splitlines() if any(f"pid={p}," in ln for p in pids)]
        assert ours, out  # the run's listeners were found at all
        loopback = ("127.", "[::ffff:127.", "[::1]:")  # IPv4 loopback, also as an IPv4-mapped IPv6 socket
        assert [(a, who) for a, who in ours if not a.startswith(loopback)] == []
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
