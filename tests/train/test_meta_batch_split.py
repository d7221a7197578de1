"""Any meta-batch on any world size, and the DeepSpeed settings of ``dist.deepspeed``.

Ranks take ⌈B/W⌉ or ⌊B/W⌋ of a step's B tasks; the engine weights the meta-gradient so that it is
the mean over all B tasks, as on one rank: 3 tasks on 2 torchrun ranks end where 3 tasks on 1 rank do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from smat_dist.config import RunConfig, load_config
from smat_dist.errors import ConfigError

from .conftest import REPO, TINY, assert_same, export_params
from .test_launchers import torchrun

pytestmark = pytest.mark.timeout(900)

THREE = ["train.tasks_per_step=3", "train.max_steps=2", "train.checkpoint_every=2"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_three_tasks_on_two_ranks_equal_three_tasks_on_one(tmp_path):
    one = torchrun(tmp_path, "one", nproc=1, steps=THREE)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = torchrun(tmp_path, "two", nproc=2, steps=THREE)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    worst = assert_same(export_params(tmp_path / "two" / "model.safetensors"),
                        export_params(tmp_path / "one" / "model.safetensors"), atol=1e-5, rtol=0.0)
    print(f"max |2 ranks - 1 rank| with 3 tasks per step = {worst:.3g}")
    rows1, rows2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["world_size"] for r in rows2] == [2, 2] and all(r["global_state_max_spread"] == 0.0 for r in rows2)
    # the step's task means are over all 3 tasks (rank 0's two weigh twice rank 1's one)
    for key in ("loss", "query_acc", "ways"):
        assert [r[key] for r in rows2] == pytest.approx([r[key] for r in rows1], abs=1e-5), key
    assert rows2[-1]["temperature"] == rows1[-1]["temperature"]  # 6 tasks seen on every rank


def test_fewer_tasks_than_ranks_is_one_clear_error():
    with pytest.raises(ConfigError, match="tasks_per_step \\(1\\) is smaller than dist.num_workers \\(2\\)"):
        load_config(RunConfig, [REPO / "configs" / "smat.yaml"], [*TINY, "train.tasks_per_step=1",
                                                                  "dist.num_workers=2"])
    cfg = load_config(RunConfig, [REPO / "configs" / "smat.yaml"], [*TINY, "train.tasks_per_step=3",
                                                                    "dist.num_workers=2"])
    assert cfg.train.tasks_per_step == 3  # no longer a multiple of the workers: fine on ZeRO 0
    with pytest.raises(ConfigError, match="uneven, which dist.zero_stage=2 cannot run"):
        load_config(RunConfig, [REPO / "configs" / "smat.yaml"], [*TINY, "train.tasks_per_step=3",
                                                                  "dist.num_workers=2", "dist.zero_stage=2"])


@pytest.mark.parametrize("bad, message", [
    ("dist.deepspeed.communication_data_type=int8", "dist.deepspeed.communication_data_type must be one of"),
    ("dist.deepspeed.reduce_bucket_size=0", "dist.deepspeed.reduce_bucket_size must be >= 1"),
    ("dist.deepspeed.overlap_comms=true", "overlap_comms"),
])
def test_deepspeed_settings_are_checked_at_load(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, [REPO / "configs" / "smat.yaml"], [*TINY, bad])


SETTINGS = ["dist.zero_stage=2", "dist.deepspeed.communication_data_type=bf16", "dist.deepspeed.overlap_comm=true",
            "dist.deepspeed.reduce_bucket_size=5000", "dist.deepspeed.allgather_bucket_size=7000",
            "dist.deepspeed.contiguous_gradients=false"]


ENGINE_SETTINGS_CHECK = """
import os, socket, sys
import torch, torch.distributed as tdist
from smat_dist.train.distributed import Runtime
from smat_dist.train.recipe import MetaTrainRecipe
from tests.train.conftest import tiny_run_config
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
cfg = tiny_run_config(sys.argv[1], "ds", *sys.argv[2:], "train.tasks_per_step=2", "train.max_steps=1")
recipe = MetaTrainRecipe(cfg, Runtime("torchrun"), None).setup()
ds = recipe.engine.engine
assert ds.zero_optimization_stage() == 2
assert ds.communication_data_type == torch.bfloat16
assert ds.zero_overlap_comm() is True and ds.zero_contiguous_gradients() is False
assert ds.zero_reduce_bucket_size() == 5000 and ds.zero_allgather_bucket_size() == 7000
assert ds.gradient_accumulation_steps() == 2
before = recipe.model.delta.detach().clone()
recipe.train()
assert recipe.step == 1 and not torch.equal(before, recipe.model.delta.detach())
tdist.barrier(); tdist.destroy_process_group()
print("engine settings ok")
"""


def test_deepspeed_engine_gets_the_run_configs_settings(tmp_path):
    """What DeepSpeed itself parsed from ``dist.deepspeed`` (one gloo rank, in a process of its own: DeepSpeed
    keeps the first process group it saw), and a step that trains."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", ENGINE_SETTINGS_CHECK, str(tmp_path), *SETTINGS], capture_output=True,
                       text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0 and "engine settings ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_two_ranks_train_with_bf16_communication(tmp_path):
    """2 torchrun ranks (gloo), 3 tasks per step, ZeRO 0 with bf16 gradient all-reduce: the run trains and
    stays within bf16's precision of the fp32-communication run."""
    fp32 = torchrun(tmp_path, "fp32", nproc=2, steps=THREE)
    assert fp32.returncode == 0, fp32.stdout[-3000:] + fp32.stderr[-3000:]
    bf16 = torchrun(tmp_path, "bf16", "dist.deepspeed.communication_data_type=bf16", nproc=2, steps=THREE)
    assert bf16.returncode == 0, bf16.stdout[-3000:] + bf16.stderr[-3000:]
    a, b = export_params(tmp_path / "bf16" / "model.safetensors"), export_params(tmp_path / "fp32" / "model.safetensors")
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"max |bf16 communication - fp32| after 2 steps = {worst:.3g}")
    assert worst > 0.0 and all(bool(t.isfinite().all()) for t in a.values())  # the reduction did run in bf16
    lb, lf = [r["loss"] for r in _rows(tmp_path / "bf16")], [r["loss"] for r in _rows(tmp_path / "fp32")]
    assert lb[0] == lf[0]  # the first step's losses come before any reduced gradient
    assert lb[1] == pytest.approx(lf[1], rel=2e-2)  # after one bf16-reduced update: close
