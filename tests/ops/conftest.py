"""Fixtures of the ops tests: a real Ray head, a real Prometheus scraping it, a small synthetic benchmark.

Started once per session and shared (each costs seconds): the Prometheus server runs the shipped
``cluster/monitoring/prometheus.yml`` with only its file paths and intervals changed, so discovery
and relabelling are the ones users get.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import yaml

from ..conftest import free_port, ray_head_port_args

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Three sources at half scale: two ID (train/valid/test classes) and one OOD (test only). ~13 s CPU.
SYNTH_SOURCES = ["textures", "doodles", "digits"]
TINY_MODEL = [
    "model.backbone.name=vit_tiny_patch16_224", "model.backbone.patch_size=8", "model.backbone.embed_dim=32",
    "model.backbone.depth=1", "model.backbone.num_heads=2", "model.backbone.pretrained=false",
    "model.optim.warmup_epochs=0",
]


def base_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE")
    # ray.init() earlier in this process sets RAY_AUTH_MODE=token in os.environ; start from a clean shell.
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(key, None)
    env.update(extra)
    return env


@dataclass
class RayHead:
    address: str  # GCS address for RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:port (job submission)
    metrics_port: int
    sd_file: Path  # Ray's Prometheus file-SD list of the cluster's metrics targets
    temp_dir: Path

    def env(self, **extra: str) -> Dict[str, str]:
        """Environment of a driver joining this head (token authentication stays on)."""
        return base_env(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", **extra)


@pytest.fixture(scope="session")
def ray_temp_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="rops", dir="/tmp"))  # AF_UNIX paths must stay < 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(ray_temp_dir, s3_server) -> RayHead:
    """``ray start --head --block`` on 127.0.0.1 with a metrics export port; killed (its process group) at the end.
    The node reaches the session's S3 server the standard way (AWS_* variables of the node, as a cloud node
    has its identity), never through a job's runtime env."""
    ray = BIN / "ray"
    if not ray.exists():
        pytest.skip("the ray CLI is not installed next to python")
    gcs, dash, metrics = free_port(), free_port(), free_port()
    log = (ray_temp_dir / "head.log").open("w")
    env = base_env(RAY_metrics_report_interval_ms="1000", RAY_AUTH_MODE="token",  # Ray's default interval is 10 s
                   **s3_server.env())
    if not (Path.home() / ".ray" / "auth_token").exists():  # a fresh CI box: token auth needs the token first
        gen = subprocess.run([str(ray), "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                             timeout=120)
        assert gen.returncode == 0, gen.stdout + gen.stderr
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}", *ray_head_port_args(),
         "--num-cpus=2", "--object-store-memory=268435456", "--disable-usage-stats", f"--temp-dir={ray_temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", metrics,
                   ray_temp_dir / "prom_metrics_service_discovery.json", ray_temp_dir)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # the SD file lists this node once the dashboard knows it
            assert proc.poll() is None, (ray_temp_dir / "head.log").read_text()[-3000:]
            if head.sd_file.exists() and f"127.0.0.1:{metrics}" in head.sd_file.read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail("Ray head did not come up: " + (ray_temp_dir / "head.log").read_text()[-3000:])
        yield head
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only this head's processes (its own session)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


class Prometheus:
    def __init__(self, url: str, targets_dir: Path):
        self.url = url
        self.targets_dir = targets_dir  # where prometheus_client endpoints announce themselves

    def _get(self, path: str, **params) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> List[dict]:
        return self._get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> List[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def values(self, expr: str) -> Dict[str, float]:
        """Instant query -> {label string: value}."""
        out = {}
        for r in self.query(expr):
            labels = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k != "__name__")
            out[labels] = float(r["value"][1])
        return out

    def wait(self, expr: str, ok: Callable[[Dict[str, float]], bool], timeout: float = 90) -> Dict[str, float]:
        deadline, got = time.time() + timeout, {}
        while time.time() < deadline:
            got = self.values(expr)
            if got and ok(got):
                return got
            time.sleep(1)
        pytest.fail(f"Prometheus never satisfied the check for {expr}; last answer {got}")

    def targets(self) -> List[dict]:
        return self._get("/api/v1/targets")["activeTargets"]


def shipped_prometheus_config(ray_sd_file: Path, targets_dir: Path, interval: str = "1s") -> dict:
    """cluster/monitoring/prometheus.yml with test paths and a short scrape interval."""
    cfg = yaml.safe_load((REPO / "cluster" / "monitoring" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = interval
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["ray"]["file_sd_configs"] = [{"files": [str(ray_sd_file)], "refresh_interval": "2s"}]
    jobs["smat-local"]["file_sd_configs"] = [{"files": [str(targets_dir / "*.json")], "refresh_interval": "2s"}]
    return cfg


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory, ray_temp_dir) -> Prometheus:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("the prometheus server is not installed (Debian: apt-get install prometheus; .ci/run does)")
    work = tmp_path_factory.mktemp("prometheus")
    targets = work / "targets"
    targets.mkdir()
    cfg_path = work / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(shipped_prometheus_config(
        ray_temp_dir / "prom_metrics_service_discovery.json", targets)))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen([exe, f"--config.file={cfg_path}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={work / 'data'}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "Prometheus did not become ready"
            time.sleep(0.3)
        yield Prometheus(url, targets)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("synth_small")
    build_synth(str(root), seed=0, scale=0.5, sources=SYNTH_SOURCES,
                opts=WriteOptions(shard_bytes=1 << 20, tier="native", workers=2, progress=False))
    return root


def run_cli(module: str, args: List[str], env: Dict[str, str], cwd: Path, timeout: float = 600,
            log: Optional[Path] = None) -> subprocess.CompletedProcess:
    """``python -m <module> args`` (the console scripts in the venv may point at another checkout)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    return proc
