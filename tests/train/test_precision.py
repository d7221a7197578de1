"""bf16 through the launchers, for every shipped training config: CPU autocast to bf16 does what CUDA
autocast does for matmuls, so this is the GPU's precision path on CPU. The runs must finish with finite
losses within a stated tolerance of the same run in fp32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from smat_dist.train.distributed import Runtime
from smat_dist.train.launch import run
from smat_dist.train.ray_launcher import train

from .conftest import REPO, TINY
from .test_launchers import torchrun

pytestmark = pytest.mark.timeout(900)

SHIPPED = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("*.yaml")) + \
    sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs" / "ablations").glob("*.yaml"))
STEPS = ["train.tasks_per_step=2", "train.max_steps=2", "train.checkpoint_every=2"]
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3) in the backbone's matmuls only (masks, α,
# merge, losses stay fp32); over two meta-steps of a 1-block ViT the step losses moved by < 1e-3 relative
# in the single-process test of every config. 2e-2 leaves room for the 2-rank summation order.
RTOL = 2e-2


def _cfg(out: Path, name: str, config: str, *extra: str):
    from smat_dist.config import RunConfig, load_config

    return load_config(RunConfig, [REPO / "configs" / config],
                       TINY + STEPS + [f"train.output_dir={out}", f"train.run_name={name}", *extra])


def _losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("config", SHIPPED)
def test_bf16_under_ray_and_torchrun_is_finite_and_close_to_fp32(config, ray_session, tmp_path):
    tag = Path(config).stem
    run(_cfg(tmp_path, f"{tag}-fp32", config, "model.precision=fp32"), Runtime("local"))
    reference = _losses(tmp_path / f"{tag}-fp32")

    ray_cfg = _cfg(tmp_path, f"{tag}-ray", config, "model.precision=bf16", "dist.num_workers=2")
    train(ray_cfg)
    proc = torchrun(tmp_path, f"{tag}-torchrun", "model.precision=bf16", config=config, steps=STEPS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for launcher in ("ray", "torchrun"):
        losses = _losses(tmp_path / f"{tag}-{launcher}")
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (launcher, losses)
        assert losses == pytest.approx(reference, rel=RTOL), (launcher, losses, reference)
        assert losses != reference, f"{launcher}: bf16 did not change anything: was autocast on?"
