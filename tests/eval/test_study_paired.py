"""tools/study.py pairs cells through smat_dist.eval.stats: seeds matched, episode lists checked."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from smat_dist.eval.stats import episode_interval, paired_differences, two_level_interval

from .test_paired_stats import _write_eval

STUDY = Path(__file__).resolve().parents[2] / "tools" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_under_test", STUDY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_sweep_csv(path: Path, rows: list) -> None:
    """A study's published sweep.csv with just the columns the pairing reads."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _cells(tmp_path, *, smat_sha="abc"):
    rng = np.random.default_rng(0)
    base = {"x": rng.uniform(40, 80, 20), "y": rng.uniform(10, 40, 20)}
    rows = []
    for method, shift in (("pmf", 0.0), ("smat", 1.0)):
        for seed in range(3):
            d = tmp_path / f"{method}{seed}"
            noise = rng.normal(0, 1, 20)
            _write_eval(d, method.upper(), {"x": ("ID", base["x"] + shift * seed),
                                            "y": ("OOD", base["y"] + shift * (2 + noise))},
                        sha=smat_sha if method == "smat" else "abc")
            rows.append(dict(status="done", cell=f"{method}{seed}", eval_dir=str(d), run_dir=str(d), method=method,
                             train_sources="x", seed=str(seed), id_avg="60", id_ci95="1", ood_avg="30",
                             ood_ci95="1", sparsity_reached="0.8" if method == "smat" else "",
                             num_experts="2" if method == "smat" else "1", tau="0.8" if method == "smat" else ""))
    return rows


