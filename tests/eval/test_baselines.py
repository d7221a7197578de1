"""The Pre baseline against nearest-centroid computed by hand; θ_i from SMAT's own test-time merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smat_dist.eval.config import load_eval_config
from smat_dist.eval.runner import evaluate
from tests.eval.conftest import eval_overrides


def _nearest_centroid_accuracy(backbone, ep, metric: str = "cosine", weights=None) -> float:
    """Nearest class mean by hand: ``cosine`` similarity or ``euclidean`` distance."""
    from smat_dist.smat.backbone import features

    with torch.no_grad():
        fs, fq = features(backbone, weights, ep.support_x), features(backbone, weights, ep.query_x)
    cent = torch.stack([fs[ep.support_y == c].mean(0) for c in range(ep.ways)])
    if metric == "cosine":
        score = F.normalize(fq, dim=-1) @ F.normalize(cent, dim=-1).t()
    else:
        score = -torch.cdist(fq, cent)
    return 100.0 * float((score.argmax(1) == ep.query_y).float().mean())


def _hand_cosine_logits(backbone, weights, xs, ys, xq, scale: float) -> torch.Tensor:
    from smat_dist.smat.backbone import features

    with torch.no_grad():
        fs, fq = features(backbone, weights, xs), features(backbone, weights, xq)
    cent = torch.stack([fs[ys == c].mean(0) for c in range(int(ys.max()) + 1)])
    return scale * F.normalize(fq, dim=-1) @ F.normalize(cent, dim=-1).t()


def _euclidean_logits(f: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """A plausible mistake: prototypes compared by (negative squared) Euclidean distance."""
    return -scale * torch.cdist(f.float(), w.float()).pow(2)


def _skew_final_norm(model) -> None:
    """Spread the final LayerNorm's gains over ~e^±3. With the unit gains of a fresh LayerNorm every
    feature has the same norm, and nearest prototype by cosine and by Euclidean distance almost
    never disagree; with spread gains feature norms vary from image to image and they do."""
    w = model.backbone.norm.weight
    w.copy_(torch.exp(1.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))))


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory):
    from tests.eval.conftest import make_tiny_export

    run = tmp_path_factory.mktemp("skewed-run")
    make_tiny_export(run, edit=_skew_final_norm)
    return run


def assert_cosine_prototypes(eval_root, run) -> None:
    """Every classifier of evaluation is scale·cos(f, class mean): mode none through the static
    feature table (Pre), the per-episode pixel path (Pre, feature_cache=false) and per-task θ_i
    (SMAT), and fine-tuning's loss and prediction (full, LoRA)."""
    import dataclasses

    from smat_dist.data.builder import EpisodeBuilder
    from smat_dist.data.config import DataConfig
    from smat_dist.data.loader import materialise
    from smat_dist.eval.models import describe_checkpoint
    from smat_dist.eval.worker import EpisodeEvaluator
    from smat_dist.export import load_model

    smat = load_model(run / "model.safetensors")
    builder = EpisodeBuilder(DataConfig(root=str(eval_root), image_size=16), "test", 0, ["textures", "digits"])
    smat_weights = lambda ep: smat.space.views(smat.task_weights(ep.support_x, ep.support_y))  # noqa: E731
    disagree = 0
    for method, extra, column, weights_of in (("pre", [], "Pre", lambda ep: None),
                                              ("pre", ["feature_cache=false"], "Pre", lambda ep: None),
                                              ("model", [], "SMAT", smat_weights)):
        rep = evaluate(load_eval_config(eval_overrides(eval_root, *extra)), str(run), method=method, say=lambda m: None)
        for source, fl in rep.lists.items():
            eps = [materialise(spec, builder) for spec in fl.specs]
            cos = [_nearest_centroid_accuracy(smat.backbone, ep, "cosine", weights_of(ep)) for ep in eps]
            euc = [_nearest_centroid_accuracy(smat.backbone, ep, "euclidean", weights_of(ep)) for ep in eps]
            np.testing.assert_allclose(rep.accuracies[(source, column)], cos, atol=1e-9,
                                       err_msg=f"{column} {extra} on {source}: not nearest cosine prototype")
            disagree += sum(c != e for c, e in zip(cos, euc))
    assert disagree >= 6, f"the data tells cosine from Euclidean on only {disagree} episodes"

    cfg = load_eval_config(eval_overrides(eval_root, "finetune.augment=false", "finetune.steps=2"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16))
    ev = EpisodeEvaluator(describe_checkpoint(run), cfg)
    spec = rep.lists["textures"].specs[0]
    ep = ev.reader.episode(spec)
    dense = ev.model.dense_weights(ev.task_weights(spec, ep)[0])
    outs = ev.score(spec, [("full", 1e-2), ("lora", 1e-1)], keep_weights=True)[2]
    first_loss = F.cross_entropy(_hand_cosine_logits(ev.model.backbone, dense, ep.support_x, ep.support_y,
                                                     ep.support_x, ev.model.scale), ep.support_y)
    for out in outs.values():
        assert out.losses[0] == pytest.approx(float(first_loss), rel=1e-5), "fine-tuning loss is not cosine"
        hand = _hand_cosine_logits(ev.model.backbone, out.weights, ep.support_x, ep.support_y, ep.query_x,
                                   ev.model.scale)
        torch.testing.assert_close(out.query_logits, hand, rtol=0, atol=1e-4)


