"""Learning-rate search: the reference's selection rule, on valid episodes (test fallback for OOD)."""

from __future__ import annotations

from smat_dist.eval.config import load_eval_config
from smat_dist.eval.runner import evaluate, pick_lr
from tests.eval.conftest import eval_overrides


def test_pick_lr_strictly_best_ties_keep_the_smaller():
    grid = [0.0, 1e-4, 1e-3, 1e-2]
    assert pick_lr(grid, [0.5, 0.5, 0.5, 0.5]) == 0.0
    assert pick_lr(grid, [0.5, 0.6, 0.6, 0.4]) == 1e-4
    assert pick_lr(grid, [0.5, 0.4, 0.4, 0.7]) == 1e-2


def test_hps_uses_valid_split_and_falls_back_to_unscored_test_episodes(eval_root, tiny_run, tmp_path):
    ov = eval_overrides(eval_root, "modes=[none,full,lora]", "hps.enabled=true", "hps.episodes=2",
                        "hps.grid=[0,0.01]", "finetune.steps=2", f"episodes_dir={tmp_path}")
    rep = evaluate(load_eval_config(ov), str(tiny_run), say=lambda m: None)
    hps = {(r.source, r.mode): r.hps for r in rep.rows}
    assert hps[("textures", "full")] == "valid" and hps[("digits", "full")] == "test"
    assert hps[("textures", "none")] == "off"
    assert (tmp_path / "valid" / "textures-n2-seed0.jsonl").is_file()
    assert (tmp_path / "test" / "digits-n2-seed0-start6.jsonl").is_file()  # after the 6 scored episodes
    for (s, m), lr in rep.lrs.items():
        assert lr in ((0.0, 0.01) if m == "full" else (0.0, 0.1)), (s, m, lr)  # LoRA: 10 x the grid
    rows = {(r.source, r.mode): r for r in rep.rows}
    assert rows[("textures", "lora")].lr == f"{rep.lrs[('textures', 'lora')]:g}"
