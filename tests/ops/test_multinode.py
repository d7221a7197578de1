"""A real multi-node Ray cluster on this machine (``tools/local_cluster.py``: a head with no CPUs for
training, two worker nodes, token auth, a node-local shard cache per node): a run submitted with
``ray job submit`` survives the loss of a worker node after a checkpoint, with a fresh node joining.

The data is reachable only through a real S3-compatible server on 127.0.0.1 (moto, ``s3_server``), and the
runs are stored there too (``dist.storage_path=s3://...``): the nodes share nothing but the bucket (and this
machine's disk for their staging directories, which the scenario watches).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import uuid

import pytest

from .conftest import BIN, REPO

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not (BIN / "ray").exists(), reason="the ray CLI is not installed next to python")]


def local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "tools" / "local_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_cluster", mod)
    spec.loader.exec_module(mod)
    return mod


def test_a_run_on_object_storage_survives_the_loss_of_a_worker_node(synth_small, s3_env, tmp_path):
    from smat_dist.data.transfer import upload

    lc = local_cluster()
    prefix = uuid.uuid4().hex[:8]
    data_root, storage = f"s3://data/{prefix}/synth", f"s3://runs/{prefix}"
    upload(synth_small, data_root)
    report = lc.node_loss_e2e(tmp_path / "cluster", data_root=data_root, storage=storage, steps=6, every=2, halt=4)
    assert report["steps"] == [1, 2, 3, 4, 5, 6]  # no row lost, none repeated
    assert report["max_param_diff"] <= 1e-6, report
    assert "checkpoint_step_00000004 at step 4/6" in report["resumed_line"], report
    caches = report["node_caches"]
    # every worker node that trained read its shards through its own cache, including the fresh one
    assert all(caches[n] > 0 for n in ("w1", "w2", "w3")), caches
    print("multi-node e2e:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in report.items()
                              if k not in ("resumed_line", "steps")})
    shutil.rmtree(tmp_path / "cluster", ignore_errors=True)
