"""``smat-sweep --config configs/sweeps/<name>.yaml [key=value ...]``: run (or resume) an ablation sweep."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

from smat_dist.errors import ConfigError
from smat_dist.sweep.config import load_sweep_config
from smat_dist.sweep.runner import Sweep
from smat_dist.sweep.state import SweepLocked, SweepStateError


def _only(items: List[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--only needs AXIS=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="smat-sweep",
        description="A grid of real smat-train + smat-eval runs (cells) on the Ray cluster at $RAY_ADDRESS (else a "
        "local one). Re-running the same command resumes: finished cells are skipped, interrupted ones continue, "
        "failed ones were retried up to max_attempts. Writes OUT/sweep.csv, tradeoff.png and scaling.png.")
    ap.add_argument("--config", required=True, type=Path, help="sweep YAML (configs/sweeps/*.yaml)")
    ap.add_argument("--out", type=Path, help="sweep directory (default: the config's out, else "
                    "<train.output_dir>/sweeps/<name>)")
    ap.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                    help="run only the cells with this axis value (JSON or a plain string; repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="run_overrides",
                    help="run-config override for every cell, after the sweep's overrides (repeatable), "
                    "e.g. --set data.root=/mnt/shared/data/md")
    ap.add_argument("--retry-failed", action="store_true", help="give failed cells max_attempts new attempts")
    ap.add_argument("--dry-run", action="store_true", help="list the cells and their commands, run nothing")
    ap.add_argument("--report", action="store_true", help="rewrite sweep.csv and the plots from the state, run nothing")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (without RAY_ADDRESS)")
    ap.add_argument("overrides", nargs="*", help="sweep-config overrides, e.g. concurrency=4 max_attempts=3")
    a = ap.parse_args(argv)

    try:
        cfg = load_sweep_config(a.config, a.overrides)
        cfg.overrides = list(cfg.overrides) + list(a.run_overrides)
        sweep = Sweep(cfg, a.config, a.out, num_cpus=a.num_cpus, retry_failed=a.retry_failed, only=_only(a.only))
    except ConfigError as exc:
        print(f"smat-sweep: error: {exc}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(f"{len(sweep.cells)} cells -> {sweep.out}")
        for c in sweep.cells:
            print(f"\n{c.id}\n  {' '.join(sweep.train_cmd(c))}\n  {' '.join(sweep.eval_cmd(c))}")
        return 0
    if a.report:
        files = sweep.write_report()
        print("\n".join(f"[smat-sweep] wrote {p}" for p in files.values()))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # `ray job stop`
    try:
        counts = sweep.run()
    except SweepLocked as exc:
        print(f"smat-sweep: error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, SweepStateError) as exc:
        print(f"smat-sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if counts["failed"] == 0 and counts["pending"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
