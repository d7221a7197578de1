"""The README's first command, shortened: every stage runs for real, on tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1200)
def test_shortened_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "smat_dist.demo", "--out", str(out), "--scale", "0.3",
           "pretrain.epochs=1", "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
           "eval.episodes=4"]
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert stage in log, stage  # progress is shown for every stage
    table = (out / "results.md").read_text()
    assert log.count("| Source | Pre | PMF | SMAT |") == 1, log[-3000:]  # the comparison is printed once
    assert log.index("[6/6]") < log.index("| Source | Pre | PMF | SMAT |")
    assert log.count("test episodes from") == 7, log[-3000:]  # the three methods' shared lists, listed once
    for column in ("Pre", "PMF", "SMAT"):
        assert column in table
    for row in ("objects", "glyphs", "textures", "doodles", "signs", "digits", "patterns", "ID avg", "OOD avg"):
        assert row in table, row
    for method in ("pmf", "smat"):
        assert (out / method / "model.safetensors").exists()
        assert (out / method / "metrics.jsonl").read_text().count("\n") == 2
    assert (out / "backbone.safetensors").exists()
