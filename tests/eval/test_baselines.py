"""The Pre baseline against nearest-centroid computed by hand; θ_i against SMAT.task_weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smat_dist.eval.config import load_eval_config
from smat_dist.eval.runner import evaluate
from tests.eval.conftest import eval_overrides


def _nearest_centroid_accuracy(backbone, ep) -> float:
    with torch.no_grad():
        fs, fq = backbone(ep.support_x), backbone(ep.query_x)
    ways = int(ep.support_y.max()) + 1
    cent = torch.stack([fs[ep.support_y == c].mean(0) for c in range(ways)])
    sim = F.normalize(fq, dim=-1) @ F.normalize(cent, dim=-1).t()
    return 100.0 * float((sim.argmax(1) == ep.query_y).float().mean())


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


def test_task_weights_equal_smat_task_weights(eval_root, tiny_run):
    from smat_dist.eval.models import describe_checkpoint, build_task_model
    from smat_dist.smat.toy import ToyEpisodes

    tm = build_task_model(describe_checkpoint(tiny_run))
    ep = ToyEpisodes(num_classes=10, image_size=16, ways=4, shots=3, queries=2).episode(7)
    params, alpha = tm.task_params(ep.support_x, ep.support_y)
    ref = tm.smat.space.views(tm.smat.task_weights(ep.support_x, ep.support_y))
    for k, v in ref.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=1e-6)
    assert alpha.shape == (8,) and float(alpha.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(alpha.max() - alpha.min()) > 1e-3  # experts are weighted differently
    # θ_i differs from θ_pre only where some expert's mask is on
    flat = torch.cat([params[s.name].reshape(-1) for s in tm.smat.space.slots])
    assert not torch.equal(flat, tm.smat.theta_pre)


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
