"""The one way this package joins or starts Ray (training, evaluation, sweeps, the demo).

* With ``RAY_ADDRESS`` set (``ray job submit`` sets it for the entrypoint) the process joins that
  cluster; the cluster's or job's runtime env applies and only the environment our workers need is
  added: Ray refuses to merge a driver's ``runtime_env`` with the job's when both set the same
  field or env var (``_merge_runtime_env`` in ``ray/runtime_env/runtime_env.py``), so
  :func:`driver_runtime_env` leaves out whatever the job already sets (the job's value wins).
* Otherwise it starts a local Ray bound to 127.0.0.1: Ray resolves "localhost" to the machine's
  external address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which it reads at import time, so the
  setting goes into the environment (for Ray's own child processes) and into the already-imported
  constant. No dashboard is started; Ray Train's state queries then have nothing to ask, which is why
  the training launcher silences that one warning (see :mod:`smat_dist.train.ray_launcher`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional
import smat_dist

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


def worker_env(*, use_gpu: bool = False, include_pythonpath: bool = True) -> Dict[str, str]:
    """Environment every Ray process of ours needs (workers, actors, Ray Train's controller)."""
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        **{key: os.environ.get(key, value) for key, value in smat_dist.PROCESS_ENV.items()},  # smat_dist/__init__.py
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # Ray Train V2 re-routes print() in workers through its logger, which then shows every
        # progress line twice on the driver's console; plain stdout is forwarded once.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if include_pythonpath:  # workers must import this package; harmless when it is installed
        pkg_parent = str(Path(smat_dist.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH", "")) if p)
    return env


def setup_worker() -> None:
    """Runs in every Ray worker process of our jobs (``worker_process_setup_hook``).

    In a local session (Ray on 127.0.0.1) it also keeps torch's rendezvous store and gloo on
    loopback (:mod:`smat_dist.loopback`). Ray Train's placement-group cleaner asks Ray's state API
    whether the trainer is alive. Without an
    address it auto-detects "the" Ray instance, which fails on a machine with several (and prints a
    traceback); pointing it at the cluster this process belongs to makes it ask the right one.
    """
    import ray

    from smat_dist import loopback

    gcs = ray.get_runtime_context().gcs_address
    os.environ.setdefault("RAY_ADDRESS", gcs)
    if loopback.is_loopback(gcs.rsplit(":", 1)[0]):  # a local session: every listener on loopback
        loopback.local_gloo()
        try:
            loopback.bind_store_to_loopback()
        except Exception as exc:  # noqa: BLE001 - a torch without this seam: the store keeps torch's binding
            log.warning("rendezvous store not restricted to loopback: %s", exc)


def job_runtime_env() -> Dict:
    """The runtime env of the Ray job this process is the driver of (``ray job submit``, a KubeRay
    RayJob), as Ray's job supervisor hands it to the entrypoint; {} outside a submitted job."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError):
        return {}


def driver_runtime_env(wanted: Dict, job: Optional[Dict]) -> Dict:
    """``wanted`` without the fields and env vars ``job`` already sets, so that Ray's merge of the two
    (which refuses any overlap) succeeds and the job's own settings win."""
    job = job or {}
    job_vars = job.get("env_vars") or {}
    out = {k: v for k, v in wanted.items() if k != "env_vars" and k not in job}
    env_vars = {k: v for k, v in (wanted.get("env_vars") or {}).items() if k not in job_vars}
    if env_vars:
        out["env_vars"] = env_vars
    skipped = sorted(k for k in wanted if k != "env_vars" and k in job)
    if skipped:
        log.info("the job's runtime env sets %s; ours is not added", skipped)
    return out


def keep_local() -> None:
    """Make a Ray started by this process use 127.0.0.1 for every address (single node)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as constants  # read at call time by Ray's address resolution

    constants.ENABLE_RAY_CLUSTER = False


def connect(*, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None, use_gpu: bool = False,
            object_store_mb: int = 256, log_to_driver: bool = True) -> bool:
    """Join ``$RAY_ADDRESS`` or an already initialised Ray, else start a local one on 127.0.0.1.

    Returns True when this call started Ray (the caller shuts it down when done).
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before the first `import ray`, if it is
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    env = worker_env(use_gpu=use_gpu)
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "smat_dist.ray_session.setup_worker"}
    if address:
        env.pop("PYTHONPATH")  # the job's working dir / image provides the package
        ray.init(address=address, log_to_driver=log_to_driver,
                 runtime_env=driver_runtime_env(runtime_env, job_runtime_env()) or None)
        return False
    keep_local()
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        num_gpus=num_gpus if num_gpus is not None else (None if use_gpu else 0),
        # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner
        # polls; without it that cleaner warns every few seconds. It listens on 127.0.0.1 only.
        include_dashboard=True,
        dashboard_host=LOCALHOST,
        object_store_memory=object_store_mb * 1024 * 1024,
        runtime_env=runtime_env,
        log_to_driver=log_to_driver,
        configure_logging=False,
        _node_ip_address=LOCALHOST,
    )
    return True


def shutdown(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


__all__ = ["connect", "shutdown", "worker_env", "keep_local", "job_runtime_env", "driver_runtime_env", "LOCALHOST"]
