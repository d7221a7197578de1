"""Shared fixtures. Ray is started at most once per test session (it costs seconds)."""

from __future__ import annotations

import os
import socket
from typing import List

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keep every Ray address on 127.0.0.1 (single node): Ray reads this when it is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_head_port_args() -> List[str]:
    """Free ports for a test's own ``ray start --head``. The per-node agents otherwise take fixed
    defaults (the dashboard agent 52365), which the session's in-process Ray may already hold: the
    new head then starts, but without a job agent ("No available agent to submit job")."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}"]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_clean(ray_session):
    """Ray, with any placement group a failed trainer leaked removed afterwards."""
    yield ray_session
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in placement_group_table().items():
        if info.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray_session.PlacementGroupID(bytes.fromhex(pg_id))))
            except Exception:
                pass


def _local_s3_module():
    """tools/local_s3.py (the one moto start/stop helper, shared with the cluster scripts)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "local_s3.py"
    spec = importlib.util.spec_from_file_location("smat_tools_local_s3", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 for the session, with the buckets ``data`` and
    ``runs``; ``.env()`` are the standard AWS variables that point clients at it."""
    local_s3 = _local_s3_module()
    server = local_s3.start(["data", "runs"], log=tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process's S3 clients pointed at :func:`s3_server` (pyarrow filesystems cached per bucket are reset)."""
    from smat_dist import objstore

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    objstore._filesystems.clear()
    yield s3_server
    objstore._filesystems.clear()