def test_prototypes_are_compared_by_cosine_not_euclidean_distance(eval_root, skewed_run):
    assert_cosine_prototypes(eval_root, skewed_run)


@pytest.mark.parametrize("module, message", [("smat_dist.eval.worker", "not nearest cosine prototype"),
                                             ("smat_dist.eval.finetune", "fine-tuning loss is not cosine")],
                         ids=["worker", "finetune"])
def test_the_cosine_check_catches_euclidean_prototypes(eval_root, skewed_run, monkeypatch, module, message):
    monkeypatch.setattr(f"{module}.cosine_logits", _euclidean_logits)
    with pytest.raises(AssertionError, match=message):
        assert_cosine_prototypes(eval_root, skewed_run)


def test_pre_equals_nearest_centroid_on_theta_pre_features(eval_root, tiny_run, tmp_path):
    from smat_dist.data.builder import EpisodeBuilder
    from smat_dist.data.config import DataConfig
    from smat_dist.data.loader import materialise
    from smat_dist.export import load_model

    rep = evaluate(load_eval_config(eval_overrides(eval_root)), str(tiny_run), method="pre", say=lambda m: None)
    assert {r.method for r in rep.rows} == {"Pre"}
    backbone = load_model(tiny_run / "model.safetensors").backbone  # θ_pre, straight from the file
    builder = EpisodeBuilder(DataConfig(root=str(eval_root), image_size=16), "test", 0, ["textures", "digits"])
    for source, fl in rep.lists.items():
        # the data plane's own materialisation (no eval cache, no feature table)
        direct = [_nearest_centroid_accuracy(backbone, materialise(spec, builder)) for spec in fl.specs]
        np.testing.assert_allclose(rep.accuracies[(source, "Pre")], direct, atol=1e-9)
    # and different from the meta-trained model (θδ ≠ 0), so the test can tell them apart
    smat = evaluate(load_eval_config(eval_overrides(eval_root)), str(tiny_run), say=lambda m: None)
    assert any(not np.array_equal(smat.accuracies[(s, "SMAT")], rep.accuracies[(s, "Pre")]) for s in rep.lists)


def test_pre_from_a_backbone_file_matches_the_checkpoints_theta_pre(eval_root, tiny_run, tmp_path):
    from smat_dist.export import load_model
    from smat_dist.smat.backbone import save_backbone
    from tests.eval.conftest import TINY

    f = tmp_path / "backbone.safetensors"
    save_backbone(load_model(tiny_run / "model.safetensors").backbone, f)
    arch = [f"model.backbone.{k}={v}" for k, v in TINY.items()]
    a = evaluate(load_eval_config(eval_overrides(eval_root, f"model.backbone.checkpoint={f}", *arch)),
                 method="pre", say=lambda m: None)
    b = evaluate(load_eval_config(eval_overrides(eval_root)), str(tiny_run), method="pre", say=lambda m: None)
    for k in b.accuracies:
        assert np.array_equal(a.accuracies[k], b.accuracies[k])


def test_feature_tables_match_per_episode_forwards(eval_root, tiny_run):
    """The cached θ_pre / static features give the accuracies of plain per-episode forwards."""
    for method in ("model", "pre"):
        a = evaluate(load_eval_config(eval_overrides(eval_root)), str(tiny_run), method=method, say=lambda m: None)
        b = evaluate(load_eval_config(eval_overrides(eval_root, "feature_cache=false")), str(tiny_run),
                     method=method, say=lambda m: None)
        for k in a.accuracies:
            np.testing.assert_allclose(a.accuracies[k], b.accuracies[k], atol=1e-9)
        if method == "model":
            ea = {(r.source, r.index): r.alpha for r in a.episodes}
            for r in b.episodes:
                np.testing.assert_allclose(ea[(r.source, r.index)], r.alpha, atol=1e-5)


