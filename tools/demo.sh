#!/usr/bin/env bash
# README command 1: install what is needed (idempotent), then run the main job on the embedded
# local default: synthetic benchmark, a small ViT pre-trained on it, PMF and SMAT meta-trained on
# local Ray with 2 workers, Pre/PMF/SMAT evaluated, Table-1-style comparison printed.
# Arguments go to `python -m smat_dist.demo` (e.g. --out runs/demo, train.max_steps=20).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/tools/install.sh"
# shellcheck disable=SC1091
source "${SMAT_VENV:-$here/.venv}/bin/activate"
cd "$here"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m smat_dist.demo "$@"
