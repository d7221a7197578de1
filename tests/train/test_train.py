"""Ray Train + DeepSpeed meta-training: completion, aggregation equivalence, fault tolerance, resume."""

from __future__ import annotations

import json

import pytest
import torch

from smat_dist.export import read_export
from smat_dist.train.ray_launcher import train

from .conftest import assert_same, export_params, tiny_run_config

pytestmark = pytest.mark.timeout(900)


def test_two_worker_run_writes_checkpoints_metrics_and_keeps_global_state_identical(two_workers):
    cfg, result = two_workers
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["world_size"] == 2
        # λ, temperature, measured sparsity, counters and every trainable tensor agree across ranks
        assert r["global_state_max_spread"] == 0.0
        for key in ("query_ce", "kd", "teacher_ce", "sparsity", "lambda", "temperature", "tasks_per_s",
                    "time_data", "time_student", "time_teacher", "time_backward"):
            assert key in r, key
        assert len(r["sparsity"]) == cfg.model.gates.num_experts
    assert rows[-1]["temperature"] == pytest.approx(5.0 - 8 / 4000)  # 4 steps x 2 tasks
    ckpts = sorted(p for p in result.run_dir.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    assert len(ckpts) == 2  # steps 2 and 4
    for c in ckpts:
        meta = json.loads((c / "smat_checkpoint.json").read_text())
        assert meta["world_size"] == 2 and (c / meta["tag"] / "mp_rank_00_model_states.pt").exists()
    assert result.export.exists()
    _, meta = read_export(result.export)
    assert json.loads(meta["model_config"])["gates"]["num_experts"] == 8


def test_two_workers_one_task_each_equal_one_worker_accumulating_two(two_workers, runs_dir):
    """Gradient averaging over ranks == gradient accumulation on one rank.

    The two runs add the same two task gradients in a different order (an all-reduce vs two
    accumulating backward passes), so they agree to fp32 rounding, ~1e-7 relative per step; the
    gate logits then take lr-1e6 steps (clipped to norm 5), which scales absolute differences up.
    We allow 1e-4 absolute / 1e-4 relative after 4 steps and report the worst difference.
    """
    cfg2, res2 = two_workers
    cfg1 = tiny_run_config(runs_dir, "one", "dist.num_workers=1", "train.tasks_per_step=2", "train.max_steps=4",
                           "train.checkpoint_every=4")
    res1 = train(cfg1)
    a, b = export_params(res2.export), export_params(res1.export)
    worst = assert_same(a, b, atol=1e-4, rtol=1e-4)
    print(f"worst |2x1 - 1x2| after 4 steps: {worst:.3g}")
    assert not torch.equal(a["delta"], torch.zeros_like(a["delta"]))  # it did train


def test_injected_worker_fault_restarts_from_checkpoint_and_ends_identical(two_workers, runs_dir):
    _, clean = two_workers
    cfg = tiny_run_config(runs_dir, "faulty", "dist.num_workers=2", "train.tasks_per_step=2", "train.max_steps=4",
                          "train.checkpoint_every=2", "debug.fault_at_step=3", "debug.fault_rank=1",
                          "dist.max_failures=1")
    res = train(cfg)
    assert (res.run_dir / ".fault_injected_step_3").exists()  # it really failed once
    assert_same(export_params(res.export), export_params(clean.export))  # bit-identical to the clean run
    steps = [json.loads(line)["step"] for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the failed step's partial record was not kept twice


def test_resume_from_a_two_worker_checkpoint_on_one_worker(two_workers, runs_dir):
    _, clean = two_workers
    ckpts = sorted(p for p in clean.run_dir.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    half = ckpts[0]  # step 2
    assert json.loads((half / "smat_checkpoint.json").read_text())["step"] == 2
    cfg = tiny_run_config(runs_dir, "moved", "dist.num_workers=1", "train.tasks_per_step=2", "train.max_steps=4",
                          "train.checkpoint_every=2", f"dist.resume_from={half}")
    res = train(cfg)
    steps = [json.loads(line)["step"] for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]
    assert_same(export_params(res.export), export_params(clean.export), atol=1e-4, rtol=1e-4)


def test_zero2_checkpoint_refuses_a_different_worker_count(two_workers, runs_dir):
    cfg = tiny_run_config(runs_dir, "z2", "dist.num_workers=2", "train.tasks_per_step=2", "train.max_steps=2",
                          "train.checkpoint_every=2", "dist.zero_stage=2")
    res = train(cfg)
    ckpt = next(p for p in res.run_dir.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    bad = tiny_run_config(runs_dir, "z2b", "dist.num_workers=1", "train.tasks_per_step=2", "train.max_steps=3",
                          "dist.zero_stage=2", f"dist.resume_from={ckpt}")
    with pytest.raises(Exception, match="resume with dist.num_workers=2"):
        train(bad)