@pytest.mark.parametrize("feature_cache", [True, False])
def test_evaluation_uses_the_models_test_time_merge_with_gates_computed_once(eval_root, tiny_run, tmp_path,
                                                                             monkeypatch, feature_cache):
    """θ_i and α_i of evaluation are SMAT.task_weights / SMAT.task_alpha of the task (from cached
    θ_pre features or a forward), while the (M, G) test gates are computed once, not per task."""
    import dataclasses

    from smat_dist.eval.episodes import frozen_list
    from smat_dist.eval.models import describe_checkpoint
    from smat_dist.eval.worker import EpisodeEvaluator

    cfg = load_eval_config(eval_overrides(eval_root, f"feature_cache={str(feature_cache).lower()}"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16))
    ev = EpisodeEvaluator(describe_checkpoint(tiny_run), cfg)
    smat = ev.model.smat
    gate_passes = []
    test_gates = smat.test_gates
    monkeypatch.setattr(smat, "test_gates", lambda: gate_passes.append(1) or test_gates())
    specs = [sp for s in ("textures", "digits") for sp in frozen_list(cfg.data, s, "test", 3, 0, tmp_path).specs]
    episodes = [ev.reader.episode(sp) for sp in specs]
    got = [ev.task_weights(sp, ep) for sp, ep in zip(specs, episodes)]
    assert len(gate_passes) == 1  # one (M, G) pass for all six tasks
    alphas = []
    for ep, (weights, alpha) in zip(episodes, got):
        ref = smat.space.views(smat.task_weights(ep.support_x, ep.support_y))
        assert set(weights) == set(ref)
        for k, v in ref.items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(alpha, smat.task_alpha(ep.support_x, ep.support_y), rtol=0, atol=1e-6)
        assert alpha.shape == (8,) and float(alpha.sum()) == pytest.approx(1.0, abs=1e-5)
        alphas.append(alpha)
    assert float(torch.stack(alphas).std(0).max()) > 1e-3  # α depends on the task
    flat = torch.cat([got[0][0][s.name].reshape(-1) for s in smat.space.slots])
    assert not torch.equal(flat, smat.theta_pre)  # θ_i is not θ_pre


def test_pmf_checkpoint_is_labelled_and_merged_once(eval_root, tmp_path):
    from tests.eval.conftest import make_tiny_export
    from smat_dist.smat.config import GateConfig, HypernetConfig, InnerConfig, TeacherConfig

    path = make_tiny_export(tmp_path / "pmf", method="pmf", gates=GateConfig(enabled=False, num_experts=1),
                            hypernet=HypernetConfig(enabled=False), inner=InnerConfig(steps=0),
                            teacher=TeacherConfig(enabled=False, kd_weight=0.0))
    rep = evaluate(load_eval_config(eval_overrides(eval_root)), str(path), say=lambda m: None)
    assert {r.method for r in rep.rows} == {"PMF"}
    assert rep.worker_stats["episode_forward_images"] == 0  # static θ: features once per image
    assert all(r.alpha is None for r in rep.episodes)
    lbl = evaluate(load_eval_config(eval_overrides(eval_root)), str(path), label="MyPMF", say=lambda m: None)
    assert {r.method for r in lbl.rows} == {"MyPMF"}


def test_pre_backbone_file_architecture_from_metadata_or_a_clear_error(eval_root, tiny_run, tmp_path):
    import json

    from smat_dist.errors import ConfigError
    from smat_dist.export import load_model
    from smat_dist.smat.backbone import save_backbone
    from tests.eval.conftest import TINY

    backbone = load_model(tiny_run / "model.safetensors").backbone
    with_arch = tmp_path / "with_arch.safetensors"
    save_backbone(backbone, with_arch, extra={"backbone_config": json.dumps(TINY)})
    a = evaluate(load_eval_config(eval_overrides(eval_root, f"model.backbone.checkpoint={with_arch}")),
                 method="pre", say=lambda m: None)
    b = evaluate(load_eval_config(eval_overrides(eval_root)), str(tiny_run), method="pre", say=lambda m: None)
    assert all(np.array_equal(a.accuracies[k], b.accuracies[k]) for k in b.accuracies)
    bare = tmp_path / "bare.safetensors"
    save_backbone(backbone, bare)
    with pytest.raises(ConfigError, match=r"bare.safetensors.*set model.backbone.name/img_size"):
        evaluate(load_eval_config(eval_overrides(eval_root, f"model.backbone.checkpoint={bare}")),
                 method="pre", say=lambda m: None)
