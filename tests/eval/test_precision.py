"""``precision=bf16``: what a GPU run computes differently, checked on CPU.

CPU autocast lowers the same ops (linear, matmul, conv) to bf16 as CUDA autocast, and evaluation
autocasts on the worker's device, so these runs exercise the bf16 paths a GPU takes: features,
α, fine-tuning (forward and backward) and prediction. Tolerances, on logits ``scale·cos`` with
scale 10, measured on this tiny model at about a third of each bound:

* no fine-tuning: |Δlogit| <= 0.05 (0.005 in cosine; measured <= 0.013);
* after 3 AdamW steps (full lr 1e-4, LoRA lr 1e-3): |Δlogit| <= 0.15 (measured <= 0.06);
* α: |Δα| <= 0.02 (α ~ 1/8 per expert).

Accuracy is checked where it is defined by more than rounding: a query whose fp32 top-two logit
margin exceeds twice the tolerance must get the same class in bf16 (the tiny model's digits
features are nearly tied, so plain accuracy agreement would measure ties, not precision).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from smat_dist.eval.config import load_eval_config
from smat_dist.eval.episodes import frozen_list
from smat_dist.eval.models import describe_checkpoint, describe_pre
from smat_dist.eval.worker import EpisodeEvaluator
from smat_dist.smat.config import BackboneConfig
from tests.eval.conftest import eval_overrides, make_tiny_export

ATOL = {"none": 0.05, "full": 0.15, "lora": 0.15}
ALPHA_ATOL = 0.02
RUNS = [("full", 1e-4), ("lora", 1e-3)]

def _evaluator(eval_root, spec, precision: str) -> EpisodeEvaluator:
    cfg = load_eval_config(eval_overrides(eval_root, f"precision={precision}"))
    return EpisodeEvaluator(spec, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16)))


REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("*.yaml")) + \
    sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs" / "ablations").glob("*.yaml"))


@pytest.fixture(scope="module")
def shipped_runs(tmp_path_factory):
    """A tiny export of every shipped training config (its method's parameters: gates, hypernetwork,
    experts with their own offsets, ...), built lazily."""
    from smat_dist.config import RunConfig, load_config

    cache = {}

    def get(config: str) -> Path:
        if config not in cache:
            model = load_config(RunConfig, [REPO / "configs" / config]).model
            changes = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "backbone"}
            run = tmp_path_factory.mktemp(Path(config).stem)
            make_tiny_export(run, **changes)
            cache[config] = run
        return cache[config]

    return get


@pytest.mark.parametrize("method", ["pre"] + SHIPPED)
def test_bf16_logits_stay_close_to_fp32_in_every_mode(eval_root, tiny_run, shipped_runs, tmp_path, method):
    """Pre (ProtoNet on θ_pre) and every shipped training config's model (SMAT, PMF, SoftMerge, the
    ablations), in the three modes."""
    run = tiny_run if method == "pre" else shipped_runs(method)
    spec = describe_pre(str(run), BackboneConfig()) if method == "pre" else describe_checkpoint(run)
    evs = {p: _evaluator(eval_root, spec, p) for p in ("fp32", "bf16")}
    data = evs["fp32"].cfg.data
    specs = [sp for s in ("textures", "digits") for sp in frozen_list(data, s, "test", 3, 0, tmp_path).specs]
    for sp in specs:
        logits, alphas = {}, {}
        for p, ev in evs.items():
            ep = ev.reader.episode(sp)
            weights, alphas[p] = ev.task_weights(sp, ep)
            outs = ev.score(sp, RUNS)[2]
            logits[p] = {"none": ev.protonet_logits(weights, ep), "full": outs[0].query_logits,
                         "lora": outs[1].query_logits}
        if alphas["fp32"] is not None:
            torch.testing.assert_close(alphas["bf16"], alphas["fp32"], rtol=0, atol=ALPHA_ATOL)
        for mode, atol in ATOL.items():
            ref, low = logits["fp32"][mode], logits["bf16"][mode]
            where = f"{sp.source}/{sp.index} {mode}"
            assert not torch.equal(ref, low), f"{where}: bf16 computed nothing differently (autocast off?)"
            assert float((ref - low).abs().max()) <= atol, where
            top2 = ref.topk(2, dim=1).values
            decided = (top2[:, 0] - top2[:, 1]) > 2 * atol
            assert torch.equal(ref.argmax(1)[decided], low.argmax(1)[decided]), where


def test_bf16_evaluation_runs_end_to_end_for_pre(eval_root, tiny_run):
    """The runner, the static feature table and both fine-tuning modes under bf16 (Pre: no
    hypernetwork); mode none stays within 2 points of fp32 per episode."""
    from smat_dist.eval.runner import evaluate

    ov = eval_overrides(eval_root, "modes=[none,full,lora]")
    reps = {p: evaluate(load_eval_config(ov + [f"precision={p}"]), str(tiny_run), method="pre", say=lambda m: None)
            for p in ("fp32", "bf16")}
    assert reps["bf16"].accuracies.keys() == reps["fp32"].accuracies.keys()
    for key, ref in reps["fp32"].accuracies.items():
        low = reps["bf16"].accuracies[key]
        assert low.shape == ref.shape and np.isfinite(low).all()
        if key[1] == "Pre":
            np.testing.assert_allclose(low, ref, atol=2.0, err_msg=str(key))
