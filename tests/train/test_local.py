"""The single-process launcher (plain torch engine): exact resume, checkpoint format, metrics."""

import pytest
import torch

from smat_dist.train.config import TrainConfig
from smat_dist.smat import SMAT
from smat_dist.smat.backbone import build_backbone
from smat_dist.smat.optim import count_trainable
from smat_dist.train.checkpoint import CheckpointError, find_latest
from smat_dist.train.launch import Trainer


def _model(cfg, init_seed: int) -> SMAT:
    """Same θ_pre (the "pre-trained" backbone) every time; θδ/φ/hypernet from ``init_seed``."""
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone)
    torch.manual_seed(init_seed)
    return SMAT(cfg, backbone=backbone)


def test_resume_from_checkpoint_is_bit_identical(tiny_cfg, toy, tmp_path):
    cfg = TrainConfig(tasks_per_step=2, tasks_per_epoch=4, max_steps=6, checkpoint_every=3, seed=3)
    straight = _model(tiny_cfg, 0)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    t1 = Trainer(straight, cfg, run_dir=tmp_path / "a")
    t1.fit(toy)

    first = _model(tiny_cfg, 1)
    first.load_state_dict(init)
    Trainer(first, cfg, run_dir=tmp_path / "b").fit(toy, steps=3)
    ckpt = find_latest(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "checkpoint_step_00000003"

    resumed = _model(tiny_cfg, 2)  # a different init, overwritten by the checkpoint
    assert not torch.equal(resumed.gates.logits, straight.gates.logits)
    t2 = Trainer(resumed, cfg, run_dir=tmp_path / "b")
    t2.load(ckpt)
    assert t2.step == 3
    t2.fit(toy)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # optimiser state too (momentum of θδ, AdamW moments of the hypernetwork)
    sa, sb = t1.recipe.optimizer.state_dict()["state"], t2.recipe.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for key in sa[pid]:
            assert torch.equal(torch.as_tensor(sa[pid][key]), torch.as_tensor(sb[pid][key])), (pid, key)
    assert int(resumed.tasks_seen) == 12


def test_checkpoint_loads_with_weights_only_and_refuses_other_backbone_weights(tiny_cfg, toy, tmp_path):
    model = SMAT(tiny_cfg)
    trainer = Trainer(model, TrainConfig(tasks_per_step=2, tasks_per_epoch=2, checkpoint_every=1), run_dir=tmp_path)
    trainer.fit(toy, steps=1)
    ckpt = find_latest(tmp_path)
    state = torch.load(ckpt / "step_00000001" / "state.pt", weights_only=True)  # no pickled code objects inside
    assert "gates.logits" in state["model"] and "state" in state["optimizer"]
    assert "theta_pre" not in str(list(state["model"]))  # θ_pre is not checkpointed
    other = SMAT(tiny_cfg)
    with torch.no_grad():
        other.theta_pre.add_(1.0)
    with pytest.raises(CheckpointError, match="fingerprint"):
        Trainer(other, TrainConfig(tasks_per_step=2)).load(ckpt)


def test_trainable_value_count_is_m_plus_one_theta_plus_hypernet(tiny_cfg):
    model = SMAT(tiny_cfg)
    n = count_trainable(model)
    N, M, D = model.space.numel, 8, model.dim
    assert n["delta"] == N and n["masks"] == M * N and n["lagrange"] == M
    assert n["hypernet"] == 8 * D * D + 8 * D + M * D + 4 * D  # block 8D²+8D, keys, tokens
    assert n["total"] == (M + 1) * N + n["hypernet"] + M


def test_metrics_are_written_per_step(tiny_cfg, toy, tmp_path):
    import json

    trainer = Trainer(SMAT(tiny_cfg), TrainConfig(tasks_per_step=2, tasks_per_epoch=2), run_dir=tmp_path)
    trainer.fit(toy, steps=2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # meta-steps completed, as every launcher logs them
    for key in ("query_ce", "kd", "sparsity", "lambda", "temperature", "time_data", "tasks_per_s"):
        assert key in rows[-1], key
    assert len(rows[-1]["sparsity"]) == 8
