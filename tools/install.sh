#!/usr/bin/env bash
# Idempotent environment set-up, shared by tools/demo.sh, tools/test.sh and .ci/run.
#
#   SMAT_VENV   virtual environment to create/use (default: .venv in the repository)
#
# torch and torchvision are installed first, on their own: timm imports torchvision, and
# torchvision 0.29.1 only works with torch 2.14.1 (with the 2.13 CPU wheel, pip either swaps
# torch or `import timm` fails). Everything else then installs under tools/constraints.txt,
# which pins the exact versions tested together.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SMAT_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[install] creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

stamp="$venv/.smat-dist-install"
want="$(cat "$here/pyproject.toml" "$here/tools/constraints.txt" | sha256sum | cut -d' ' -f1) $here"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import smat_dist, torch, timm, ray, deepspeed" >/dev/null 2>&1; then
    echo "[install] $venv is up to date"
    exit 0
fi

echo "[install] torch + torchvision"
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
echo "[install] smat-dist and its dependencies (tools/constraints.txt)"
python -m pip install -q -c "$here/tools/constraints.txt" -e "$here[dev]"
python -m pip check
echo "$want" > "$stamp"
echo "[install] done: $venv"
