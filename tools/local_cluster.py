#!/usr/bin/env python
"""A multi-node Ray cluster on one machine, and the node-loss scenario run against it.

    python tools/local_cluster.py e2e --data-root http://127.0.0.1:8000/ --storage /shared/runs [--workdir DIR]

(``tools/cluster_e2e.sh`` runs it against a synthetic benchmark it serves itself.) The cluster is a head that
offers no CPUs for training plus worker nodes of one CPU each, every node started with ``ray start --block``
in its own session (stopped by killing its process group, never with ``ray stop``, which would stop every
Ray on the machine) with its own free ports, its own node-local shard cache and token authentication on,
with a token generated for this cluster alone (the user's ``~/.ray/auth_token`` is not touched).

Per-node caches: each node's processes see ``SMAT_NODE_CACHE=<workdir>/nodes/<node>/cache`` in their
environment and the run sets ``data.cache_dir=$SMAT_NODE_CACHE``; the shard cache expands variables on the
node that opens it, so each node fills its own. On a real cluster set the variable in the node's
environment (or give every node the same local path).

The scenario (:func:`node_loss_e2e`): a short run submitted with ``ray job submit``; then the same run
again, halted right after a checkpoint (``debug.halt_at_step``), one worker node killed (kill -9 of its
whole process group), a fresh node started; the job must finish from that checkpoint with metrics rows
1..N once each and the same final parameters. ``DATA_ROOT`` and ``STORAGE`` are plain settings (an HTTP or
object-storage URL, a shared directory or a ``s3://`` run store), so the same scenario runs on either.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A tiny SMAT (1-block ViT at 32 px) on the demo's protocol: seconds per step on one CPU.
TINY = ["model.backbone.patch_size=8", "model.backbone.embed_dim=32", "model.backbone.depth=1",
        "model.backbone.num_heads=2", "model.backbone.checkpoint=null", "data.num_actors=1", "data.max_in_flight=2"]
# Faster failure detection than Ray's production defaults (a lost node is declared dead after ~3 s, not ~30 s).
FAST_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                  "RAY_health_check_failure_threshold": "3", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                  "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_port_args() -> List[str]:
    """Every per-node listener on its own free port: the defaults collide between nodes on one machine."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    cache: Path
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> List[int]:
        """Every live process of this node: those whose environment carries this node's cache variable
        (only this node's processes have it), whatever process group they moved to."""
        needle = f"SMAT_NODE_CACHE={self.cache}".encode() + b"\0"
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if needle in (d / "environ").read_bytes() + b"\0":
                        out.append(int(d.name))
                except OSError:
                    continue
        return out

    def kill(self) -> int:
        """kill -9 of every process of the node (raylet, object store, agents, its Ray workers): its process
        group, then any of its processes that left the group. Returns how many had left it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        strays = self.pids()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(strays)


@dataclass
class LocalCluster:
    """``with LocalCluster(workdir) as c: c.start_head(); c.add_worker("w1"); ...`` (every node killed on exit)."""

    workdir: Path
    base_env: Dict[str, str] = field(default_factory=dict)
    object_store_mb: int = 100
    nodes: Dict[str, Node] = field(default_factory=dict)
    gcs_port: int = 0
    dashboard_port: int = 0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ray's AF_UNIX socket paths must stay < 108 bytes: a short temp dir of its own
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rlc", dir="/tmp"))
        self.token_path = self.workdir / "auth" / ".ray" / "auth_token"

    # ----------------------------------------------------------------------------------- environment
    def env(self, **extra: str) -> Dict[str, str]:
        """The environment of every node and client of this cluster: token auth with this cluster's token."""
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(key, None)
        env.update(PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE", DS_ACCELERATOR="cpu", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   # "0" (set by the single-node tests and ray_session) makes `ray start --address` refuse to join
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
        env.update(self.base_env)
        env.update(extra)
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _generate_token(self) -> None:
        """``ray get-auth-token --generate`` writes ``$HOME/.ray/auth_token``: run it with a private HOME."""
        if self.token_path.exists():
            return
        env = self.env(HOME=str(self.token_path.parent.parent))
        env.pop("RAY_AUTH_TOKEN_PATH")
        out = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0 or not self.token_path.exists():
            raise RuntimeError(f"ray get-auth-token --generate failed: {out.stdout}{out.stderr}")
        self.token_path.chmod(0o600)

    # ----------------------------------------------------------------------------------- nodes
    def _start(self, name: str, args: Sequence[str]) -> Node:
        node_dir = self.workdir / "nodes" / name
        cache = node_dir / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        log = node_dir / "ray-start.log"
        env = self.env(SMAT_NODE_CACHE=str(cache), **FAST_DETECTION)
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", f"--object-store-memory={self.object_store_mb << 20}",
                                 *node_port_args(), *args],
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=node_dir)
        node = Node(name, proc, cache, log)
        self.nodes[name] = node
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if not node.alive or time.time() > deadline:
                raise RuntimeError(f"node {name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        return node

    def start_head(self) -> Node:
        self._generate_token()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        return self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                    f"--temp-dir={self.temp_dir}"])

    def add_worker(self, name: str, cpus: int = 1) -> Node:
        return self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}"])

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- jobs
    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def submit(self, job_id: str, entrypoint: Sequence[str]) -> None:
        """``ray job submit --no-wait`` of ``entrypoint`` with the project's shipped runtime env
        (``cluster/runtime_env.yaml``: this checkout as the working directory), as the docs tell users."""
        cmd = ["job", "submit", "--address", self.dashboard, "--submission-id", job_id, "--no-wait",
               "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint]
        deadline = time.time() + 120  # the head's job agent answers a few seconds after `ray start`
        while True:
            out = self.ray(*cmd)
            if out.returncode == 0:
                return
            if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
                raise RuntimeError(f"ray job submit failed: {out.stdout}{out.stderr}")
            time.sleep(2)

    def _api(self, path: str) -> dict:
        """GET the dashboard's job REST API with this cluster's token (cheaper than a CLI per poll)."""
        import urllib.request

        req = urllib.request.Request(f"{self.dashboard}{path}",
                                     headers={"authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def job_status(self, job_id: str) -> str:
        return str(self._api(f"/api/jobs/{job_id}").get("status", "unknown")).lower()

    def job_logs(self, job_id: str) -> str:
        return str(self._api(f"/api/jobs/{job_id}/logs").get("logs", ""))

    def wait_job(self, job_id: str, timeout: float = 600) -> str:
        deadline, status = time.time() + timeout, "unknown"
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in ("succeeded", "failed", "stopped"):
                return status
            time.sleep(1)
        return status


# --------------------------------------------------------------------------------------- the scenario
def metrics_steps(run_dir: Path) -> List[int]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a line being written
    return out


def is_uri(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def run_file(storage: str, run: str, rel: str) -> Path:
    """A local copy (object storage) or the path (a shared directory) of ``rel`` of run ``run``."""
    if is_uri(storage):
        from smat_dist.runstore import fetch_run_file

        return fetch_run_file(f"{storage.rstrip('/')}/{run}", rel)
    return Path(storage) / run / rel


def train_entrypoint(run_name: str, *, data_root: str, storage: str, steps: int, every: int, staging: str,
                     extra: Sequence[str] = ()) -> List[str]:
    return ["smat-train", "--config", "configs/demo/smat.yaml", *TINY, f"data.root={data_root}",
            "data.cache_dir=$SMAT_NODE_CACHE", f"dist.storage_path={storage}", f"dist.staging_dir={staging}",
            f"train.run_name={run_name}",
            "dist.num_workers=2", "dist.cpus_per_worker=1", "train.tasks_per_step=2", f"train.max_steps={steps}",
            f"train.checkpoint_every={every}", "train.log_every=1", "train.keep_checkpoints=0", *extra]


def max_param_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the trainable tensors of two exports."""
    from smat_dist.export import read_export

    ta, _ = read_export(a)
    tb, _ = read_export(b)
    if ta.keys() != tb.keys():
        raise AssertionError(f"exports hold different tensors: {sorted(ta.keys() ^ tb.keys())}")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if not k.startswith("backbone."))


def node_loss_e2e(workdir: Path, *, data_root: str, storage: str, steps: int = 6, every: int = 2, halt: int = 4,
                  say=print) -> dict:
    """The scenario of the module docstring; returns what it measured. ``storage`` must be a path every node
    sees (all nodes of this cluster are on this machine) or an object-storage URL the nodes can reach. With
    object storage, the ranks' node-local staging directory (``dist.staging_dir``) is one directory of this
    machine for every node, so the scenario can watch rank 0's progress (and its halt marker) wherever it
    runs; what the run stored is then read back from the bucket."""
    from smat_dist.runstore import RunStore

    t_all = time.time()
    staging = str(Path(workdir).resolve() / "staging")
    report: dict = {}
    with LocalCluster(Path(workdir)) as cluster:
        t0 = time.time()
        cluster.start_head()
        first = cluster.add_worker("w1")
        cluster.add_worker("w2")
        report["cluster_start_s"] = time.time() - t0
        say(f"cluster: head (0 CPUs) + w1 + w2 (1 CPU each) up in {report['cluster_start_s']:.1f} s; "
            f"dashboard {cluster.dashboard}")

        t0 = time.time()
        cluster.submit("clean", train_entrypoint("clean", data_root=data_root, storage=storage, steps=steps,
                                                 every=every, staging=staging))
        status = cluster.wait_job("clean")
        report["clean_s"] = time.time() - t0
        if status != "succeeded":
            raise RuntimeError(f"the uninterrupted run ended {status}:\n{cluster.job_logs('clean')[-4000:]}")
        say(f"uninterrupted run: {steps} steps in {report['clean_s']:.1f} s")

        run_dir = RunStore(storage, "lossy", staging).local  # where rank 0 writes (= the run dir if shared)
        t0 = time.time()
        cluster.submit("lossy", train_entrypoint("lossy", data_root=data_root, storage=storage, steps=steps,
                                                 every=every, staging=staging, extra=["dist.max_failures=1",
                                                                     f"debug.halt_at_step={halt}"]))
        marker = run_dir / f".halted_at_step_{halt}"
        deadline = time.time() + 400
        while not marker.exists():
            if time.time() > deadline or cluster.job_status("lossy") in ("succeeded", "failed", "stopped"):
                raise RuntimeError(f"the run never reached step {halt}:\n{cluster.job_logs('lossy')[-4000:]}")
            time.sleep(0.5)
        t_kill = time.time()
        report["strays_killed"] = first.kill()  # a whole worker node lost after the checkpoint of step `halt`
        say(f"step {halt} checkpointed; worker node w1 killed (kill -9 of its process group)")
        cluster.add_worker("w3")
        report["replacement_node_s"] = time.time() - t_kill
        say(f"fresh worker node w3 joined {report['replacement_node_s']:.1f} s after the kill")
        while halt + 1 not in metrics_steps(run_dir) or max(metrics_steps(run_dir)) <= halt:
            if time.time() > deadline + 200 or cluster.job_status("lossy") in ("failed", "stopped"):
                raise RuntimeError(f"the run did not recover:\n{cluster.job_logs('lossy')[-4000:]}")
            time.sleep(0.3)
        report["recovery_s"] = time.time() - t_kill
        status = cluster.wait_job("lossy")
        report["lossy_total_s"] = time.time() - t0
        logs = cluster.job_logs("lossy")
        if status != "succeeded":
            raise RuntimeError(f"the run with a lost node ended {status}:\n{logs[-4000:]}")
        # what the run stored (read back from the bucket for object storage)
        log = run_file(storage, "lossy", "train.log").read_text(errors="replace")  # rank 0's lines, any node
        report["resumed_line"] = next((ln for ln in log.splitlines() if "resumed from" in ln), "")
        report["steps"] = metrics_steps(run_file(storage, "lossy", "metrics.jsonl").parent)
        report["max_param_diff"] = max_param_diff(run_file(storage, "clean", "model.safetensors"),
                                                  run_file(storage, "lossy", "model.safetensors"))
        report["node_caches"] = {name: sum(1 for _ in (n.cache / "objects").rglob("*") if _.is_file())
                                 if (n.cache / "objects").exists() else 0 for name, n in cluster.nodes.items()}
    report["total_s"] = time.time() - t_all
    say(f"recovery: {report['recovery_s']:.1f} s from the kill to the first new step (step {halt + 1}); "
        f"{report['resumed_line'].strip()}")
    say(f"metrics steps {report['steps']}; max |Δparam| vs the uninterrupted run {report['max_param_diff']:.3g}")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e2e = sub.add_parser("e2e", help="the node-loss scenario (see the module docstring)")
    e2e.add_argument("--data-root", required=True, help="data.root every node reads (http(s)://, s3://, ...)")
    e2e.add_argument("--storage", required=True, help="dist.storage_path (a directory every node sees, or s3://...)")
    e2e.add_argument("--workdir", default=None, help="node logs and caches (default: a new temporary directory)")
    e2e.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="smat-cluster-"))
    report = node_loss_e2e(workdir, data_root=args.data_root, storage=args.storage, steps=args.steps)
    ok = report["steps"] == list(range(1, args.steps + 1)) and report["max_param_diff"] <= 1e-6
    print(json.dumps({k: v for k, v in report.items() if k != "resumed_line"}, indent=1))
    print(f"node-loss e2e: {'PASS' if ok else 'FAIL'}; recovery {report['recovery_s']:.1f} s; node logs in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
