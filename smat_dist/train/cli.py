"""Command lines of the launchers; all take the same ``--config X.yaml [key=value ...]``.

* ``smat-train``: the Ray launcher (joins ``$RAY_ADDRESS`` as under ``ray job submit``, else starts a
  local Ray);
* ``python -m smat_dist.train``: one process; under ``torchrun`` (``torchrun --nproc-per-node N -m
  smat_dist.train``), one rank per process.

Re-running with the same ``train.run_name`` resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Tuple

from smat_dist.config import ConfigError, RunConfig, load_config
from smat_dist.train import runlog
from smat_dist.train.preflight import USER_ERRORS, check_cluster_paths, check_output, preflight
from smat_dist.train.runlock import run_lock


def parse(prog: str, description: str, argv: Optional[List[str]]) -> Tuple[Optional[RunConfig], bool, int]:
    """(config, verbose, 0) or (None, verbose, exit code) after printing one error line."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", action="append", default=[], help="run YAML (repeatable; later ones win)")
    ap.add_argument("-v", "--verbose", action="store_true", help="also show Ray's and DeepSpeed's own INFO logs")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. dist.num_workers=4 train.seed=1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return load_config(RunConfig, args.config, args.overrides), args.verbose, 0
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None, args.verbose, 2


def _fail(prog: str, exc: BaseException, store, *, rank: Optional[int] = None) -> int:
    """One line on the console; the traceback is in the run's log file. Exit 2 for what the user can fix.

    ``store``: the run's :class:`~smat_dist.runstore.RunStore`. ``rank``: the torchrun rank this process
    is (every rank checks the config, rank 0 alone reports what the user can fix; any rank reports its
    own failure)."""
    cause, failed_rank = runlog.root_cause(exc)
    user_error = isinstance(cause, USER_ERRORS)
    # Ray workers and ranks have logged their own, into the run directory or (object storage) into their
    # node's staging copy, which may never be uploaded: there the driver logs what it received too.
    if not user_error and store.remote and rank in (None, 0):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            runlog.log_exception(Path(tmp), exc, "driver")
            try:  # appended to the uploaded log; the local copy may be a rank's, still being written
                store.append(runlog.RUN_LOG, (Path(tmp) / runlog.RUN_LOG).read_text())
            except OSError:
                pass
    elif not user_error and failed_rank is None:
        runlog.log_exception(store.local, exc, "driver")
    where = "" if user_error else f" (traceback in {store.url(runlog.RUN_LOG)})"
    if not (user_error and rank not in (None, 0)):
        prefix = f"rank {rank}: " if rank is not None and not user_error else ""
        print(f"{prog}: error: {prefix}{runlog.one_line(exc)}{where}", file=sys.stderr, flush=True)
    return 2 if user_error else 1


def main(argv: Optional[List[str]] = None) -> int:
    """``smat-train``: the Ray launcher."""
    prog = "smat-train"
    cfg, verbose, rc = parse(prog, "Meta-train SMAT (or a baseline config) with Ray Train + DeepSpeed. Joins the "
                             "Ray cluster at $RAY_ADDRESS (as under `ray job submit`), else starts a local one. "
                             "Re-running with the same train.run_name resumes it.", argv)
    if cfg is None:
        return rc

    store = cfg.run_store()
    try:
        check_cluster_paths(cfg)  # before the lock creates anything (a relative path under RAY_ADDRESS)
        check_output(store)
        with run_lock(store.uri):  # the driver holds it for the life of the run (workers take none)
            preflight(cfg, store, engine="deepspeed", world_size=cfg.dist.num_workers, cluster=True)
            from smat_dist.train.ray_launcher import train  # torch and Ray only after the checks

            train(cfg, verbose=verbose)
    except Exception as exc:
        return _fail(prog, exc, store)
    return _done(store)


def main_local(argv: Optional[List[str]] = None) -> int:
    """``python -m smat_dist.train``: one process, or one torchrun rank."""
    prog = "python -m smat_dist.train"
    cfg, verbose, rc = parse(prog, "Meta-train SMAT in this process, or as one rank of `torchrun --nproc-per-node N "
                             "-m smat_dist.train` (DeepSpeed, gloo on CPU, NCCL on GPU). Re-running with the same "
                             "train.run_name resumes it.", argv)
    if cfg is None:
        return rc
    import os
    from contextlib import nullcontext

    store = cfg.run_store()
    # torchrun describes every rank in the environment; torch itself is imported after the checks
    torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    try:
        check_output(store)
        # rank 0 holds the run's lock for the life of the run; a refused rank 0 exits and torchrun stops the rest
        with run_lock(store.uri) if rank == 0 else nullcontext():
            preflight(cfg, store, engine="deepspeed" if torchrun else "local",
                      world_size=int(os.environ["WORLD_SIZE"]) if torchrun else 1)
            # torch and DeepSpeed only after the checks
            from smat_dist.train import distributed
            from smat_dist.train.launch import run

            if torchrun:
                runtime = distributed.init_torchrun(cfg.dist.use_gpu)
            else:
                runtime = distributed.Runtime("local", device=distributed.rank_device(cfg.dist.use_gpu, 0))
            run(cfg, runtime)  # an error ends this rank; torchrun then stops the others
    except Exception as exc:
        return _fail(prog, exc, store, rank=rank if torchrun else None)
    distributed.shutdown()
    return _done(store) if runtime.is_main else 0


def _done(store) -> int:
    print(f"[smat-train] done: run directory {store.uri}")
    print(f"[smat-train] exported model {store.url('model.safetensors')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
