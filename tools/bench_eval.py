"""Meta-testing throughput: episodes/s of ``smat-eval`` for Pre, PMF and SMAT on a dataset root.

    python tools/bench_eval.py DATA_DIR [--img 32 --patch 8 --dim 64 --depth 2 --heads 2]
                               [--episodes 600] [--actors 0] [--modes none] [--methods pre,pmf,smat]

Builds untrained exports of the given ViT size (speed does not depend on the weights' values;
SMAT gets 8 experts with ~70% sparse random masks and a hypernetwork, PMF one dense offset) and
runs :func:`smat_dist.eval.evaluate` on every source with a test split, printing wall time and
scored episodes per second. Frozen lists are cached under DATA_DIR/episodes (first run writes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def make_export(path: Path, method: str, backbone: dict) -> Path:
    import torch

    from smat_dist.export import export_model
    from smat_dist.smat import SMAT
    from smat_dist.smat.config import (BackboneConfig, GateConfig, HypernetConfig, InnerConfig, ModelConfig,
                                       TeacherConfig)

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(**backbone), method=method)
    if method == "pmf":
        cfg.gates = GateConfig(enabled=False, num_experts=1)
        cfg.hypernet = HypernetConfig(enabled=False)
        cfg.inner = InnerConfig(steps=0)
        cfg.teacher = TeacherConfig(enabled=False, kd_weight=0.0)
    model = SMAT(cfg)
    with torch.no_grad():
        model.delta.normal_(0.0, 0.02)
        if model.gates is not None:
            model.gates.logits.copy_(torch.where(torch.rand_like(model.gates.logits) < 0.3, 4.0, -4.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_model(model, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--actors", type=int, default=0)
    ap.add_argument("--modes", default="none")
    ap.add_argument("--methods", default="pre,pmf,smat")
    ap.add_argument("--set", action="append", default=[], help="extra EvalConfig key=value")
    a = ap.parse_args(argv)

    from smat_dist.eval.config import load_eval_config
    from smat_dist.eval.runner import evaluate

    bb = dict(name="vit_tiny_patch16_224", img_size=a.img, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
              num_heads=a.heads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    exports = {m: make_export(tmp / m / "model.safetensors", m, bb) for m in ("smat", "pmf")}
    cfg = load_eval_config([f"data.root={a.data}", f"episodes={a.episodes}", f"actors={a.actors}",
                            f"modes=[{a.modes}]", "progress_every_s=30", *a.set])
    rows = []
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        if method == "pre":
            rep = evaluate(cfg, str(exports["smat"]), method="pre", say=lambda m: None)
        else:
            rep = evaluate(cfg, str(exports[method]), say=lambda m: None)
        wall = time.perf_counter() - t0
        n = len(rep.episodes)
        rows.append({"method": rep.label, "episodes": n, "wall_s": round(wall, 1),
                     "scoring_episodes_per_s": round(rep.episodes_per_s, 1), "overall_episodes_per_s": round(n / wall, 1),
                     "stats": rep.worker_stats})
        print(json.dumps(rows[-1]), flush=True)
    print(f"backbone {bb}, actors {a.actors}, modes {a.modes}: total {sum(r['wall_s'] for r in rows):.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
