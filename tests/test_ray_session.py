"""The one Ray-session helper: a local Ray started by this package listens on loopback only."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Starts Ray the way every entry point of the package does (or plainly, for the control), then lists the
# listening TCP sockets of this process and every process it started (GCS, raylet, dashboard, agents).
PROBE = """
import json, sys, time, psutil
if sys.argv[1] == "package":
    from smat_dist import ray_session
    ray_session.connect(num_cpus=1)
else:
    import ray
    ray.init(num_cpus=1, include_dashboard=False)
time.sleep(2)
me = psutil.Process()
out = []
for p in [me] + me.children(recursive=True):
    try:
        out += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print("LISTEN " + json.dumps(out))
"""


def _listeners(mode: str, cwd: Path) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LISTEN ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[0][len("LISTEN "):])


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _has_external_address() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is looked up
            return not ipaddress.ip_address(s.getsockname()[0]).is_loopback
    except OSError:
        return False


@pytest.mark.timeout(600)
def test_local_ray_listens_on_loopback_only(tmp_path):
    sockets = _listeners("package", tmp_path)
    assert len(sockets) >= 3  # GCS, raylet, dashboard at least
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    if _has_external_address():
        # The check can fail: Ray started without the package's helper listens on this machine's address.
        plain = _listeners("plain", tmp_path)
        assert any(not _loopback(s[1]) for s in plain), plain


# ------------------------------------------------------------------------------------ runtime-env merge
def _shipped_job_envs() -> dict:
    """The runtime envs users submit with: cluster/runtime_env.yaml and the KubeRay RayJob's runtimeEnvYAML."""
    import yaml

    job = yaml.safe_load((REPO / "cluster" / "k8s" / "rayjob-train.yaml").read_text())
    return {"runtime_env.yaml": yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text()),
            "rayjob-train.yaml": yaml.safe_load(job["spec"]["runtimeEnvYAML"])}


@pytest.mark.parametrize("name", ["runtime_env.yaml", "rayjob-train.yaml"])
def test_driver_runtime_env_merges_with_the_shipped_job_env_through_rays_own_merge(name, monkeypatch):
    """Ray's merge refuses overlapping env vars (our full env against the job's fails), ours minus what the
    job sets merges: the job's values win and every variable our workers need that it lacks is added."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from smat_dist import ray_session

    job = _shipped_job_envs()[name]
    ours = {"env_vars": ray_session.worker_env(include_pythonpath=False),
            "worker_process_setup_hook": "smat_dist.ray_session.setup_worker"}
    assert set(job["env_vars"]) & set(ours["env_vars"]), "the test needs an overlap to mean anything"
    assert _merge_runtime_env(job, ours) is None  # what failed before: Ray refuses the overlap
    # the driver reads the job's env the way Ray's job supervisor hands it over
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job, "metadata": {}}))
    assert ray_session.job_runtime_env() == job
    merged = _merge_runtime_env(job, ray_session.driver_runtime_env(ours, ray_session.job_runtime_env()))
    assert merged is not None
    assert merged["env_vars"] == {**ours["env_vars"], **job["env_vars"]}
    assert merged["worker_process_setup_hook"] == ours["worker_process_setup_hook"]
    # a job that sets the hook itself keeps it
    job2 = dict(job, worker_process_setup_hook="their.hook")
    merged2 = _merge_runtime_env(job2, ray_session.driver_runtime_env(ours, job2))
    assert merged2 is not None and merged2["worker_process_setup_hook"] == "their.hook"


def test_job_runtime_env_is_empty_outside_a_job(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from smat_dist import ray_session

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert ray_session.job_runtime_env() == {}
    ours = {"env_vars": {"A": "1"}, "worker_process_setup_hook": "h"}
    assert ray_session.driver_runtime_env(ours, {}) == ours
