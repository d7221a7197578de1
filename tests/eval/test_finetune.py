"""Full and LoRA fine-tuning really train a task copy, never touch the checkpoint, never read query labels."""

from __future__ import annotations

import dataclasses
import hashlib
from unittest.mock import patch

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


def assert_finetuning_never_reads_query_labels(ev, spec) -> None:
    """Scoring the same episode with every query label moved to the next class changes nothing
    fine-tuning produces (losses, trained weights, query logits); only the accuracy, which must
    read the labels, changes."""
    true_ep = ev.reader.episode(spec)
    moved_ep = dataclasses.replace(true_ep, query_y=(true_ep.query_y + 1) % true_ep.ways)
    runs = [("full", 1e-2), ("lora", 1e-1)]
    scored = []
    for ep in (true_ep, moved_ep):
        with patch.object(ev.reader, "episode", lambda s, ep=ep: ep):
            accs, _, outs, _, _ = ev.score(spec, runs, keep_weights=True)
        scored.append((accs, outs))
    (accs_a, outs_a), (accs_b, outs_b) = scored
    assert accs_a != accs_b  # the labels did reach the accuracy
    for i, (mode, _) in enumerate(runs):
        a, b = outs_a[i], outs_b[i]
        assert a.losses == b.losses, f"{mode}: the fine-tuning loss depends on query labels"
        assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights), \
            f"{mode}: the fine-tuned weights depend on query labels"
        assert torch.equal(a.query_logits, b.query_logits), f"{mode}: the query logits depend on query labels"


def test_finetuning_never_sees_query_labels(evaluator, spec):
    assert_finetuning_never_reads_query_labels(evaluator, spec)


def test_the_query_label_check_catches_a_finetuner_that_trains_on_the_query_set(evaluator, spec, monkeypatch):
    from smat_dist.eval import finetune

    real = finetune._run_steps

    def trains_on_support_and_query(forward, opt, ep, *args, **kwargs):
        return real(forward, opt, ep.merged(), *args, **kwargs)

    monkeypatch.setattr(finetune, "_run_steps", trains_on_support_and_query)
    with pytest.raises(AssertionError, match="full: the fine-tuning loss depends on query labels"):
        assert_finetuning_never_reads_query_labels(evaluator, spec)


def assert_inert_finetuning_is_no_finetuning(ev, spec) -> None:
    """Fine-tuning that cannot move the weights (lr 0, or 0 steps), run for real rather than
    through the evaluator's shortcut, keeps θ_i exactly and predicts what no fine-tuning does;
    the shortcut gives the same accuracy."""
    from smat_dist.eval.finetune import LoraWorkspace, finetune_full

    ep = ev.reader.episode(spec)
    weights, _ = ev.task_weights(spec, ep)
    dense = ev.model.dense_weights(weights)
    plain = ev.protonet_logits(weights, ep)
    scale = ev.model.scale
    for lr, steps in ((0.0, 3), (1e-2, 0)):
        cfg = dataclasses.replace(ev.cfg.finetune, steps=steps)
        outs = {"full": finetune_full(ev.model.backbone, dense, ep, lr, scale, cfg, seed=4, keep_weights=True),
                "lora": LoraWorkspace(ev.model.backbone, cfg).run(dense, ep, 10 * lr, scale, seed=4, keep_weights=True)}
        for mode, out in outs.items():
            what = f"{mode} with lr {lr:g}, {steps} steps"
            assert all(torch.equal(out.weights[k], dense[k]) for k in dense), f"{what}: moved θ_i"
            assert len(out.losses) == steps, what
            torch.testing.assert_close(out.query_logits, plain, rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")
    plain_acc = float((plain.argmax(-1) == ep.query_y).float().mean())
    assert ev.score(spec, [("none", 0.0), ("full", 0.0), ("lora", 0.0)])[0] == [plain_acc] * 3


def test_zero_steps_or_zero_lr_equal_no_finetuning(evaluator, spec):
    assert_inert_finetuning_is_no_finetuning(evaluator, spec)


@pytest.mark.parametrize("broken, message", [
    ("lr_ignored", "full with lr 0, 3 steps: moved θ_i"),
    ("one_step_at_least", "full with lr 0.01, 0 steps: moved θ_i"),
    ("lora_starts_off_theta", "lora with lr 0, 3 steps: moved θ_i"),
], ids=["lr_ignored", "one_step_at_least", "lora_starts_off_theta"])
def test_the_inert_finetuning_check_catches_finetuners_that_move(evaluator, spec, monkeypatch, broken, message):
    from smat_dist.eval import finetune

    if broken == "lr_ignored":
        monkeypatch.setattr(finetune, "_adamw", lambda params, lr, cfg: torch.optim.AdamW(params, lr=1e-3))
    elif broken == "one_step_at_least":
        real = finetune._run_steps
        monkeypatch.setattr(finetune, "_run_steps", lambda f, o, ep, steps, *a: real(f, o, ep, max(steps, 1), *a))
    else:
        real_reset = finetune.LoraWorkspace.reset

        def reset_with_b(self, dense, seed):
            real_reset(self, dense, seed)
            with torch.no_grad():
                for b in self.lora_b:
                    b.fill_(0.01)  # B ≠ 0: training no longer starts at θ_i

        monkeypatch.setattr(finetune.LoraWorkspace, "reset", reset_with_b)
    with pytest.raises(AssertionError, match=message):
        assert_inert_finetuning_is_no_finetuning(evaluator, spec)


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
