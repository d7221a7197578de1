"""Full and LoRA fine-tuning really train a task copy and never touch the checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from smat_dist.eval.config import FinetuneConfig, load_eval_config
from smat_dist.eval.models import describe_checkpoint
from smat_dist.eval.worker import EpisodeEvaluator
from tests.eval.conftest import eval_overrides


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluator(eval_root, tiny_run):
    cfg = load_eval_config(eval_overrides(eval_root, "finetune.steps=5", "finetune.lr=1e-2"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16))
    return EpisodeEvaluator(describe_checkpoint(tiny_run), cfg)


@pytest.fixture(scope="module")
def spec(eval_root):
    from smat_dist.data.builder import EpisodeBuilder
    from smat_dist.data.config import DataConfig

    return EpisodeBuilder(DataConfig(root=str(eval_root), image_size=16), "test", 0, ["textures"]).plan(0)


def test_full_and_lora_change_the_task_copy_only(evaluator, spec):
    ev = evaluator
    m = ev.model.smat
    pre0, delta0 = m.theta_pre.clone(), m.delta.detach().clone()
    bb0 = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    ep = ev.reader.episode(spec)
    weights, _ = ev.task_weights(spec, ep)
    dense = {k: v.clone() for k, v in ev.model.dense_weights(weights).items()}

    accs, _, outs, losses, _ = ev.score(spec, [("none", 0.0), ("full", 1e-2), ("lora", 1e-1)], keep_weights=True)
    full_w, lora_w = outs[1].weights, outs[2].weights
    changed_full = [k for k in dense if not torch.equal(full_w[k], dense[k])]
    assert len(changed_full) == len(dense)  # every tensor of the dense θ_i is trained
    adapted = [k for k in dense if not torch.equal(lora_w[k], dense[k])]
    assert adapted == ["blocks.0.attn.qkv.weight"]  # LoRA on timm's fused qkv only
    assert (lora_w[adapted[0]] - dense[adapted[0]]).abs().max() > 1e-6
    assert len(outs[1].losses) == 5 and len(outs[2].losses) == 5

    # the checkpoint's tensors are untouched
    assert torch.equal(m.theta_pre, pre0) and torch.equal(m.delta.detach(), delta0)
    assert all(torch.equal(v, bb0[k]) for k, v in m.backbone.state_dict().items())
    # the LoRA workspace owns its storage
    ptrs = {p.data_ptr() for p in m.backbone.parameters()} | {m.theta_pre.data_ptr()}
    assert not ptrs & {p.data_ptr() for p in ev.lora().net.parameters()}


def test_finetuning_reduces_the_support_loss(evaluator, spec):
    ev = evaluator
    cfg = dataclasses.replace(ev.cfg.finetune, augment=False, steps=8)
    ev_cfg = dataclasses.replace(ev.cfg, finetune=cfg)
    from smat_dist.eval.finetune import finetune_full

    ep = ev.reader.episode(spec)
    weights, _ = ev.task_weights(spec, ep)
    out = finetune_full(ev.model.backbone, ev.model.dense_weights(weights), ep, 1e-2, 10.0, ev_cfg.finetune, seed=1)
    assert out.losses[-1] < out.losses[0] - 1e-3


def test_zero_steps_or_zero_lr_equal_no_finetuning(evaluator, spec):
    ev = evaluator
    a = ev.score(spec, [("none", 0.0), ("full", 0.0), ("lora", 0.0)])[0]
    assert a[0] == a[1] == a[2]


def test_evaluate_with_finetuning_leaves_the_checkpoint_file_alone(eval_root, tmp_path):
    from smat_dist.eval.runner import evaluate
    from smat_dist.export import load_model
    from tests.eval.conftest import make_tiny_export

    path = make_tiny_export(tmp_path / "run", seed=3)
    before = _sha(path)
    m0 = load_model(path)
    pre0, state0 = m0.theta_pre.clone(), {k: v.clone() for k, v in m0.state_dict().items()}
    cfg = load_eval_config(eval_overrides(eval_root, "episodes=2", "modes=[none,full,lora]", "sources=[textures]"))
    rep = evaluate(cfg, str(path.parent), say=lambda m: None)
    assert [r.method for r in rep.rows] == ["SMAT", "SMAT+full", "SMAT+LoRA"]
    assert rep.rows[2].lr == "0.001"  # LoRA lr = 10 x the full lr (1e-4), as the reference
    assert _sha(path) == before
    m1 = load_model(path)
    assert torch.equal(m1.theta_pre, pre0)
    assert all(torch.equal(v, state0[k]) for k, v in m1.state_dict().items())


def test_bad_lora_target_is_a_clear_error(evaluator):
    from smat_dist.errors import ConfigError
    from smat_dist.eval.finetune import LoraWorkspace

    with pytest.raises(ConfigError, match=r"lora_targets=\['query', 'value'\] match no layer.*qkv"):
        LoraWorkspace(evaluator.model.backbone, FinetuneConfig(lora_targets=["query", "value"]))


def test_augmentation_is_seeded_and_translates_with_zero_fill():
    from smat_dist.eval.augment import support_augment, translate_zero

    x = torch.randn(4, 3, 16, 16)
    a = support_augment(x, torch.Generator().manual_seed(5))
    b = support_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(support_augment(x, torch.Generator().manual_seed(6), prob=1.0), x)
    assert torch.equal(support_augment(x, torch.Generator().manual_seed(6), prob=0.0), x)
    img = torch.arange(16.0).view(1, 1, 4, 4)
    shifted = translate_zero(img, torch.tensor([1]), torch.tensor([-1]), 1, 1)
    expect = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]], dtype=torch.float32)
    assert torch.equal(shifted[0, 0], expect)
