"""One recipe, three launchers: Ray workers, torchrun ranks and a single process compute the same run,
and each resumes a crashed run exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smat_dist.train.checkpoint import find_latest, inspect
from smat_dist.train.distributed import Runtime
from smat_dist.train.launch import run
from smat_dist.train.recipe import InjectedFault

from .conftest import REPO, TINY, assert_same, export_params, tiny_run_config

pytestmark = pytest.mark.timeout(900)

RUN = ["train.tasks_per_step=2", "train.max_steps=4", "train.checkpoint_every=2"]


def torchrun(out: Path, name: str, *extra: str, nproc: int = 2, config: str = "smat.yaml",
             steps=RUN) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m smat_dist.train --config configs/<config> TINY ...`` in ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "smat_dist.train", "--config", str(REPO / "configs" / config), *TINY, *steps,
           f"train.output_dir={out}", f"train.run_name={name}", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out)


def steps_logged(run_dir: Path) -> list:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """A clean 2-rank torchrun run, and one that crashes at step 3 and is then re-run."""
    out = tmp_path_factory.mktemp("torchrun")
    clean = torchrun(out, "clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    crashed = torchrun(out, "crash", "debug.fault_at_step=3", "debug.fault_rank=1")
    rerun = torchrun(out, "crash", "debug.fault_at_step=3", "debug.fault_rank=1")
    return out, clean, crashed, rerun


def test_torchrun_and_ray_workers_compute_the_same_run(two_workers, torchrun_runs):
    """2 torchrun ranks and 2 Ray Train workers: the same DeepSpeed computation, the same parameters."""
    out, clean, _, _ = torchrun_runs
    ray_cfg, ray_result = two_workers
    run_dir = out / "clean"
    assert "[smat-train] done" in clean.stdout
    worst = assert_same(export_params(run_dir / "model.safetensors"), export_params(ray_result.export),
                        atol=1e-6, rtol=0.0)
    print(f"max |torchrun - ray| = {worst:.3g}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 and r["global_state_max_spread"] == 0.0 for r in rows)
    ray_rows = [json.loads(line) for line in (ray_result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ray_rows], abs=1e-6)
    # the same run-directory layout: run config, checkpoints with sidecars, export
    assert (run_dir / "run_config.yaml").exists()
    metas = sorted(inspect(d).step for d in run_dir.glob("checkpoint_*"))
    assert metas == [2, 4]
    assert inspect(find_latest(run_dir)).engine == "deepspeed" == inspect(find_latest(ray_result.run_dir)).engine


def test_torchrun_resumes_a_crashed_run_exactly(torchrun_runs):
    out, clean, crashed, rerun = torchrun_runs
    assert crashed.returncode != 0 and "injected fault" in crashed.stdout + crashed.stderr
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and "at step 2/4" in rerun.stdout
    assert steps_logged(out / "crash") == [1, 2, 3, 4]  # nothing lost, nothing doubled
    assert_same(export_params(out / "crash" / "model.safetensors"), export_params(out / "clean" / "model.safetensors"))


def test_single_process_agrees_with_ranks_and_resumes_exactly(two_workers, tmp_path):
    """``python -m smat_dist.train`` (no torchrun): the same tasks per step in one process. Summation order
    differs from the 2-rank all-reduce, so it agrees to the cross-world-size tolerance; its own resume
    after a crash is bit-identical."""
    _, ray_result = two_workers
    straight = tiny_run_config(tmp_path, "single", *RUN)
    run(straight, Runtime("local"))
    worst = assert_same(export_params(tmp_path / "single" / "model.safetensors"), export_params(ray_result.export),
                        atol=1e-4, rtol=1e-4)
    print(f"max |single - ray 2 workers| = {worst:.3g}")

    crash = tiny_run_config(tmp_path, "crash", *RUN, "debug.fault_at_step=3")
    with pytest.raises(InjectedFault):
        run(crash, Runtime("local"))
    assert steps_logged(tmp_path / "crash") == [1, 2]
    assert inspect(find_latest(tmp_path / "crash")).engine == "local"
    run(crash, Runtime("local"))
    assert steps_logged(tmp_path / "crash") == [1, 2, 3, 4]
    assert_same(export_params(tmp_path / "crash" / "model.safetensors"),
                export_params(tmp_path / "single" / "model.safetensors"))
