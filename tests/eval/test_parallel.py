"""The same per-episode accuracies in this process, on 1 Ray actor and on 2."""

from __future__ import annotations

import numpy as np
import pytest

from smat_dist.eval.config import load_eval_config
from smat_dist.eval.runner import evaluate
from tests.eval.conftest import eval_overrides


@pytest.mark.timeout(300)
def test_one_and_two_actors_give_identical_per_episode_accuracies(ray_session, eval_root, tiny_run):
    common = eval_overrides(eval_root, "episodes=5", "modes=[none,full,lora]", "finetune.steps=3", "finetune.lr=3e-2", "chunk=2",
                            "actor_cpus=0.5")
    reports = {n: evaluate(load_eval_config(common + [f"actors={n}"]), str(tiny_run), say=lambda m: None)
               for n in (0, 1, 2)}
    assert len(reports[2].worker_info) == 2 and len({i["pid"] for i in reports[2].worker_info}) == 2
    assert all(i["package"] == reports[0].worker_info[0]["package"] for r in reports.values() for i in r.worker_info)
    keys = sorted(reports[0].accuracies)
    assert len(keys) == 2 * 3  # 2 sources x (SMAT, SMAT+full, SMAT+LoRA)
    for k in keys:
        a1, a2, a0 = reports[1].accuracies[k], reports[2].accuracies[k], reports[0].accuracies[k]
        assert a1.shape == (5,)
        assert np.array_equal(a1, a2), k
        assert np.array_equal(a0, a1), k
    # fine-tuning changed some predictions, so the equality above covers trained weights too
    for c in ("SMAT+full", "SMAT+LoRA"):
        assert any(not np.array_equal(reports[1].accuracies[(s, "SMAT")], reports[1].accuracies[(s, c)])
                   for s in ("textures", "digits")), c
    for r in (reports[1], reports[2]):
        assert [x.accuracy for x in r.rows] == [x.accuracy for x in reports[0].rows]
