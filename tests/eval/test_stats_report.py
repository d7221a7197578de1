"""CI arithmetic, the Table-1 layout, --compare, and the files evaluate() writes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from smat_dist.eval.report import ReportError, ResultRow, compare, markdown_table, read_results, write_results
from smat_dist.eval.stats import mean_ci95


def test_ci_half_width_hand_computed():
    # mean 75; deviations -15, 5, -5, 15 -> sample variance 500/3; s = 12.9099...; n = 4
    mean, ci, std, n = mean_ci95([60.0, 80.0, 70.0, 90.0])
    assert (mean, n) == (75.0, 4)
    assert std == pytest.approx(math.sqrt(500.0 / 3.0), rel=1e-12)
    assert ci == pytest.approx(1.96 * math.sqrt(500.0 / 3.0) / 2.0, rel=1e-12)
    assert ci == pytest.approx(12.651746, abs=1e-6)  # 1.96 * 12.909944 / 2
    # the sample (ddof=1) std, not the population std
    assert ci != pytest.approx(1.96 * np.std([60, 80, 70, 90]) / 2.0)


def test_ci_degenerate_sizes():
    m, ci, std, n = mean_ci95([42.0])
    assert (m, n) == (42.0, 1) and math.isnan(ci) and math.isnan(std)
    m, ci, std, n = mean_ci95([])
    assert n == 0 and math.isnan(m)
    assert mean_ci95([50.0, 50.0, 50.0])[1] == 0.0


def _row(source, kind, method, mode, acc, ci=1.0, n=600):
    return ResultRow(source, kind, "test", method, mode, acc, ci, 2.0, n, "sha", 0, "", "off", "ckpt")


def test_table_layout_rows_columns_and_unweighted_averages():
    rows = [_row("a", "ID", "SMAT", "none", 80.0), _row("b", "ID", "SMAT", "none", 60.0),
            _row("c", "OOD", "SMAT", "none", 50.0), _row("a", "ID", "SMAT+full", "full", 90.0),
            _row("b", "ID", "SMAT+full", "full", 70.0), _row("c", "OOD", "SMAT+full", "full", 55.0),
            _row("a", "ID", "SMAT+LoRA", "lora", 85.0), _row("a", "ID", "Pre", "none", 10.0, n=600)]
    text = markdown_table(rows)
    lines = [l for l in text.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Source", "SMAT", "Pre", "SMAT+full", "SMAT+LoRA"]  # w/o FT columns first, then +full, +LoRA
    firsts = [l.strip("|").split("|")[0].strip() for l in lines[2:]]
    assert firsts == ["a", "b", "**ID avg**", "c", "**OOD avg**"]
    id_avg = [c.strip() for c in lines[4].strip("|").split("|")]
    assert id_avg[1] == "**70.00**"  # (80 + 60) / 2
    assert id_avg[3] == "**80.00**"
    assert id_avg[2] == "**10.00**†" and "†" in text  # Pre only has source a
    assert "80.00 ± 1.00" in lines[2]
    assert lines[3].split("|")[3].strip() == "–"  # Pre on b: missing


def test_compare_merges_and_disambiguates(tmp_path):
    a = tmp_path / "runA" / "results.csv"
    b = tmp_path / "runB" / "results.csv"
    a.parent.mkdir()
    b.parent.mkdir()
    write_results([_row("x", "ID", "SMAT", "none", 80.0), _row("y", "OOD", "SMAT", "none", 40.0)], a)
    write_results([_row("x", "ID", "Pre", "none", 60.0), _row("y", "OOD", "Pre", "none", 30.0),
                   _row("x", "ID", "SMAT", "none", 81.0)], b)
    rows, table = compare([a, b])
    methods = {r.method for r in rows}
    assert methods == {"SMAT (runA)", "SMAT (runB)", "Pre"}
    assert "| Source | SMAT (runA) | Pre | SMAT (runB) |" in table
    assert "| x | 80.00 ± 1.00 | 60.00 ± 1.00 | 81.00 ± 1.00 |" in table
    assert "| **OOD avg** | **40.00** | **30.00** | – |" in table
    assert read_results(a)[0].accuracy == 80.0


def test_compare_bad_inputs(tmp_path):
    with pytest.raises(ReportError, match="no such results file"):
        compare([tmp_path / "missing.csv"])
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ReportError, match=r"bad.csv: not a smat-eval results.csv"):
        compare([bad])
    empty = tmp_path / "empty.csv"
    write_results([], empty)
    with pytest.raises(ReportError, match="no result rows"):
        compare([empty])
    broken = tmp_path / "broken.csv"
    write_results([_row("x", "ID", "SMAT", "none", 1.0)], broken)
    broken.write_text(broken.read_text().replace("1.0000", "abc", 1))
    with pytest.raises(ReportError, match=r"broken.csv:2: bad value"):
        compare([broken])


def test_evaluate_outputs_are_consistent(eval_root, tiny_run, tmp_path):
    from smat_dist.eval.config import load_eval_config
    from smat_dist.eval.runner import evaluate
    from tests.eval.conftest import eval_overrides

    out = tmp_path / "out"
    rep = evaluate(load_eval_config(eval_overrides(eval_root)), str(tiny_run), out=out, say=lambda m: None)
    assert {p.name for p in out.iterdir()} >= {"results.csv", "episodes.csv", "table.md", "eval_config.yaml",
                                              "summary.json", "alpha.json"}
    with open(out / "results.csv") as f:
        res = list(csv.DictReader(f))
    with open(out / "episodes.csv") as f:
        eps = list(csv.DictReader(f))
    assert [(r["source"], r["kind"], r["method"]) for r in res] == [("digits", "OOD", "SMAT"), ("textures", "ID", "SMAT")]
    for r in res:
        accs = [float(e["accuracy"]) for e in eps if e["source"] == r["source"]]
        assert len(accs) == int(r["n"]) == 6
        mean, ci, std, n = mean_ci95(accs)
        assert float(r["accuracy"]) == pytest.approx(mean, abs=1e-4)
        assert float(r["ci95"]) == pytest.approx(1.96 * np.std(accs, ddof=1) / math.sqrt(6), abs=1e-4)
        assert r["episodes_sha256"] == rep.lists[r["source"]].sha256 and len(r["episodes_sha256"]) == 64
    assert (out / "table.md").read_text() == rep.table
    assert "**ID avg**" in rep.table and "**OOD avg**" in rep.table
