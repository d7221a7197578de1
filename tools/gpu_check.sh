#!/usr/bin/env bash
# The GPU check: run from the repository root on a machine with one NVIDIA GPU; about 6 minutes.
#
#   bash tools/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else ./gpu-check
#   bash tools/gpu_check.sh --smoke [OUT_DIR]  # the same steps on CPU with a tiny ViT (tests this script)
#
# What it needs there: Python >= 3.10 with torch (CUDA), timm, numpy, safetensors, pillow. Ray is not
# needed (training goes through the torchrun launcher). Missing pure-Python packages (deepspeed,
# omegaconf, webdataset, pydantic, ...) are installed from wheels in $SMAT_WHEELS (default .whl/ in the
# repository) into a private --target directory; nothing else is touched.
#
# Steps, each PASS/FAIL in OUT/summary.txt (the script exits non-zero if any failed):
#   1. torch.cuda facts                                     -> cuda.json
#   2. ViT-S/16, 128 px, bf16: tasks/s and peak GPU memory of ProtoNet, SMAT M=1 and M=8 on a
#      Meta-Dataset-sized episode and on 10-way 5-shot 10-query   -> bench_md.json, bench_10w.json
#   3. the synthetic benchmark (smat-data synth)
#   4. 20 meta-steps of `torchrun --nproc-per-node 1 -m smat_dist.train` on NCCL, synthetic data
#                                                             -> train_metrics.jsonl, train.log
#   5. one evaluation pass of that model (smat-eval, bf16)  -> eval_results.csv
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out="${1:-${OUT:-$PWD/gpu-check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/smat-gpu-check.XXXXXX")"
summary="$out/summary.txt"
: > "$summary"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0

# -- environment: our package from this checkout, missing wheels into a private directory
site="$work/site"
wheels="${SMAT_WHEELS:-$PWD/.whl}"
if ! "$python" -c "import omegaconf, deepspeed, webdataset" 2>/dev/null; then
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl \
            || echo "[gpu-check] warning: wheel install failed" >&2
    else
        echo "[gpu-check] warning: omegaconf/deepspeed/webdataset missing and no wheels in $wheels" >&2
    fi
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$smoke" = 1 ]; then
    device=cpu; precision=bf16; backbones="tiny"; image=32; steps=3; eval_episodes=3
    model_args="model.backbone.name=vit_tiny_patch16_224 model.backbone.img_size=32 model.backbone.patch_size=8
                model.backbone.embed_dim=32 model.backbone.depth=1 model.backbone.num_heads=2"
    gpu_args="dist.use_gpu=false"
else
    device=cuda; precision=bf16; backbones="vit_s16"; image=128; steps=20; eval_episodes=20
    model_args="model.backbone.name=vit_small_patch16_224 model.backbone.img_size=128"
    gpu_args="dist.use_gpu=true"
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record PASS/FAIL and the time
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo "=== [gpu-check] $name" | tee -a "$out/log.txt"
    if timeout "$limit" "$@" >>"$out/log.txt" 2>&1; then
        echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$summary"
    else
        echo "FAIL $name (exit $?, $((SECONDS - t0)) s; see log.txt)" | tee -a "$summary"
    fi
}

step "cuda facts" 120 "$python" - "$out/cuda.json" "$device" <<'PY'
import json, sys, torch
facts = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 1024**3, 1),
                 bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                 device_count=torch.cuda.device_count())
json.dump(facts, open(sys.argv[1], "w"), indent=1)
print(json.dumps(facts))
sys.exit(0 if facts["cuda_available"] or sys.argv[2] == "cpu" else 1)
PY

for episode in md 10w5s10q; do
    tag=$([ "$episode" = md ] && echo md || echo 10w)
    step "bench_step $episode ($precision, $image px, $device)" 420 "$python" tools/bench_step.py --device "$device" \
        --precision "$precision" --image-size "$image" --episode "$episode" --backbones $backbones --repeats 3 \
        --threads 8 --json "$out/bench_$tag.json"
done

data="$work/data"
step "synthetic benchmark" 300 "$python" -m smat_dist.data.cli synth "$data"

run_dir="$work/runs/gpu-check"
# shellcheck disable=SC2086
step "torchrun: $steps meta-steps on ${device} (NCCL on GPU)" 600 "$python" -m torch.distributed.run --standalone \
    --nproc-per-node 1 -m smat_dist.train --config configs/smat.yaml $model_args model.backbone.pretrained=false \
    model.precision=$precision $gpu_args data.root="$data" data.image_size=$image \
    data.episode.max_ways_upper_bound=20 data.episode.max_support_set_size=200 data.episode.max_num_query=10 \
    data.num_actors=1 train.output_dir="$work/runs" train.run_name=gpu-check train.max_steps=$steps \
    train.checkpoint_every=10 train.tasks_per_step=4 monitor.enabled=false
cp "$run_dir/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null
cp "$run_dir/train.log" "$out/train.log" 2>/dev/null

step "evaluation pass (smat-eval, $precision)" 300 "$python" -m smat_dist.eval.cli --checkpoint "$run_dir" \
    --data "$data" --out "$work/eval" -q episodes=$eval_episodes precision=$precision device=$device \
    data.image_size=$image
cp "$work/eval/results.csv" "$out/eval_results.csv" 2>/dev/null

"$python" - "$out" <<'PY' | tee -a "$summary"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for tag in ("md", "10w"):
    p = out / f"bench_{tag}.json"
    if p.exists():
        for r in json.loads(p.read_text()):
            gpu = r.get("peak_gpu_gb")
            print(f"{tag:3s} {r['backbone']} {r['kind']:8s} M={r['experts']}: {r['tasks_per_s']:.2f} tasks/s "
                  f"({r['sec_per_task'] * 1000:.1f} ms/task), peak GPU {gpu if gpu is None else round(gpu, 2)} GB")
m = out / "train_metrics.jsonl"
if m.exists():
    rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
    if rows:
        tail = rows[len(rows) // 2:]
        print(f"train: {rows[-1]['step']} steps, loss {rows[-1]['loss']:.4f}, median tasks/s over the second half "
              f"{sorted(r['tasks_per_s'] for r in tail)[len(tail) // 2]:.2f}")
PY
rm -rf "$work"
echo "[gpu-check] results in $out"
! grep -q '^FAIL' "$summary"
