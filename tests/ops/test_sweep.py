"""smat-sweep: grid expansion, results arithmetic, the retry/resume state machine, and the shipped tiny
sweep for real (smat-train + smat-eval on a Ray head, killed mid-way and resumed)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from smat_dist.errors import ConfigError
from smat_dist.sweep.config import load_sweep_config
from smat_dist.sweep.grid import dotlist_value, expand
from smat_dist.sweep.report import plot_scaling, plot_tradeoff, read_eval_results, read_training, reference_points
from smat_dist.sweep.runner import Sweep
from smat_dist.sweep.state import SweepLock, SweepLocked

from .conftest import REPO

TINY = REPO / "configs" / "sweeps" / "tiny.yaml"


def _csv(path: Path) -> List[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_eval_results(path: Path, accs: dict, method: str = "SMAT", n: int = 5) -> None:
    """A results.csv exactly as smat-eval writes it (its own writer): {source: (kind, acc, ci)}."""
    from smat_dist.eval.report import ResultRow, write_results

    path.parent.mkdir(parents=True, exist_ok=True)
    write_results([ResultRow(s, kind, "test", method, "none", acc, ci, 1.0, n, "x", 0, "", "off", "ck")
                   for s, (kind, acc, ci) in accs.items()], path)


# ---------------------------------------------------------------------------------------------- grid
def test_tiny_grid_expands_to_validated_stable_cells():
    cfg = load_sweep_config(TINY)
    cells = expand(cfg, TINY)
    assert len(cells) == 4 and len({c.id for c in cells}) == 4
    assert [c.id for c in expand(load_sweep_config(TINY), TINY)] == [c.id for c in cells]  # stable
    two = [c for c in cells if c.assignment["data.train_sources"] == ["textures", "doodles"]]
    assert len(two) == 2 and all(c.run.data.train_sources == ["textures", "doodles"] for c in two)
    assert {c.run.model.gates.target_sparsity for c in cells} == {0.5, 0.8}
    assert all(c.run.dist.num_workers == 1 for c in cells)
    # placement does not change identity, a setting does
    more_workers = load_sweep_config(TINY, ["resources.num_workers=2"])
    assert [c.key for c in expand(more_workers, TINY)] == [c.key for c in cells]
    other_lr = load_sweep_config(TINY, ["overrides=[model.optim.delta_lr=0.5]"])
    assert not {c.key for c in expand(other_lr, TINY)} & {c.key for c in cells}
    only = expand(cfg, TINY, only={"model.gates.target_sparsity": 0.8})
    assert len(only) == 2 and all(c.assignment["model.gates.target_sparsity"] == 0.8 for c in only)


@pytest.mark.parametrize("override", ["model.lagrangian.kp=0.5", "model.gates.alpha_grad=task"])
def test_a_key_added_later_is_identity_only_away_from_its_neutral_value(monkeypatch, override):
    """model.lagrangian.kp and model.gates.alpha_grad came after published cells: at their neutral values
    (kp = 0, alpha_grad = flush) they are left out of the identity, so those cells are still found; any
    other value makes new cells."""
    import smat_dist.sweep.grid as grid

    keys = [c.key for c in expand(load_sweep_config(TINY), TINY)]
    gained = load_sweep_config(TINY, [f"overrides=[{override}]"])
    assert not {c.key for c in expand(gained, TINY)} & set(keys)
    path = tuple(override.split("=")[0].split("."))
    monkeypatch.setattr(grid, "LATER_KEYS", tuple(k for k in grid.LATER_KEYS if k[0] != path))
    assert not {c.key for c in expand(load_sweep_config(TINY), TINY)} & set(keys)  # it was left out


def test_config_axis_exclude_and_errors(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "name": "m", "overrides": ["train.max_steps=2"],
        "axes": {"config": [str(REPO / "configs" / "smat.yaml"), [str(REPO / "configs" / "pmf.yaml")]],
                 "model.gates.target_sparsity": [0.5, 0.9]},
        "exclude": [{"config": [str(REPO / "configs" / "pmf.yaml")], "model.gates.target_sparsity": 0.9}]})))
    cells = expand(load_sweep_config(sweep), sweep)
    assert sorted(c.run.model.method for c in cells) == ["pmf", "smat", "smat"]
    assert any(c.id.startswith("config-pmf_") for c in cells)
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text(f"_base_: {sweep}\naxes:\n  model.gates.bogus: [1]\n")
    with pytest.raises(ConfigError, match="model.gates.bogus"):
        expand(load_sweep_config(bogus), bogus)
    with pytest.raises(ConfigError, match="not axes"):
        load_sweep_config(sweep, ["exclude=[{seed: 1}]"])
    with pytest.raises(ConfigError, match="not found"):
        expand(load_sweep_config(sweep, ["axes.config=[nowhere.yaml]"]), sweep)


@pytest.mark.parametrize("value", [0.9, 8, True, None, "textures", "1e-4", ["a", "b"], [[1, 2], [3]], "x y"])
def test_axis_values_survive_the_command_line(value):
    assert OmegaConf.to_container(OmegaConf.from_dotlist([f"k={dotlist_value(value)}"]))["k"] == value


# ---------------------------------------------------------------------------------------------- results
def test_results_averages_and_combined_ci(tmp_path):
    p = tmp_path / "results.csv"
    write_eval_results(p, {"a": ("ID", 80.0, 3.0), "b": ("ID", 60.0, 4.0), "c": ("OOD", 40.0, 2.0)})
    r = read_eval_results(p)
    assert r["method"] == "SMAT" and r["id_avg"] == pytest.approx(70.0) and r["ood_avg"] == pytest.approx(40.0)
    assert r["id_ci95"] == pytest.approx(5.0 / 2)  # sqrt(3^2 + 4^2) / 2
    assert r["id_sources"] == "a+b" and r["ood_sources"] == "c" and r["episodes"] == 5
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "sparsity_test": [0.1, 0.3], "sparsity": [0.5, 0.5]})
                                       + "\n" + json.dumps({"step": 2, "sparsity_test": [0.2, 0.4], "sparsity": [0.6, 0.8]}))
    assert read_training(run) == pytest.approx({"steps": 2, "sparsity_reached": 0.3, "sparsity_train": 0.7})


def test_plots_are_drawn(tmp_path):
    rows = []
    for tau in (0.5, 0.9):
        for m in (2, 4):
            for seed in (0, 1):
                rows.append({"tau": tau, "num_experts": m, "method": "SMAT", "num_train_sources": 1 + m // 2,
                             "id_avg": 60 + 10 * tau + m + seed, "ood_avg": 50 - 5 * tau + seed, "train.seed": seed,
                             "_axes": ["tau", "num_experts", "train.seed"]})
    rows += [dict(r, method="PMF", tau=None) for r in rows[:4]]
    # PMF (no tau) is the reference of the trade-off plot: mean and std over its 4 cells (seeds 0, 1 twice)
    (pmf,) = reference_points(rows).items()
    assert pmf[0] == "PMF" and pmf[1] == pytest.approx((68.5, 1.290994, 48.0, 0.57735), rel=1e-5)
    assert reference_points([r for r in rows if r["method"] == "SMAT"]) == {}
    assert plot_tradeoff(rows, tmp_path / "t.png").stat().st_size > 10_000
    assert plot_scaling(rows, tmp_path / "s.png").stat().st_size > 10_000
    assert plot_tradeoff([], tmp_path / "none.png") is None


def test_sweep_directory_lock(tmp_path):
    with SweepLock(tmp_path):
        with pytest.raises(SweepLocked, match=str(os.getpid())):
            SweepLock(tmp_path).__enter__()
    with SweepLock(tmp_path):  # released
        pass


# ---------------------------------------------------------------------------------------------- state machine
class FakeCluster(Sweep):
    """The runner with its process boundary replaced: each 'command' writes the files the real one writes.
    ``fail`` maps cell index -> how many first attempts fail (in the given phase)."""

    def __init__(self, *a, fail=None, phase="train", **kw):
        super().__init__(*a, **kw)
        self.fail, self.phase, self.calls = dict(fail or {}), phase, []

    def connect(self) -> bool:
        self.ray_address = "fake:0"
        return False

    def _execute(self, cmd, log, deadline, attempt):
        cell = next(c for c in self.cells if c.id in " ".join(cmd))
        i, phase = self.cells.index(cell), ("eval" if "smat_dist.eval.cli" in cmd else "train")
        self.calls.append((i, phase))
        log.write_text(f"{phase} of cell {i}\n")
        if phase == self.phase and self.fail.get(i, 0) > 0:
            self.fail[i] -= 1
            log.write_text(f"Traceback ...\nRuntimeError: injected failure of cell {i}\n")
            return 1
        if phase == "train":
            run = self.run_dir(cell)
            metrics = json.dumps({"step": 4, "sparsity_test": [0.5, 0.7]}) + "\n"
            if isinstance(run, str):  # the cell's run is in object storage, as smat-train would put it
                from smat_dist import objstore

                assert f"dist.storage_path={run.rsplit('/', 1)[0]}" in cmd and f"train.run_name={cell.id}" in cmd
                save_file({"delta": torch.zeros(2)}, str(log.with_suffix(".safetensors")))
                objstore.upload(log.with_suffix(".safetensors"), objstore.join(run, "model.safetensors"))
                objstore.write_bytes(objstore.join(run, "metrics.jsonl"), metrics.encode())
                return 0
            run.mkdir(parents=True, exist_ok=True)
            save_file({"delta": torch.zeros(2)}, str(run / "model.safetensors"))  # a whole (tiny) export
            (run / "metrics.jsonl").write_text(metrics)
        else:
            write_eval_results(self.eval_dir(cell) / "results.csv",
                               {"textures": ("ID", 50.0 + i, 2.0), "digits": ("OOD", 30.0 + i, 2.0)})
        return 0


def _fake(tmp_path, **kw) -> FakeCluster:
    cfg = load_sweep_config(TINY, ["monitor.enabled=false", "max_attempts=2"])
    return FakeCluster(cfg, TINY, tmp_path / "sw", say=lambda m: None, **kw)


def test_failed_cells_are_retried_then_reported(tmp_path):
    sw = _fake(tmp_path, fail={1: 1, 2: 5})  # cell 1 fails once, cell 2 always
    counts = sw.run()
    assert counts == {"pending": 0, "running": 0, "done": 3, "failed": 1}
    assert sw.calls.count((1, "train")) == 2 and sw.calls.count((2, "train")) == 2  # max_attempts=2
    rows = {r["cell"]: r for r in _csv(sw.out / "sweep.csv")}
    bad = rows[sw.cells[2].id]
    assert bad["status"] == "failed" and "injected failure of cell 2" in bad["error"] and bad["attempts"] == "2"
    ok = rows[sw.cells[1].id]
    assert ok["status"] == "done" and ok["attempts"] == "2" and float(ok["id_avg"]) == 51.0
    assert float(ok["sparsity_reached"]) == pytest.approx(0.6) and ok["steps"] == "4"
    st = json.loads((sw.out / "cells" / f"{sw.cells[2].id}.json").read_text())
    assert [a["outcome"] for a in st["attempts"]] == ["failed", "failed"]
    # a re-run skips done and exhausted cells; --retry-failed gives the failed one new attempts
    again = _fake(tmp_path)
    assert again.run()["failed"] == 1 and again.calls == []
    retry = _fake(tmp_path, retry_failed=True)
    assert retry.run() == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    assert retry.calls == [(2, "train"), (2, "eval")]


def test_a_sweep_keeps_its_runs_in_object_storage_and_reads_them_back(s3_env, tmp_path):
    """Base config with dist.storage_path=s3://...: every cell trains into <storage>/sweeps/<name>/<cell>, is
    evaluated from there, and its training numbers are read back from the bucket; the sweep's own state stays
    in its directory. A re-run finds every cell done (its export is in the bucket)."""
    cfg = load_sweep_config(TINY, ["monitor.enabled=false"])
    runs = f"s3://runs/sw-{tmp_path.name}"
    cfg.overrides = list(cfg.overrides) + [f"dist.storage_path={runs}"]
    sw = FakeCluster(cfg, TINY, tmp_path / "sw", say=lambda m: None)
    cell = sw.cells[0]
    assert sw.run_dir(cell) == f"{runs}/sweeps/tiny/{cell.id}"
    assert sw.eval_cmd(cell)[sw.eval_cmd(cell).index("--checkpoint") + 1] == f"{runs}/sweeps/tiny/{cell.id}"
    assert sw.run() == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    rows = {r["cell"]: r for r in _csv(sw.out / "sweep.csv")}
    assert rows[cell.id]["steps"] == "4" and float(rows[cell.id]["sparsity_reached"]) == pytest.approx(0.6)
    assert not (sw.out / "runs").exists()
    again = FakeCluster(cfg, TINY, tmp_path / "sw", say=lambda m: None)
    assert again.run()["done"] == 4 and again.calls == []


def test_an_eval_failure_retries_only_the_evaluation(tmp_path):
    sw = _fake(tmp_path, fail={0: 1}, phase="eval")
    assert sw.run()["done"] == 4
    assert [c for c in sw.calls if c[0] == 0] == [(0, "train"), (0, "eval"), (0, "eval")]


def test_a_crashed_sweep_resumes_interrupted_cells_without_counting_them(tmp_path):
    sw = _fake(tmp_path)
    sw.run()
    # Simulate a crash in the middle of cell 3: state says running with an attempt that never ended,
    # and its outputs are gone.
    cell = sw.cells[3]
    path = sw.out / "cells" / f"{cell.id}.json"
    st = json.loads(path.read_text())
    st.update(status="running", train_done=False, results={})
    st["attempts"] = [{"started": time.time(), "ended": None, "outcome": "running", "phase": "train",
                       "returncode": None, "error": "", "log": ""}]
    path.write_text(json.dumps(st))
    for d in (sw.run_dir(cell), sw.eval_dir(cell)):
        for f in d.iterdir():
            f.unlink()
    again = _fake(tmp_path, fail={3: 1})  # even one real failure after the crash is within max_attempts=2
    assert again.run()["done"] == 4
    assert again.calls == [(3, "train"), (3, "train"), (3, "eval")]
    outcomes = [a["outcome"] for a in json.loads(path.read_text())["attempts"]]
    assert outcomes == ["interrupted", "failed", "done"]


# ---------------------------------------------------------------------------------------------- cell processes
def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: List[int], timeout: float) -> List[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _pid_cell(out: Path) -> List[str]:
    """A cell that starts a grandchild and records both pids."""
    return ["sh", "-c", f"sleep 600 & echo $! > {out}/grandchild; echo $$ > {out}/child; wait"]


def _read_pid(path: Path, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_cell_runs_in_its_own_process_group_and_a_timeout_stops_all_of_it(tmp_path):
    cfg = load_sweep_config(TINY, ["monitor.enabled=false"])
    sw = Sweep(cfg, TINY, tmp_path / "sw", say=lambda m: None)
    from smat_dist.sweep.state import Attempt

    attempt = Attempt(started=time.time())
    rc = sw._execute([sys.executable, "-c", "import os; print('own group', os.getpgid(0) == os.getpid() != "
                      f"{os.getpgid(0)})"], tmp_path / "a.log", None, attempt)
    assert rc == 0 and "own group True" in (tmp_path / "a.log").read_text()
    t0 = time.time()
    rc = sw._execute(_pid_cell(tmp_path), tmp_path / "b.log", time.time() + 1.5, attempt)
    assert rc == -1 and "timed out" in attempt.error and time.time() - t0 < 30
    assert _wait_gone([_read_pid(tmp_path / "child"), _read_pid(tmp_path / "grandchild")], 10) == []
    reaper = sw._reaper.pid
    assert reaper is not None and _alive(reaper)
    sw._reaper.close()  # nothing left to stop: it exits at once
    assert _wait_gone([reaper], 5) == []


_DRIVER = """
import sys, threading, time
from pathlib import Path
from smat_dist.sweep.config import load_sweep_config
from smat_dist.sweep.runner import Sweep
from smat_dist.sweep.state import Attempt

