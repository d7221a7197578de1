"""A real multi-node Ray cluster on this machine (``tools/local_cluster.py``: a head with no CPUs for
training, two worker nodes, token auth, a node-local shard cache per node): a run submitted with
``ray job submit`` survives the loss of a worker node after a checkpoint, with a fresh node joining.

Where data and runs live are settings: by default the data is served over HTTP on 127.0.0.1 and the runs
are stored in a directory every node sees; ``SMAT_E2E_DATA_ROOT`` / ``SMAT_E2E_STORAGE`` point the same
scenario at object storage.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

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


def test_a_run_survives_the_loss_of_a_worker_node(synth_small, tmp_path):
    from tests.data.conftest import http_server

    lc = local_cluster()
    data_root = os.environ.get("SMAT_E2E_DATA_ROOT")
    storage = os.environ.get("SMAT_E2E_STORAGE") or str(tmp_path / "shared" / "runs")
    with (nullcontext(data_root) if data_root else http_server(synth_small)) as root:
        report = lc.node_loss_e2e(tmp_path / "cluster", data_root=root, storage=storage, steps=6, every=2, halt=4)
    assert report["steps"] == [1, 2, 3, 4, 5, 6]  # no row lost, none repeated
    assert report["max_param_diff"] <= 1e-6, report
    assert "checkpoint_step_00000004 at step 4/6" in report["resumed_line"], report
    caches = report["node_caches"]
    # every worker node that trained read its shards through its own cache, including the fresh one
    assert all(caches[n] > 0 for n in ("w1", "w2", "w3")), caches
    print("multi-node e2e:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in report.items()
                              if k not in ("resumed_line", "steps")})
    shutil.rmtree(tmp_path / "cluster", ignore_errors=True)
