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
