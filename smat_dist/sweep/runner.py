"""Run the cells of a sweep on a Ray cluster: each cell = ``smat-train`` then ``smat-eval``.

How cells share one cluster: every cell is its own driver process (``python -m smat_dist.train.cli`` /
``smat_dist.eval.cli``) joined to the cluster through ``RAY_ADDRESS``, i.e. its own Ray job, exactly as a
user would run it by hand. Each cell's ``TorchTrainer`` asks for one gang-scheduled placement group
(``dist.num_workers`` bundles), so concurrent cells never hold half of each other's workers: a cell that
does not fit waits until another finishes (or the autoscaler adds nodes). ``concurrency`` bounds how many
cells are in flight; ``resources`` sizes each (workers, CPUs/GPUs per worker, evaluation actors).
Nesting trainers inside Ray tasks would tie their lifetime to this driver's and hide their logs; separate
drivers keep each run resumable on its own (``smat-train`` resumes a run by name).

Without ``RAY_ADDRESS`` the sweep starts a local Ray instance and points its cells at it.

Cell processes start in their own session (``start_new_session``: set up by ``fork_exec`` in C, so it is safe
from the pool's threads, unlike a ``preexec_fn``), which lets a timeout or Ctrl-C stop a cell together with
everything it started. A small reaper process (:mod:`smat_dist.sweep.reaper`) keeps the other guarantee:
cells never outlive the sweep driver, even one killed with SIGKILL.

Directory layout (``out``)::

    sweep.yaml              the sweep config as run          cells/<id>.json   state per cell (atomic)
    runs/<id>/              each cell's training run         eval/<id>/        each cell's smat-eval output
    logs/<id>.{train,eval}.log                               sweep.csv, tradeoff.png, scaling.png
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from smat_dist import objstore, ray_session
from smat_dist.config import to_yaml
from smat_dist.data.location import resolve_root
from smat_dist.errors import ConfigError
from smat_dist.fsutil import atomic_write_text
from smat_dist.monitoring.names import metric
from smat_dist.monitoring.recorder import make_backend
from smat_dist.sweep.config import SweepConfig
from smat_dist.sweep.grid import Cell, expand
from smat_dist.sweep.reaper import PKG_PARENT, CellReaper
from smat_dist.sweep.report import (ResultsError, cell_row, plot_scaling, plot_tradeoff, read_eval_results,
                                    read_training, write_csv)
from smat_dist.sweep.state import DONE, FAILED, PENDING, RUNNING, Attempt, CellState, CellStore, SweepLock
from smat_dist.weightsfile import WeightsError, check_weights_file


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to a cell's whole process group (its driver and whatever that started); the cell must not
    have been reaped yet (``wait``), so its group id cannot have been reused."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Sweep:
    def __init__(self, cfg: SweepConfig, sweep_file: Path, out: Optional[Path] = None, *, num_cpus: Optional[int] = None,
                 retry_failed: bool = False, only: Optional[Dict[str, Any]] = None,
                 say: Callable[[str], None] = print):
        cfg.validate()
        self.cfg, self.sweep_file, self.say = cfg, Path(sweep_file), say
        self.num_cpus, self.retry_failed = num_cpus, retry_failed
        eval_identity = list(cfg.eval.overrides) + [f"mode={cfg.eval.mode}", f"data={cfg.eval.data}"]
        self.cells: List[Cell] = expand(cfg, self.sweep_file, eval_identity, only)
        first = self.cells[0].run
        self.out = Path(out or cfg.out or Path(first.train.output_dir) / "sweeps" / cfg.name).expanduser().resolve()
        self.store = CellStore(self.out)
        # The cells' run directories: under the sweep directory, or in object storage when the base run
        # config stores runs there (dist.storage_path=s3://...): <storage>/sweeps/<name>/<cell>.
        storage = first.dist.storage_path or ""
        self.runs = objstore.join(storage, "sweeps", cfg.name) if objstore.is_uri(storage) else str(self.out / "runs")
        self._lock = threading.Lock()
        self._procs: Dict[int, subprocess.Popen] = {}
        self._reaper = CellReaper()
        self._stopping = False
        self._states: Dict[str, CellState] = {}
        self._gauge = None
        self.ray_address: Optional[str] = None
        self._owned = False

    # ----------------------------------------------------------------------------- paths, commands
    def run_dir(self, cell: Cell) -> Union[Path, str]:
        """The cell's run directory (a path, or its URI in object storage)."""
        return objstore.join(self.runs, cell.id) if objstore.is_uri(self.runs) else Path(self.runs) / cell.id

    def eval_dir(self, cell: Cell) -> Path:
        return self.out / "eval" / cell.id

    def data_root(self, cell: Cell) -> str:
        return resolve_root(self.cfg.eval.data or cell.run.data.root)

    def train_cmd(self, cell: Cell) -> List[str]:
        configs = [a for p in cell.configs for a in ("--config", str(p))]
        return [sys.executable, "-m", "smat_dist.train.cli", *configs, *cell.overrides,
                f"train.output_dir={self.out / 'runs'}", f"train.run_name={cell.id}",
                f"dist.storage_path={self.runs if objstore.is_uri(self.runs) else 'null'}"]

    def eval_cmd(self, cell: Cell) -> List[str]:
        return [sys.executable, "-m", "smat_dist.eval.cli", "--checkpoint", str(self.run_dir(cell)),
                "--data", self.data_root(cell), "--out", str(self.eval_dir(cell)), "-q",
                *self.cfg.eval.overrides, *self.cfg.resources.eval_overrides()]

    def env(self) -> Dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_PARENT, os.environ.get("PYTHONPATH", "")) if p)
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        if self._owned:  # a local Ray started here uses token authentication (Ray's default for local clusters)
            env.setdefault("RAY_AUTH_MODE", "token")
        return env

    # ----------------------------------------------------------------------------- state
    def load_states(self) -> Dict[str, CellState]:
        states = {}
        for cell in self.cells:
            st = self.store.load(cell.id) or CellState(cell.id, cell.key, cell.assignment)
            st.recover()
            if st.status == DONE and not (self.eval_dir(cell) / "results.csv").exists():
                st.status = PENDING  # its outputs were removed: run it again
            if st.status == FAILED and self.retry_failed:
                st.status = PENDING
                for a in st.attempts:
                    if a.outcome == "failed":
                        a.outcome = "failed-before-retry"
            states[cell.id] = st
        return states

    def _save(self, st: CellState) -> None:
        with self._lock:
            self.store.save(st)
            self._publish()

    def counts(self) -> Dict[str, int]:
        out = {PENDING: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        for st in self._states.values():
            out[st.status] = out.get(st.status, 0) + 1
        return out

    def _publish(self) -> None:
        if self._gauge is not None:
            for state, n in self.counts().items():
                self._gauge.set(metric("smat_sweep_cells"), {"sweep": self.cfg.name, "state": state}, float(n))

    # ----------------------------------------------------------------------------- cluster
    def connect(self) -> bool:
        """Join RAY_ADDRESS (a preflight look at its resources) or start a local Ray for the cells."""
        import ray

        address = os.environ.get("RAY_ADDRESS")
        res = self.cfg.resources
        owned = ray_session.connect(num_cpus=self.num_cpus, use_gpu=res.use_gpu, log_to_driver=False)
        self.ray_address = address or ray.get_runtime_context().gcs_address
        self._owned = owned
        total = ray.cluster_resources()
        need_cpu = res.num_workers * res.cpus_per_worker
        need_gpu = res.gpus()
        short = []
        if total.get("CPU", 0) < need_cpu:
            short.append(f"{need_cpu:g} CPUs (cluster has {total.get('CPU', 0):g})")
        if total.get("GPU", 0) < need_gpu:
            short.append(f"{need_gpu:g} GPUs (cluster has {total.get('GPU', 0):g})")
        if short:
            msg = f"one cell needs {' and '.join(short)}"
            if owned:
                ray.shutdown()
                raise ConfigError(f"{msg}: lower resources.* or give RAY_ADDRESS of a bigger cluster")
            self.say(f"[smat-sweep] warning: {msg}; cells wait until the autoscaler adds nodes")
        self.say(f"[smat-sweep] cluster {self.ray_address}: {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; "
                 f"a cell takes {need_cpu:g} CPUs, {need_gpu:g} GPUs; {self.cfg.concurrency} at a time")
        if not owned:
            ray.shutdown()  # the cells are their own drivers; this process needs no connection
        return owned

    # ----------------------------------------------------------------------------- run
    def run(self) -> Dict[str, int]:
        with SweepLock(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "sweep.yaml", to_yaml(self.cfg))
            self._states = self.load_states()
            todo = [c for c in self.cells if self._states[c.id].status == PENDING]
            done = sum(1 for s in self._states.values() if s.status == DONE)
            failed = [s.id for s in self._states.values() if s.status == FAILED]
            self.say(f"[smat-sweep] {self.cfg.name}: {len(self.cells)} cells in {self.out}: {done} done (skipped), "
                     f"{len(failed)} failed earlier (use --retry-failed), {len(todo)} to run")
            self._start_metrics()
            owned = False
            try:
                if todo:
                    owned = self.connect()
                    self._run_cells(todo)
            finally:
                self._reaper.close()  # every cell has ended here: it exits without signalling anything
                if owned:
                    import ray

                    ray.shutdown()
                self.write_report()
                if self._gauge is not None:
                    self._gauge.close()
            counts = self.counts()
            for st in self._states.values():
                if st.status == FAILED:
                    self.say(f"[smat-sweep] FAILED {st.id} after {st.failures} attempt(s): {st.last_error}")
            self.say(f"[smat-sweep] finished: {counts[DONE]} done, {counts[FAILED]} failed, "
                     f"{counts[PENDING]} not run; {self.out / 'sweep.csv'}")
            return counts

    def _start_metrics(self) -> None:
        try:
            self._gauge = make_backend(self.cfg.monitor, "prometheus", f"sweep-{self.cfg.name}")
        except OSError as exc:
            self.say(f"[smat-sweep] metrics endpoint not started: {exc}")
            self._gauge = None
        self._publish()

    def _run_cells(self, todo: List[Cell]) -> None:
        total = len(todo)
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="cell")
        futures: Dict[Future, Cell] = {}
        it = iter(todo)
        started = 0
        try:
            while True:
                while len(futures) < self.cfg.concurrency and not self._stopping:
                    cell = next(it, None)
                    if cell is None:
                        break
                    started += 1
                    futures[pool.submit(self._run_cell, cell, f"{started}/{total}")] = cell
                if not futures:
                    break
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for f in finished:
                    futures.pop(f)
                    f.result()  # a bug in the runner itself surfaces here
                self.write_report(plots=False)
        except KeyboardInterrupt:
            self._stopping = True
            self.say("[smat-sweep] interrupted: stopping running cells; run the same command to resume")
            with self._lock:
                for p in list(self._procs.values()):
                    _signal_group(p, signal.SIGTERM)
            raise
        finally:
            pool.shutdown(wait=True)

    def _run_cell(self, cell: Cell, tag: str) -> None:
        st = self._states[cell.id]
        while st.failures < self.cfg.max_attempts and not self._stopping:
            attempt = Attempt(started=time.time())
            st.attempts.append(attempt)
            st.status = RUNNING
            self._save(st)
            n = st.failures + 1
            self.say(f"[smat-sweep] [{tag}] start {cell.id} (attempt {n}/{self.cfg.max_attempts})")
            ok = self._attempt(cell, st, attempt)
            attempt.ended = time.time()
            if self._stopping and not ok:
                attempt.outcome = "interrupted"
                st.status = PENDING
                self._save(st)
                return
            attempt.outcome = "done" if ok else "failed"
            st.status = DONE if ok else (FAILED if st.failures >= self.cfg.max_attempts else RUNNING)
            self._save(st)
            c = self.counts()
            if ok:
                r = st.results
                self.say(f"[smat-sweep] [{tag}] done {cell.id}: ID {_pct(r.get('id_avg'))} OOD {_pct(r.get('ood_avg'))} "
                         f"(train {st.train_s:.0f} s, eval {st.eval_s:.0f} s); {c[DONE]} done, {c[RUNNING]} running, "
                         f"{c[FAILED]} failed, {c[PENDING]} pending")
                return
            again = "retrying" if st.status == RUNNING else "giving up"
            self.say(f"[smat-sweep] [{tag}] attempt {n} of {cell.id} failed in {attempt.phase} "
                     f"(exit {attempt.returncode}): {attempt.error} - {again}")

    def _attempt(self, cell: Cell, st: CellState, attempt: Attempt) -> bool:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        deadline = time.time() + self.cfg.cell_timeout_s if self.cfg.cell_timeout_s else None
        if not (st.train_done and self._export_whole(cell)):
            attempt.phase = "train"
            t0 = time.time()
            rc = self._execute(self.train_cmd(cell), logs / f"{cell.id}.train.log", deadline, attempt)
            if rc != 0 or not self._export_whole(cell):
                attempt.returncode = rc
                attempt.error = attempt.error or _tail(logs / f"{cell.id}.train.log")
                return False
            st.train_done, st.train_s = True, time.time() - t0
            self._save(st)
        attempt.phase = "eval"
        t0 = time.time()
        rc = self._execute(self.eval_cmd(cell), logs / f"{cell.id}.eval.log", deadline, attempt)
        if rc != 0:
            attempt.returncode = rc
            attempt.error = attempt.error or _tail(logs / f"{cell.id}.eval.log")
            return False
        st.eval_s = time.time() - t0
        attempt.phase = "results"
        try:
            st.results = read_eval_results(self.eval_dir(cell) / "results.csv", self.cfg.eval.mode)
        except ResultsError as exc:
            attempt.error = str(exc)
            return False
        st.results.update(read_training(self.run_dir(cell)))
        attempt.returncode = 0
        return True

    def _export_whole(self, cell: Cell) -> bool:
        """The cell's model file exists and is whole; if not, training runs again (it resumes at its last
        checkpoint and rewrites the export), instead of evaluation failing on it forever."""
        run_dir = self.run_dir(cell)
        if isinstance(run_dir, str):  # object storage: an object appears whole or not at all
            return objstore.kind(objstore.join(run_dir, "model.safetensors")) == "file"
        try:
            check_weights_file(run_dir / "model.safetensors", "model export")
            return True
        except WeightsError as exc:
            if (self.run_dir(cell) / "model.safetensors").exists():
                self.say(f"[smat-sweep] {exc}: training {cell.id} again")
            return False

    def _execute(self, cmd: List[str], log: Path, deadline: Optional[float], attempt: Attempt) -> int:
        attempt.log = str(log)
        with log.open("a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
            with self._lock:
                self._procs[proc.pid] = proc
            self._reaper.watch(proc.pid)  # its session id = process group id = its pid
            try:
                timeout = None if deadline is None else max(1.0, deadline - time.time())
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                attempt.error = f"timed out after cell_timeout_s={self.cfg.cell_timeout_s}"
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                return -1
            finally:
                with self._lock:
                    self._procs.pop(proc.pid, None)
                self._reaper.release(proc.pid)

    # ----------------------------------------------------------------------------- report
    def rows(self) -> List[Dict[str, Any]]:
        """One ``sweep.csv`` row per cell (:func:`smat_dist.sweep.report.cell_row`)."""
        axes = list(self.cfg.axes)
        return [cell_row(cell, self._states.get(cell.id) or self.store.load(cell.id)
                         or CellState(cell.id, cell.key, cell.assignment),
                         axes=axes, resources=self.cfg.resources, run_dir=self.run_dir(cell),
                         eval_dir=self.eval_dir(cell))
                for cell in self.cells]

    def write_report(self, plots: bool = True) -> Dict[str, Path]:
        if not self._states:
            self._states = self.load_states()
        rows = self.rows()
        files = {"csv": write_csv(rows, list(self.cfg.axes), self.out / "sweep.csv")}
        if plots:
            p = self.cfg.plots
            for name, fn, kw in (("tradeoff", plot_tradeoff, dict(color=p.tradeoff_color, marker=p.tradeoff_marker)),
                                 ("scaling", plot_scaling, dict(x=p.scaling_x, series=p.scaling_series))):
                path = fn(rows, self.out / f"{name}.png", title=f"{self.cfg.name}: {name}", **kw)
                if path is not None:
                    files[name] = path
        return files


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-400:]


__all__ = ["CellReaper", "Sweep"]
