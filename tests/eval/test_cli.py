"""smat-eval command line: evaluation, --compare, analyse, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smat_dist.eval.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_eval_then_compare(eval_root, tiny_run, tmp_path, capsys):
    a, b = tmp_path / "smat", tmp_path / "pre"
    base = ["--data", str(eval_root), "-q", "episodes=4"]
    assert main(["--checkpoint", str(tiny_run), "--out", str(a), *base]) == 0
    assert main(["--method", "pre", "--checkpoint", str(tiny_run / "model.safetensors"), "--out", str(b), *base]) == 0
    out = capsys.readouterr().out
    assert "| Source | SMAT |" in out and "| Source | Pre |" in out
    assert main(["--compare", str(a / "results.csv"), str(b / "results.csv"), "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| Source | SMAT | Pre |" in table
    assert [l.split("|")[1].strip() for l in table.splitlines() if l.startswith("| ")][1:] == \
        ["textures", "**ID avg**", "digits", "**OOD avg**"]
    assert (tmp_path / "t.csv").is_file()


def test_module_entry_point_runs(eval_root, tiny_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "smat_dist.eval.cli", "--checkpoint", str(tiny_run), "--data",
                        str(eval_root), "--out", str(tmp_path), "episodes=2", "sources=[digits]", "-q"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "| digits |" in r.stdout and (tmp_path / "results.csv").is_file()


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/nope"], "no such file or run directory"),
    (["--checkpoint", "{tmp}"], "no model.safetensors in this run directory"),
    (["--checkpoint", "{run}", "finetune.stepz=3"], "finetune.stepz"),
    (["--checkpoint", "{run}", "modes=[none,bogus]"], "modes: unknown ['bogus']"),
    (["--checkpoint", "{run}", "sources=[nosuch]"], "sources: 'nosuch' not found"),
    (["--checkpoint", "{run}", "data.image_size=64"], "differs from the model's backbone.img_size (16)"),
    (["--checkpoint", "{bogus_file}"], "not a safetensors file"),
    (["--method", "pre"], "--method pre needs pre-trained weights"),
    (["--method", "pre", "model.backbone.checkpoint={tmp}/missing.safetensors"], "missing.safetensors"),
    ([], "--checkpoint RUN_OR_FILE is required"),
])
def test_bad_inputs_give_clear_errors(eval_root, tiny_run, tmp_path, capsys, args, message):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("not tensors")
    fill = {"tmp": str(tmp_path), "run": str(tiny_run), "bogus_file": str(bogus)}
    argv = [a.format(**fill) for a in args] + ["--data", str(eval_root), "-q", "episodes=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("smat-eval: error:") and message in err, err


def test_missing_data_root_is_named(tiny_run, tmp_path, capsys):
    assert main(["--checkpoint", str(tiny_run), "--data", str(tmp_path / "nodata"), "-q"]) == 2
    assert "nodata" in capsys.readouterr().err
    assert main(["--checkpoint", str(tiny_run), "-q"]) == 2
    assert "--data DATA_DIR is required" in capsys.readouterr().err


def test_compare_errors_name_the_file(tmp_path, capsys):
    assert main(["--compare", str(tmp_path / "x.csv")]) == 2
    assert "x.csv: no such results file" in capsys.readouterr().err


def test_analyse_writes_the_figures(eval_root, tiny_run, tmp_path, capsys):
    import torch

    from smat_dist.export import load_model

    out = tmp_path / "analysis"
    assert main(["analyse", str(tiny_run), "--data", str(eval_root), "--out", str(out),
                 "analyse.episodes_per_source=3"]) == 0
    names = {"nonzero_by_layer_type.png", "nonzero_by_depth.png", "mask_overlap.png", "expert_selection.png",
             "training_curves.png"}
    assert names <= {p.name for p in out.iterdir()}
    for n in names:
        data = (out / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, n
    info = json.loads((out / "analysis.json").read_text())
    m = load_model(tiny_run / "model.safetensors")
    z = (torch.sigmoid(m.gates.logits.detach()) * 1.2 - 0.1).clamp(0, 1) > 0
    assert info["nonzero_per_expert"] == z.sum(1).tolist()
    by_type = info["by_layer_type"]
    assert np.array(by_type["nonzero"]).sum(1).tolist() == info["nonzero_per_expert"]
    assert sum(by_type["size"]) == m.space.numel
    qkv = by_type["groups"].index("attn qkv")
    qkv_slots = [s for s in m.space.slots if ".attn.qkv." in s.name]
    assert by_type["nonzero"][0][qkv] == sum(int(z[0, s.offset:s.offset + s.numel].sum()) for s in qkv_slots)
    assert info["by_depth"]["groups"] == ["embed", "0", "final"]
    J = np.array(info["jaccard"])
    zz = z.double()
    inter = float(zz[0] @ zz[1])
    assert J[0, 1] == pytest.approx(inter / (float(zz[0].sum() + zz[1].sum()) - inter))
    assert np.allclose(np.diag(J), 1.0) and np.allclose(J, J.T)
    alpha = info["alpha"]
    assert sorted(alpha["sources"]) == ["digits", "textures"] and alpha["kind"] == {"digits": "OOD", "textures": "ID"}
    assert np.allclose(np.array(alpha["mean"]).sum(1), 1.0, atol=1e-5)
    assert len(alpha["per_episode"]["digits"]) == 3


def test_analyse_without_data_or_masks(tmp_path, capsys):
    from smat_dist.smat.config import GateConfig, HypernetConfig, InnerConfig, TeacherConfig
    from tests.eval.conftest import make_tiny_export

    path = make_tiny_export(tmp_path / "pmf", method="pmf", gates=GateConfig(enabled=False, num_experts=1),
                            hypernet=HypernetConfig(enabled=False), inner=InnerConfig(steps=0),
                            teacher=TeacherConfig(enabled=False, kd_weight=0.0))
    assert main(["analyse", str(path), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "no expert masks" in out and "training_curves" in out
    assert not (tmp_path / "a" / "mask_overlap.png").exists()
