#!/usr/bin/env bash
# A worker node lost mid-run, on a 3-node Ray cluster on this machine (see tools/local_cluster.py):
#   tools/cluster_e2e.sh                      # synthetic data served over HTTP on 127.0.0.1, runs in a shared dir
#   DATA_ROOT=s3://bucket/synth STORAGE=s3://bucket/runs tools/cluster_e2e.sh   # object storage instead
# Prints the measured recovery time; exit 0 when the run finished with metrics rows 1..N once each and the
# same final parameters as an uninterrupted run. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
WORK="${WORK:-$(mktemp -d -t smat-cluster-e2e-XXXX)}"
echo "work directory: $WORK"
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill -- "-$server_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ -z "${DATA_ROOT:-}" ]; then
  python -m smat_dist.data.cli synth "$WORK/data" --scale 0.5 --sources textures,doodles,digits >"$WORK/synth.log" 2>&1 || { tail "$WORK/synth.log"; exit 1; }
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  setsid python -m http.server "$port" --bind 127.0.0.1 --directory "$WORK/data" >"$WORK/http.log" 2>&1 &
  server_pid=$!
  DATA_ROOT="http://127.0.0.1:$port"
  for _ in $(seq 50); do python -c "import urllib.request; urllib.request.urlopen('$DATA_ROOT/', timeout=1)" 2>/dev/null && break; sleep 0.2; done
fi
STORAGE="${STORAGE:-$WORK/shared/runs}"
python tools/local_cluster.py e2e --data-root "$DATA_ROOT" --storage "$STORAGE" --workdir "$WORK/cluster" --steps "${STEPS:-6}"
