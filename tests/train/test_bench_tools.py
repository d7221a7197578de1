"""tools/bench_step.py survives a failing configuration, and tools/gpu_check.py's bf16-vs-fp32 step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO


def test_bench_step_reports_a_failing_configuration_and_keeps_going(tmp_path):
    """M=0 is refused by the model (a real failure in a child): its error is printed, M=1 is still measured,
    the JSON holds both rows, and the exit status says something failed."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_step.py"), "--backbones", "tiny",
                           "--threads", "1", "--repeats", "1", "--tasks-per-step", "1", "--image-size", "24",
                           "--experts", "0", "1", "--json", str(out)],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "FAILED   tiny smat M=0" in proc.stderr and "gates.num_experts must be >= 1" in proc.stderr
    assert "measured tiny smat M=1" in proc.stdout and "1 configuration(s) failed" in proc.stdout
    rows = json.loads(out.read_text())
    ok = {(r["kind"], r["experts"]) for r in rows if "error" not in r}
    assert ok == {("protonet", 0), ("smat", 1)}
    assert [r["experts"] for r in rows if "error" in r] == [0]
    assert all(r["tflop_per_task"] > 0 for r in rows if "error" not in r)


def test_gpu_check_compares_bf16_with_fp32_from_the_same_state(tmp_path):
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "precision", str(results), "cpu",
                           "--tiny"], env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    floor, bf16 = [json.loads(line) for line in results.read_text().splitlines()]
    assert floor["compare"].startswith("fp32 vs fp32") and bf16["compare"] == "bf16 vs fp32"
    groups = ("theta_delta", "mask_logits", "hypernetwork")
    assert all(floor[f"{g}_rel_err"] == 0.0 for g in groups)  # CPU fp32 is deterministic: the floor is 0
    for g in groups:  # bf16 differs, but points the same way
        assert 0.0 < bf16[f"{g}_rel_err"] < 0.1 and bf16[f"{g}_cosine"] > 0.99
    assert 0.0 < bf16["loss_rel_err"] < 1e-2
    assert "bf16 vs fp32" in proc.stdout