tiny, out, cmd = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
sw = Sweep(load_sweep_config(tiny, ["monitor.enabled=false"]), tiny, out / "sw", say=print)
# as the sweep's pool does: the cell is started from a worker thread
threading.Thread(target=sw._execute, args=(cmd, out / "cell.log", None, Attempt(started=time.time())),
                 daemon=True).start()
while sw._reaper.pid is None:
    time.sleep(0.05)
(out / "reaper").write_text(str(sw._reaper.pid))
time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_cells_do_not_outlive_a_killed_sweep_driver(tmp_path):
    """SIGKILL to the driver's process group (a crashed or OOM-killed driver): the cell and the process it
    started are stopped by the reaper, which then exits too."""
    from .conftest import base_env

    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(TINY), str(tmp_path), *_pid_cell(tmp_path)],
                              env=base_env(), cwd=tmp_path, start_new_session=True)
    try:
        child, grandchild = _read_pid(tmp_path / "child"), _read_pid(tmp_path / "grandchild")
        reaper = _read_pid(tmp_path / "reaper")
        assert os.getpgid(child) == child != driver.pid and os.getpgid(reaper) != driver.pid
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        assert _wait_gone([child, grandchild], 30) == [], "the cell outlived its sweep driver"
        assert _wait_gone([reaper], 10) == []
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        for name in ("child", "grandchild"):
            if (tmp_path / name).exists():
                try:
                    os.kill(int((tmp_path / name).read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


# ---------------------------------------------------------------------------------------------- for real
def _states(out: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def _sweep_cmd(out: Path, data: Path, targets: Path, *extra: str) -> List[str]:
    return [sys.executable, "-m", "smat_dist.sweep.cli", "--config", str(TINY), "--out", str(out),
            "--only", "model.gates.target_sparsity=0.5",
            "--set", f"data.root={data}", f"monitor.targets_dir={targets}", *extra]


# Columns of sweep.csv that describe where and how long a cell ran, not what it computed.
RUN_COLUMNS = {"run_dir", "eval_dir", "train_s", "eval_s", "wall_s", "gpu_hours", "attempts", "log"}


def _numbers(rows: List[dict]) -> List[dict]:
    return [{k: v for k, v in r.items() if k not in RUN_COLUMNS} for r in rows]


@pytest.mark.timeout(1800)
def test_tiny_sweep_on_a_ray_head_resumes_a_crash_exactly(ray_head, prometheus, synth_small, tmp_path):
    """The shipped tiny sweep's two tau=0.5 cells as real smat-train + smat-eval jobs on a Ray head. Every
    cell's training stops after meta-step 3 (``debug.halt_at_step``, a deterministic point; its last
    checkpoint is step 2); the whole sweep is killed there and the same command run again without the hook.
    The resumed cells say where they resumed, and their parameters and sweep.csv equal an uninterrupted
    sweep's; a third run does nothing."""
    from smat_dist.export import read_export

    out = tmp_path / "sweep"
    env = ray_head.env()
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_sweep_cmd(out, synth_small, prometheus.targets_dir, "--set", "debug.halt_at_step=3"),
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "runs").glob("*/.halted_at_step_3"))) == 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep driver (its reaper stops the cells): a crash
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    states = _states(out)
    assert len(states) == 2 and all(s["status"] == "running" for s in states)
    for s in states:  # steps 1-3 logged, the checkpoint of step 2 is the last one
        assert [json.loads(x)["step"] for x in (out / "runs" / s["id"] / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    second = subprocess.run(_sweep_cmd(out, synth_small, prometheus.targets_dir), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    for s in states:
        train_log = (out / "logs" / f"{s['id']}.train.log").read_text()
        assert "resumed from" in train_log and "at step 2/4" in train_log, train_log[-3000:]
        outcomes = [a["outcome"] for a in json.loads((out / "cells" / f"{s['id']}.json").read_text())["attempts"]]
        assert outcomes == ["interrupted", "done"]  # recorded as interrupted, not as a failure

    reference = tmp_path / "reference"
    clean = subprocess.run(_sweep_cmd(reference, synth_small, prometheus.targets_dir), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=1200)
    assert clean.returncode == 0, (clean.stdout + clean.stderr)[-5000:]
    rows, ref_rows = _csv(out / "sweep.csv"), _csv(reference / "sweep.csv")
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows), rows
    assert _numbers(rows) == _numbers(ref_rows)  # every number, to the digit
    for r, q in zip(rows, ref_rows):
        a, b = read_export(Path(r["run_dir"]) / "model.safetensors")[0], read_export(Path(q["run_dir"]) / "model.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical parameters
        results = _csv(Path(r["eval_dir"]) / "results.csv")
        ids = [float(x["accuracy"]) for x in results if x["kind"] == "ID"]
        assert float(r["id_avg"]) == pytest.approx(sum(ids) / len(ids), abs=1e-3)
        assert r["id_sources"] == "+".join(sorted(json.loads(r["data.train_sources"])))
        assert "digits" in r["ood_sources"] and r["method"] == "SMAT" and r["episodes"] == "5"
        metrics = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # a resumed run neither loses nor repeats steps
        tau_sp = sum(metrics[-1]["sparsity_test"]) / len(metrics[-1]["sparsity_test"])
        assert float(r["sparsity_reached"]) == pytest.approx(tau_sp, abs=1e-4)
        assert float(r["train_s"]) > 0 and float(r["wall_s"]) >= float(r["train_s"]) and float(r["gpu_hours"]) == 0
    for png in ("tradeoff.png", "scaling.png"):
        assert (out / png).stat().st_size > 10_000

    logs_before = {p: p.stat().st_size for p in (out / "logs").glob("*.log")}
    third = subprocess.run(_sweep_cmd(out, synth_small, prometheus.targets_dir), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "2 done (skipped)" in third.stdout + third.stderr
    assert {p: p.stat().st_size for p in (out / "logs").glob("*.log")} == logs_before  # nothing ran

    # The cells' Ray workers exported data-plane metrics (real shards), and the driver its progress.
    cell = rows[0]["cell"]
    images = prometheus.wait(f'max(last_over_time(ray_smat_data_images_total{{run="{cell}"}}[15m]))',
                             lambda v: max(v.values()) > 0)
    assert images
    depth = prometheus.values(f'max(max_over_time(ray_smat_episode_queue_depth{{run="{cell}"}}[15m]))')
    bound = OmegaConf.load(Path(rows[0]["run_dir"]) / "run_config.yaml").data.max_in_flight
    assert depth and 0 <= max(depth.values()) <= bound  # bounded by data.max_in_flight
    seen = prometheus.values('max by (state) (max_over_time(ray_smat_sweep_cells{sweep="tiny"}[15m]))')
    assert seen.get("state=done", 0) >= 1 and seen.get("state=running", 0) >= 1, seen


def test_shipped_cluster_sweeps_reproduce_the_two_figures():
    trade = load_sweep_config(REPO / "configs" / "sweeps" / "tradeoff_vits.yaml")
    cells = expand(trade, REPO / "configs" / "sweeps" / "tradeoff_vits.yaml")
    assert len({c.run.model.gates.target_sparsity for c in cells}) >= 4
    assert len({c.run.model.gates.num_experts for c in cells}) >= 2
    scale = load_sweep_config(REPO / "configs" / "sweeps" / "sources_vits.yaml")
    cells += (more := expand(scale, REPO / "configs" / "sweeps" / "sources_vits.yaml"))
    assert {c.run.model.method for c in more} == {"smat", "pmf"}
    assert {len(c.run.data.train_sources) for c in more} >= {1, 2, 4, 8}
    for c in cells:  # ViT-S on Meta-Dataset on GPUs, data and outputs on the shared volume
        assert c.run.model.backbone.name.startswith("vit_small") and c.run.dist.use_gpu
        assert c.run.data.root.startswith("/mnt/shared/") and c.run.train.tasks_per_step % c.run.dist.num_workers == 0
    assert trade.out.startswith("/mnt/shared/") and scale.out.startswith("/mnt/shared/")


@pytest.mark.parametrize("text", ['{"id": "c", "key"', '{"id": "c", "key": "k", "assignment": {}, "surplus": 1}'])
def test_corrupt_cell_state_is_one_error_naming_the_file(tmp_path, text):
    from smat_dist.sweep.state import CellStore, SweepStateError

    store = CellStore(tmp_path)
    store.path("c").parent.mkdir(parents=True)
    store.path("c").write_text(text)
    with pytest.raises(SweepStateError, match=str(store.path("c")) + ": corrupt cell state"):
        store.load("c")


def test_a_cell_with_a_damaged_export_is_trained_again(tmp_path):
    """A truncated model.safetensors (a crash while it was written by an older version, a full disk) sends the
    cell back to training, which resumes at its last checkpoint and rewrites it, instead of failing
    evaluation on it forever."""
    sweep = _fake(tmp_path)
    assert sweep.run()["done"] == 4
    cell = sweep.cells[0]
    export = sweep.run_dir(cell) / "model.safetensors"
    export.write_bytes(export.read_bytes()[:20])
    (sweep.eval_dir(cell) / "results.csv").unlink()  # so the cell is due again
    sweep2 = _fake(tmp_path)
    assert sweep2.run()["done"] == 4
    assert sweep2.calls == [(0, "train"), (0, "eval")]


def _demo_runs():
    """The demo's SMAT and PMF run configs, which every toy sweep's cells start from."""
    from smat_dist.config import RunConfig, load_config

    return {m: load_config(RunConfig, [REPO / "configs" / "demo" / f"{m}.yaml"]) for m in ("smat", "pmf")}


def _toy_sweep(name: str):
    """(sweep config, cells) of configs/sweeps/<name>.yaml, checked to fit the 2-core box."""
    path = REPO / "configs" / "sweeps" / f"{name}.yaml"
    cfg = load_sweep_config(path)
    assert cfg.concurrency * cfg.resources.num_workers * cfg.resources.cpus_per_worker <= 2
    return cfg, expand(cfg, path)


def test_shipped_toy_sweeps_are_the_study_on_the_demo_settings():
    """The CPU study (tools/study.py): the demo's runs per cell, >= 2 seeds, PMF as reference, on 2 cores,
    and settings chosen on the valid split only."""
    demo = _demo_runs()
    cells = {name: _toy_sweep(name) for name in ("toy_tradeoff", "toy_sources", "toy_select")}
    trade_cfg, trade = cells["toy_tradeoff"]
    smat = [c for c in trade if c.run.model.method == "smat"]
    pmf = [c for c in trade if c.run.model.method == "pmf"]
    assert len({c.run.model.gates.target_sparsity for c in smat}) >= 3 and len({c.run.model.gates.num_experts for c in smat}) >= 3
    assert sorted(c.run.train.seed for c in pmf) == sorted({c.run.train.seed for c in smat}) and len(pmf) >= 2
    src_cfg, src = cells["toy_sources"]
    assert {c.run.model.method for c in src} == {"smat", "pmf"}
    assert {len(c.run.data.train_sources) for c in src} == {1, 2, 3, 4} and len({c.run.train.seed for c in src}) >= 2
    for c in trade + src:  # apart from its axes, a cell is the demo's run of its method
        ref = demo[c.run.model.method]
        assert c.run.model.optim == ref.model.optim and c.run.model.hypernet == ref.model.hypernet
        assert c.run.train.max_steps == ref.train.max_steps and c.run.train.epochs == ref.train.epochs
        assert c.run.model.backbone.checkpoint.endswith("runs/demo/backbone.safetensors")
        if c.run.model.method == "smat" and c in src:  # ran at M=4, before the trade-off study chose M=2
            assert dataclasses.replace(c.run.model.gates, num_experts=ref.model.gates.num_experts) == ref.model.gates
            assert c.run.model.gates.num_experts == 4
    for cfg in (trade_cfg, src_cfg):
        assert "split=valid" not in cfg.eval.overrides and "episodes=100" in cfg.eval.overrides
    select_cfg, select = cells["toy_select"]
    assert "split=valid" in select_cfg.eval.overrides  # settings are chosen on valid episodes, never test ones
    assert {c.run.model.method for c in select} == {"smat", "pmf"}


def test_second_round_toy_sweeps_change_only_what_they_study():
    """toy_long (3x the steps, the schedule stretched with them), toy_long_tau (toy_long's SMAT at τ = 0.5 and
    0.95), toy_specialisation (M = 4) and toy_outlier (M = 2, τ = 0.95) are the demo's runs otherwise, with the seeds the attribution study's cells pair with."""
    demo = _demo_runs()
    got = {}
    for name in ("toy_long", "toy_long_tau", "toy_specialisation", "toy_outlier"):
        cfg, got[name] = _toy_sweep(name)
        assert "episodes=100" in cfg.eval.overrides and "split=valid" not in cfg.eval.overrides
        assert sorted({c.run.train.seed for c in got[name]}) == [0, 1, 2]
    for c in got["toy_long"]:
        ref = demo[c.run.model.method]
        assert c.run.train.epochs == 3 * ref.train.epochs and c.run.model.optim.total_epochs == 3 * ref.model.optim.total_epochs
        assert dataclasses.replace(c.run.model.optim, total_epochs=ref.model.optim.total_epochs) == ref.model.optim
        assert c.run.model.gates == ref.model.gates and c.run.model.hypernet == ref.model.hypernet
    assert {c.run.model.method for c in got["toy_long"]} == {"smat", "pmf"}
    long_smat = next(c for c in got["toy_long"] if c.run.model.method == "smat")
    for c in got["toy_long_tau"]:  # the long study's SMAT cell at another τ
        assert dataclasses.replace(c.run.model.gates, target_sparsity=0.8) == long_smat.run.model.gates
        assert c.run.model.optim == long_smat.run.model.optim and c.run.train.epochs == long_smat.run.train.epochs
    assert sorted({c.run.model.gates.target_sparsity for c in got["toy_long_tau"]}) == [0.5, 0.95]
    for name, (M, tau) in (("toy_specialisation", (4, 0.8)), ("toy_outlier", (2, 0.95))):
        for c in got[name]:
            ref = demo["smat"]
            assert (c.run.model.gates.num_experts, c.run.model.gates.target_sparsity) == (M, tau)
            assert dataclasses.replace(c.run.model.gates, num_experts=ref.model.gates.num_experts,
                                       target_sparsity=ref.model.gates.target_sparsity) == ref.model.gates
            assert c.run.model.optim == ref.model.optim and c.run.train.epochs == ref.train.epochs


def test_a_bad_cell_fails_the_sweep_before_any_cell_runs(tmp_path):
    """Every cell's run config is loaded and validated up front (RunConfig.validate, so each section's
    checks apply), naming the cell; deadlines of remote reads are placement, not identity."""
    cfg = load_sweep_config(TINY)
    cfg.axes["data.remote.attempts"] = [2, 0]
    with pytest.raises(ConfigError, match=r'"data.remote.attempts": 0\}: data.remote.attempts must be >= 1'):
        Sweep(cfg, TINY, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ok = load_sweep_config(TINY)
    ok.overrides.append("data.remote.stall_timeout_s=5")
    assert [c.key for c in expand(ok, TINY)] == [c.key for c in expand(load_sweep_config(TINY), TINY)]
