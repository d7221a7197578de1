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


def main(argv: Optional[List[str]] = None) -> int:
    """``smat-train``: the Ray launcher."""
    cfg, verbose, rc = parse("smat-train", "Meta-train SMAT (or a baseline config) with Ray Train + DeepSpeed. Joins the "
                    "Ray cluster at $RAY_ADDRESS (as under `ray job submit`), else starts a local one. Re-running "
                    "with the same train.run_name resumes it.", argv)
    if cfg is None:
        return rc
    from smat_dist.train.ray_launcher import train

    result = train(cfg, verbose=verbose)
    print(f"[smat-train] done: run directory {result.run_dir}")
    print(f"[smat-train] exported model {result.export}")
    return 0


def main_local(argv: Optional[List[str]] = None) -> int:
    """``python -m smat_dist.train``: one process, or one torchrun rank."""
    cfg, verbose, rc = parse("python -m smat_dist.train", "Meta-train SMAT in this process, or as one rank of "
                    "`torchrun --nproc-per-node N -m smat_dist.train` (DeepSpeed, gloo on CPU, NCCL on GPU). "
                    "Re-running with the same train.run_name resumes it.", argv)
    if cfg is None:
        return rc
    from smat_dist.train import distributed
    from smat_dist.train.launch import run

    if distributed.under_torchrun():
        runtime = distributed.init_torchrun(cfg.dist.use_gpu)
    else:
        runtime = distributed.Runtime("local", device=distributed.rank_device(cfg.dist.use_gpu, 0))
    run_dir = run(cfg, runtime)  # an error ends this rank; torchrun then stops the others
    distributed.shutdown()
    if runtime.is_main:
        print(f"[smat-train] done: run directory {run_dir}")
        print(f"[smat-train] exported model {run_dir / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