def test_summary_reports_both_intervals_from_the_package(study, tmp_path):
    study.scores.cache_clear()
    study.per_source.cache_clear()
    rows = _cells(tmp_path)
    text, deltas = study.summarise(tmp_path, rows, ["config", "train.seed"], {})
    from smat_dist.eval.report import read_episode_scores

    a = [read_episode_scores(tmp_path / f"smat{s}") for s in range(3)]
    b = [read_episode_scores(tmp_path / f"pmf{s}") for s in range(3)]
    d = paired_differences(a, b, ["y"])
    line = next(l for l in text.splitlines() if l.startswith("| SMAT M=2"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[9] == str(episode_interval(d)) and cols[12] == str(two_level_interval(d))
    assert cols[8] == "+1.00 ± 0.00" and cols[11].startswith("+1.00 ± ")  # ID: seed s is s points better
    assert float(cols[11].split("± ")[1]) > 1.0  # the seeds' spread (0, 1, 2) is in the two-level interval
    assert cols[13] == "unresolved"
    assert deltas[0]["ood"] == (episode_interval(d).mean, episode_interval(d).half)


def test_study_stops_on_different_episode_lists(study, tmp_path):
    study.scores.cache_clear()
    study.per_source.cache_clear()
    rows = _cells(tmp_path, smat_sha="zzz")
    with pytest.raises(SystemExit, match="different episode lists"):
        study.summarise(tmp_path, rows, ["config", "train.seed"], {})


def test_labels_of_cells_without_gates(study):
    row = dict(method="pmf-kd-pre", num_experts="1", tau="", train_sources="x")
    assert study._label(row, ["config", "train.seed"]) == "PMF-KD-PRE"
    assert study._label(dict(row, method="smat", num_experts="2", tau="0.8"), ["config"]) == "SMAT M=2 τ=0.8"


def test_constraint_table_reads_the_end_of_each_run(study, tmp_path):
    import json

    def run(name, sparsity_by_step):
        d = tmp_path / name
        d.mkdir()
        with (d / "metrics.jsonl").open("w") as f:
            for step, sp in sparsity_by_step:
                f.write(json.dumps(dict(step=step, sparsity=sp, sparsity_test=[0.9] * len(sp), **{"lambda": [0.1] * len(sp)}))
                        + "\n")
        return d

    ok = run("ok", [(5, [0.2, 0.3]), (10, [0.79, 0.81])] + [(15 + 5 * i, [0.80, 0.81]) for i in range(4)])
    late = run("late", [(5, [0.1, 0.1])] + [(10 + 5 * i, [0.95, 0.60]) for i in range(4)])
    swing = run("swing", [(5, [0.80, 0.80]), (10, [0.86, 0.85])] + [(15 + 5 * i, [0.80, 0.79]) for i in range(4)])
    rows, table = study.constraint_table({(2, 0.8): ok, (2, 0.5): late, (4, 0.8): swing})
    by = {(r["M"], r["tau"]): r for r in rows}
    assert by[2, 0.8]["within"] and by[2, 0.8]["at_least"] and by[2, 0.8]["first_step"] == 10
    assert by[2, 0.8]["settled_step"] == 10
    assert by[2, 0.8]["tail"] == [0.80, 0.81]  # the last 4 logged rows
    assert not by[2, 0.5]["within"] and by[2, 0.5]["at_least"] and by[2, 0.5]["first_step"] is None  # expert 0 overshoots
    assert by[2, 0.5]["settled_step"] is None
    assert by[4, 0.8]["first_step"] == 5 and by[4, 0.8]["settled_step"] == 15  # in, out (overshoot), in for good
    assert "| 2 | 0.8 | 0.800 0.810 | 0.805 (0.800–0.810) | yes | yes | 10 | 10 |" in table


def test_gate_logit_stats_agree_with_the_model_and_the_training_draw(study, tmp_path):
    """The constraint study's gate diagnostics from an export: the test sparsity at the run's test_beta is
    the model's own; at test_beta = β a test gate is 0 where a training draw is 0 with probability > ½; the
    expected sparsity is the mean of the draws' sparsity."""
    import dataclasses

    import torch

    from smat_dist.export import export_model
    from smat_dist.smat import SMAT
    from tests.smat.conftest import tiny_model_config

    cfg = tiny_model_config()
    cfg = dataclasses.replace(cfg, gates=dataclasses.replace(cfg.gates, num_experts=2))
    model = SMAT(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        model.gates.logits.copy_(torch.randn(model.gates.logits.shape, generator=g) * 2.0 - 2.0)
    run = tmp_path / "run"
    run.mkdir()
    export_model(model, run / "model.safetensors")
    st = study.gate_logit_stats(run)
    assert st is not None and st["test_beta"] == cfg.gates.test_beta == 1.0
    assert st["test_at_test_beta"] == pytest.approx(model.gates.test_sparsity().double().tolist(), abs=1e-6)  # fp32 there
    draws = torch.stack([model.gates.sample(seed).sparsity.double() for seed in range(40)])
    assert st["expected"] == pytest.approx(draws.mean(0).tolist(), abs=0.01)
    phi = model.gates.logits.detach().double()
    p_zero = torch.sigmoid(cfg.gates.beta * torch.log(torch.tensor(-cfg.gates.gamma / cfg.gates.zeta)) - phi)
    assert st["test_at_beta"] == pytest.approx((p_zero >= 0.5).double().mean(1).tolist(), abs=1e-6)
    assert all(b > a for a, b in zip(st["test_at_test_beta"], st["test_at_beta"]))  # the test slope opens gates


def test_long_runs_pair_with_the_published_short_cells_of_the_same_method_and_seed(study, tmp_path):
    rng = np.random.default_rng(3)
    docs = tmp_path / "docs"
    short_rows, long_rows = [], []
    for seed in range(3):
        ident, ood = rng.uniform(40, 80, 20), rng.uniform(10, 40, 20)
        cell = f"config-smat_seed-{seed}_x"
        _write_eval(docs / "attribution" / "episodes" / cell, "SMAT", {"x": ("ID", ident), "y": ("OOD", ood)})
        short_rows.append(dict(cell=cell, status="done", method="SMAT", seed=str(seed)))
        d = tmp_path / "long" / str(seed)
        _write_eval(d, "SMAT", {"x": ("ID", ident), "y": ("OOD", ood + 2.0 + seed)})
        long_rows.append(dict(cell=f"long{seed}", status="done", method="SMAT", seed=str(seed), eval_dir=str(d)))
    _write_sweep_csv(docs / "attribution" / "sweep.csv", short_rows)
    row = study.long_contrasts(long_rows, docs).splitlines()[2]
    cols = [c.strip() for c in row.split("|")[1:-1]]
    assert cols[0] == "SMAT (480 − 160 steps)" and cols[1] == "3"
    assert cols[2] == "+0.00 ± 0.00" and cols[3].startswith("+3.00 ± ")  # ID unchanged, OOD + 2, 3, 4
    assert cols[5].startswith("+3.00 ± ") and float(cols[5].split("± ")[1]) > float(cols[3].split("± ")[1])
    # a short cell scored on another episode list stops the study
    _write_eval(tmp_path / "long" / "other", "SMAT", {"x": ("ID", np.ones(20)), "y": ("OOD", np.ones(20))}, sha="zzz")
    long_rows[0]["eval_dir"] = str(tmp_path / "long" / "other")
    study.scores.cache_clear()
    study.per_source.cache_clear()
    with pytest.raises(SystemExit, match="episode"):
        study.long_contrasts(long_rows, docs)
    assert "run `python tools/study.py attribution` first" in study.long_contrasts(long_rows, tmp_path / "none")


def test_long_tau_cells_pair_by_tau_with_the_long_studys_cells_of_the_same_seed(study, tmp_path):
    """long_tau: cells grouped by τ, each paired with the long study's SMAT (or PMF) cell of its seed."""
    rng = np.random.default_rng(4)
    docs = tmp_path / "docs"
    ref_rows, rows = [], []
    for seed in range(3):
        ident, ood = rng.uniform(40, 80, 20), rng.uniform(10, 40, 20)
        for method, shift in (("SMAT", 0.0), ("PMF", -1.0)):
            cell = f"config-{method}_seed-{seed}"
            _write_eval(docs / "long" / "episodes" / cell, method, {"x": ("ID", ident + shift), "y": ("OOD", ood)})
            ref_rows.append(dict(cell=cell, status="done", method=method, seed=str(seed)))
        for tau, d_id in (("0.5000", -1.0), ("0.9500", -2.0)):
            d = tmp_path / "cells" / f"{tau}-{seed}"
            _write_eval(d, "SMAT", {"x": ("ID", ident + d_id), "y": ("OOD", ood)})
            rows.append(dict(cell=d.name, status="done", method="SMAT", seed=str(seed), tau=tau, eval_dir=str(d)))
    _write_sweep_csv(docs / "long" / "sweep.csv", ref_rows)
    table = study.long_contrasts(rows, docs, ref_study="long", group="tau", label="τ = {method} − τ = 0.8")
    cols = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert [c[0] for c in cols] == ["τ = 0.5 − τ = 0.8", "τ = 0.95 − τ = 0.8"] and all(c[1] == "3" for c in cols)
    assert [c[2] for c in cols] == ["-1.00 ± 0.00", "-2.00 ± 0.00"] and all(c[3] == "+0.00 ± 0.00" for c in cols)
    vs_pmf = study.long_contrasts(rows, docs, against="PMF", ref_study="long", group="tau", label="τ = {method} − {other}")
    cols = [[c.strip() for c in line.split("|")[1:-1]] for line in vs_pmf.splitlines()[2:]]
    assert [(c[0], c[2]) for c in cols] == [("τ = 0.5 − PMF", "+0.00 ± 0.00"), ("τ = 0.95 − PMF", "-1.00 ± 0.00")]


def test_short_tau_contrasts_read_the_published_outlier_and_attribution_cells(study, tmp_path):
    """At 160 steps the τ contrast pairs the outlier study's published cells (their episodes/ copies, not the
    sweep's eval dirs) with the attribution study's cells of the same seed."""
    rng = np.random.default_rng(5)
    base = [(rng.uniform(40, 80, 20), rng.uniform(10, 40, 20)) for _ in range(2)]
    for name, rows in (("outlier", []), ("attribution", [])):
        for seed in range(2):
            ident, ood = base[seed]
            for method, tau, shift in ((("SMAT", "0.9500", 0.5),) if name == "outlier" else
                                       (("SMAT", "0.8000", 0.0), ("PMF", "", 0.0))):
                cell = f"{name}-{method}-{seed}"
                _write_eval(tmp_path / name / "episodes" / cell, method, {"x": ("ID", ident), "y": ("OOD", ood + shift)})
                rows.append(dict(cell=cell, status="done", method=method, seed=str(seed), tau=tau, eval_dir="/gone"))
        _write_sweep_csv(tmp_path / name / "sweep.csv", rows)
    study.scores.cache_clear()
    study.per_source.cache_clear()
    lines = [line for line in study.short_tau_contrasts(tmp_path).splitlines() if line.startswith("| 160 steps")]
    assert [line.split("|")[1].strip() for line in lines] == ["160 steps: τ = 0.95 − τ = 0.8", "160 steps: τ = 0.95 − PMF"]
    assert all(line.split("|")[3].strip() == "+0.00 ± 0.00" and line.split("|")[4].strip() == "+0.50 ± 0.00"
               for line in lines)  # ID equal, every OOD episode + 0.5
    assert "run `python tools/study.py outlier` first" in study.short_tau_contrasts(tmp_path / "none")


def test_null_exports_change_only_the_hypernetwork_or_the_temperature(study, tmp_path):
    """The specialisation study's nulls: a re-initialised hypernetwork (seeded), the task counter at 0."""
    import torch

    from smat_dist.export import export_model, load_model
    from smat_dist.smat import SMAT
    from tests.smat.conftest import tiny_model_config

    model = SMAT(tiny_model_config())
    with torch.no_grad():
        model.tasks_seen.fill_(500)
        for p in model.hypernet.parameters():
            p.add_(1.0)  # "trained"
    trained = export_model(model, tmp_path / "run" / "model.safetensors")
    ref = load_model(trained)
    temp_only = load_model(study.null_export(trained, tmp_path / "t.safetensors", seed=1, fresh=True, at_start=False))
    untrained = load_model(study.null_export(trained, tmp_path / "u.safetensors", seed=1, fresh=True, at_start=True))
    other_seed = load_model(study.null_export(trained, tmp_path / "o.safetensors", seed=2, fresh=True, at_start=False))
    assert temp_only.temperature() == ref.temperature() < untrained.temperature() == ref.temperature(0)
    for name, p in ref.hypernet.state_dict().items():
        assert not torch.equal(p, temp_only.hypernet.state_dict()[name]) or p.numel() == 0 or name.endswith(("u", "v"))
        assert torch.equal(temp_only.hypernet.state_dict()[name], untrained.hypernet.state_dict()[name])
    assert not torch.equal(temp_only.hypernet.keys, other_seed.hypernet.keys)
    for name, p in ref.state_dict().items():  # θδ, gate logits, λ untouched
        if not name.startswith("hypernet.") and name != "tasks_seen":
            assert torch.equal(p, temp_only.state_dict()[name]) and torch.equal(p, untrained.state_dict()[name])


def test_seed_level_table_pairs_each_seed_with_its_pmf_cell(study):
    from scipy.stats import t

    rows = []
    for seed, (pmf, smat) in enumerate([((60.0, 30.0), (61.0, 31.0)), ((62.0, 31.0), (62.5, 33.0)),
                                        ((61.0, 29.0), (60.0, 30.5))]):
        for method, (i, o), extra in (("PMF", pmf, dict(num_experts="1", tau="")), ("SMAT", smat,
                                                                                   dict(num_experts="2", tau="0.8"))):
            rows.append(dict(status="done", cell=f"{method}{seed}", method=method, seed=str(seed), train_sources="x",
                             id_avg=str(i), ood_avg=str(o), config=method.lower(), **extra))
    line = study.seed_level_table(rows, ["config", "train.seed"]).splitlines()[2]
    cols = [c.strip() for c in line.split("|")[1:-1]]
    d_ood = np.array([1.0, 2.0, 1.5])
    half = t.ppf(0.975, 2) * d_ood.std(ddof=1) / np.sqrt(3)
    assert cols[0] == "SMAT M=2 τ=0.8" and cols[1] == "3"
    assert cols[2] == "+0.17 ± {:.2f}".format(t.ppf(0.975, 2) * np.array([1.0, 0.5, -1.0]).std(ddof=1) / np.sqrt(3))
    assert cols[3] == f"+1.50 ± {half:.2f}" and cols[4] == "OOD"
    assert cols[5] == "s0: +1.00 / +1.00, s1: +0.50 / +2.00, s2: -1.00 / +1.50"


def test_seed_level_contrasts_difference_settings_seed_by_seed(study):
    from scipy.stats import t

    rows = []
    for seed, (lo, hi) in enumerate([((60.0, 30.0), (59.0, 31.0)), ((61.0, 29.0), (60.5, 29.5)),
                                     ((62.0, 30.0), (61.0, 30.0))]):
        for tau, (i, o) in ((0.5, lo), (0.95, hi)):
            rows.append(dict(status="done", method="SMAT", seed=str(seed), num_experts="2", tau=str(tau),
                             id_avg=str(i), ood_avg=str(o), cell=f"{tau}{seed}"))
    rows.append(dict(status="done", method="PMF", seed="0", num_experts="1", tau="", id_avg="1", ood_avg="1", cell="p"))
    line = study.seed_level_contrasts(rows, "tau", "num_experts").splitlines()[2]
    cols = [c.strip() for c in line.split("|")[1:-1]]
    d_id = np.array([-1.0, -0.5, -1.0])
    assert cols[:3] == ["2", "0.95 − 0.5", "3"]
    assert cols[3] == f"{d_id.mean():+.2f} ± {t.ppf(0.975, 2) * d_id.std(ddof=1) / np.sqrt(3):.2f}"
    assert cols[5] == "s0: -1.00 / +1.00, s1: -0.50 / +0.50, s2: -1.00 / +0.00"
