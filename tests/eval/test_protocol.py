"""Tables that cannot mislead: every method groups sources ID/OOD by the run's training sources,
and every method is scored on the same frozen episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smat_dist.eval.config import load_eval_config
from smat_dist.eval.report import compare, markdown_table
from smat_dist.eval.runner import EvalReport, evaluate
from tests.eval.conftest import TINY, eval_overrides, make_tiny_export

quiet = dict(say=lambda m: None)


@pytest.fixture(scope="module")
def three_source_root(eval_root, tmp_path_factory) -> Path:
    """textures and objects (both with a train split) and digits (test only)."""
    from smat_dist.data.synth import build_synth
    from smat_dist.data.writer import WriteOptions

    root = tmp_path_factory.mktemp("three-sources")
    for s in ("textures", "digits"):
        (root / s).symlink_to(eval_root / s, target_is_directory=True)
    build_synth(str(root), seed=1, scale=0.5, sources=("objects",),
                opts=WriteOptions(shard_bytes=1 << 20, tier="native", workers=1, progress=False))
    return root


def test_every_method_groups_sources_by_the_runs_training_sources(three_source_root, tmp_path):
    run = make_tiny_export(tmp_path / "run", train_sources=["textures"]).parent
    cfg = load_eval_config(eval_overrides(three_source_root, "episodes=2"))
    smat = evaluate(cfg, str(run), out=tmp_path / "smat", **quiet)
    pre = evaluate(cfg, str(run), method="pre", out=tmp_path / "pre", **quiet)
    expect = {"objects": "OOD", "textures": "ID", "digits": "OOD"}  # objects has train classes, unused
    for rep in (smat, pre):
        assert {r.source: r.kind for r in rep.rows} == expect, rep.label
    _, table = compare([tmp_path / "smat" / "results.csv", tmp_path / "pre" / "results.csv"])
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == \
        ["textures", "**ID avg**", "digits", "objects", "**OOD avg**"]
    assert "for one input" not in table  # no source grouped differently by the two

    # Pre from a backbone file has no run to read: every source with train classes is ID unless
    # id_sources names the run's training sources.
    from smat_dist.export import load_model
    from smat_dist.smat.backbone import save_backbone

    f = tmp_path / "backbone.safetensors"
    save_backbone(load_model(run / "model.safetensors").backbone, f, extra={"backbone_config": json.dumps(TINY)})
    bare = evaluate(load_eval_config(eval_overrides(three_source_root, "episodes=2", f"model.backbone.checkpoint={f}")),
                    method="pre", **quiet)
    assert {r.source: r.kind for r in bare.rows} == {**expect, "objects": "ID"}
    told = evaluate(load_eval_config(eval_overrides(three_source_root, "episodes=2", f"model.backbone.checkpoint={f}",
                                                    "id_sources=[textures]")), method="pre", **quiet)
    assert {r.source: r.kind for r in told.rows} == expect


def assert_same_episodes(a: EvalReport, b: EvalReport) -> None:
    """Both reports scored, per source, exactly the episodes of one frozen list, in list order."""
    assert sorted(a.lists) == sorted(b.lists)
    for rep in (a, b):
        for s, fl in rep.lists.items():
            assert {r.episodes_sha256 for r in rep.rows if r.source == s} == {fl.sha256}, (rep.label, s)
            scored = [(r.index, r.ways, r.support, r.query) for r in rep.episodes if r.source == s]
            assert scored == [(sp.index, sp.ways, len(sp.support), len(sp.query)) for sp in fl.specs], (rep.label, s)
    for s in a.lists:
        assert a.lists[s].sha256 == b.lists[s].sha256, f"{s}: {a.label} and {b.label} scored different episode lists"
    assert [(r.source, r.index) for r in a.episodes] == [(r.source, r.index) for r in b.episodes]
    assert "different episode lists" not in markdown_table(a.rows + b.rows)


def _pre_backbone_at_32px(tmp_path) -> Path:
    """A backbone file at 32 px: Pre then reads images at another resolution than the 16 px run."""
    from smat_dist.smat.backbone import build_backbone, save_backbone
    from smat_dist.smat.config import BackboneConfig

    arch = {**TINY, "img_size": 32}
    f = tmp_path / "pre32.safetensors"
    save_backbone(build_backbone(BackboneConfig(**arch)), f, extra={"backbone_config": json.dumps(arch)})
    return f


def test_every_method_is_scored_on_the_same_episode_lists(eval_root, tiny_run, tmp_path):
    """SMAT with fine-tuning at 16 px and Pre at 32 px: the resolution differs, the tasks must not."""
    ov = eval_overrides(eval_root, "episodes=4", f"episodes_dir={tmp_path / 'lists'}")
    smat = evaluate(load_eval_config(ov + ["modes=[none,full]", "finetune.steps=1"]), str(tiny_run), **quiet)
    pre = evaluate(load_eval_config(ov + [f"model.backbone.checkpoint={_pre_backbone_at_32px(tmp_path)}"]),
                   method="pre", **quiet)
    assert (smat.label, pre.label) == ("SMAT", "Pre")
    assert_same_episodes(smat, pre)


def test_the_episode_list_check_catches_lists_that_depend_on_the_model(eval_root, tiny_run, tmp_path, monkeypatch):
    from smat_dist.eval import runner

    real = runner.frozen_list

    def list_seeded_by_resolution(data_cfg, source, split, n, seed, directory, start=0):
        return real(data_cfg, source, split, n, seed + data_cfg.image_size, directory, start)

    monkeypatch.setattr(runner, "frozen_list", list_seeded_by_resolution)
    ov = eval_overrides(eval_root, "episodes=4", f"episodes_dir={tmp_path / 'lists'}")
    smat = evaluate(load_eval_config(ov), str(tiny_run), **quiet)
    pre = evaluate(load_eval_config(ov + [f"model.backbone.checkpoint={_pre_backbone_at_32px(tmp_path)}"]),
                   method="pre", **quiet)
    with pytest.raises(AssertionError, match="scored different episode lists"):
        assert_same_episodes(smat, pre)
    assert "digits`: methods were scored on different episode lists" in markdown_table(smat.rows + pre.rows)
