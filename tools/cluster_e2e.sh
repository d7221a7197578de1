#!/usr/bin/env bash
# A worker node lost mid-run, on a 3-node Ray cluster on this machine (see tools/local_cluster.py):
#   tools/cluster_e2e.sh      # a local S3-compatible server (tools/local_s3.py): data and runs in its buckets
#   DATA_ROOT=s3://bucket/md STORAGE=s3://bucket/runs tools/cluster_e2e.sh    # your own object store (AWS_* set)
#   DATA_ROOT=http://host/md STORAGE=/shared/runs tools/cluster_e2e.sh        # any data root, a shared directory
# Prints the measured recovery time; exit 0 when the run finished with metrics rows 1..N once each and the
# same final parameters as an uninterrupted run. Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
WORK="${WORK:-$(mktemp -d -t smat-cluster-e2e-XXXX)}"
echo "work directory: $WORK"
cleanup() { [ -f "$WORK/s3.pid" ] && python tools/local_s3.py stop --pid-file "$WORK/s3.pid" || true; }
trap cleanup EXIT
if [ -z "${DATA_ROOT:-}" ]; then
  eval "$(python tools/local_s3.py start --bucket data --bucket runs --pid-file "$WORK/s3.pid" --log "$WORK/s3.log")"
  echo "S3-compatible server at $AWS_ENDPOINT_URL (buckets data, runs)"
  python -m smat_dist.data.cli synth "$WORK/data" --scale 0.5 --sources textures,doodles,digits >"$WORK/synth.log" 2>&1 || { tail "$WORK/synth.log"; exit 1; }
  python -m smat_dist.data.cli upload "$WORK/data" s3://data/synth >"$WORK/upload.log" 2>&1 || { tail "$WORK/upload.log"; exit 1; }
  DATA_ROOT="s3://data/synth"
  STORAGE="${STORAGE:-s3://runs/e2e-$(basename "$WORK")}"
fi
STORAGE="${STORAGE:-$WORK/shared/runs}"
python tools/local_cluster.py e2e --data-root "$DATA_ROOT" --storage "$STORAGE" --workdir "$WORK/cluster" --steps "${STEPS:-6}"
