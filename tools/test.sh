#!/usr/bin/env bash
# README command 2: install what is needed (idempotent), then run the whole test suite.
# Extra arguments go to pytest, e.g.  bash tools/test.sh -k gates -x
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/tools/install.sh"
# shellcheck disable=SC1091
source "${SMAT_VENV:-$here/.venv}/bin/activate"
cd "$here"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m pytest tests "$@"
