"""``smat-train --config configs/<name>.yaml [key=value ...]``: distributed SMAT meta-training."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from smat_dist.config import ConfigError, RunConfig, load_config


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="smat-train",
        description="Meta-train SMAT (or a baseline config) with Ray Train + DeepSpeed. Joins the Ray "
        "cluster at $RAY_ADDRESS (as under `ray job submit`), else starts a local one. "
        "Re-running with the same train.run_name resumes it.",
    )
    ap.add_argument("--config", action="append", default=[], help="run YAML (repeatable; later ones win)")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. dist.num_workers=4 train.seed=1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"smat-train: error: {exc}", file=sys.stderr)
        return 2
    from smat_dist.dist.launcher import train

    result = train(cfg)
    print(f"[smat-train] done: run directory {result.run_dir}")
    print(f"[smat-train] exported model {result.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
