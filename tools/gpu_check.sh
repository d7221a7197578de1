#!/usr/bin/env bash
# The GPU check: run unattended from the repository root on a machine with one NVIDIA GPU, within one
# overall deadline (default 450 s; each step's timeout is clamped to what is left). docs/performance.md
# says how to run it on a borrowed GPU.
#
#   bash tools/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else ./gpu-check
#   bash tools/gpu_check.sh --smoke [OUT_DIR]  # every step on CPU with tiny sizes (rehearses this script)
#
# What it needs there: Python >= 3.10 with torch (CUDA), timm, numpy, safetensors, pillow. Missing
# packages (deepspeed, omegaconf, webdataset, pydantic, ...) are installed from the wheels in .whl/
# ($SMAT_WHEELS), with no package index; if the imports still fail it stops at once and says which.
#
# Every result is appended to OUT/results.jsonl as soon as it is measured, and each step's PASS/FAIL/SKIP
# to OUT/summary.txt; the script exits non-zero if any step failed. Steps:
#   1. CUDA facts                 2. a plain all-reduce (torchrun, 1 rank; NCCL) before DeepSpeed
#   3. bf16 vs fp32 of one ViT-S SMAT M=8 task (loss, and relative error and cosine of each gradient group,
#      against an fp32-vs-fp32 noise floor)
#   4. ProtoNet / SMAT M=1 / M=8 at 128 px bf16 on 10w5s10q and on the largest Meta-Dataset episode:
#      s/task, tasks/s, FLOPs per task and MFU, peak allocated and reserved memory (tools/bench_step.py)
#   5. the synthetic benchmark; torchrun meta-training that crashes after a checkpoint, then resumes it
#   6. one evaluation of that model in bf16 and one in fp32
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out="${1:-${OUT:-$PWD/gpu-check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
deadline="${SMAT_GPU_CHECK_DEADLINE:-450}"
work="$(mktemp -d "${TMPDIR:-/tmp}/smat-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
results="$out/results.jsonl"
summary="$out/summary.txt"
: > "$results"
: > "$summary"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE RAY_USAGE_STATS_ENABLED=0
say() { echo "[gpu-check] $*" | tee -a "$out/log.txt"; }

# -- environment: the wheels of .whl/, then our package from this checkout
wheels="${SMAT_WHEELS:-$PWD/.whl}"
imports="import omegaconf, deepspeed, webdataset, timm, safetensors; import smat_dist.config, smat_dist.train.engine"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "$imports" >/dev/null 2>&1; then
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        say "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels (no index)"
        if ! "$python" -m pip install -q --no-deps --no-index "$wheels"/*.whl >>"$out/log.txt" 2>&1; then
            say "pip install into the interpreter failed; installing into a private directory instead"
            "$python" -m pip install -q --no-deps --no-index --target "$work/site" "$wheels"/*.whl >>"$out/log.txt" 2>&1
            export PYTHONPATH="$PWD:$work/site${PYTHONPATH:+:$PYTHONPATH}"
        fi
        "$python" -m pip install -q --no-deps --no-index --no-build-isolation -e . >>"$out/log.txt" 2>&1 \
            || say "note: editable install failed; using PYTHONPATH=$PWD"
    else
        say "no wheels in $wheels (docs/performance.md: mkdir -p .whl && cp ../shared/wheels/gpu-py312/*.whl .whl/)"
    fi
fi
if ! err="$("$python" -c "$imports" 2>&1)"; then
    say "STOP: the project cannot be imported: $(echo "$err" | tail -1)"
    echo "FAIL imports: $(echo "$err" | tail -1)" >> "$summary"
    exit 3
fi

if [ "$smoke" = 1 ]; then
    # the GPU machine has no Ray: hide it here too, so the rehearsal fails where that machine would
    mkdir -p "$work/noray/ray"
    echo 'raise ImportError("ray is hidden by gpu_check --smoke: the GPU machine has no Ray")' > "$work/noray/ray/__init__.py"
    export PYTHONPATH="$work/noray:$PYTHONPATH"
    device=cpu; image=24; md_image=24; steps=4; eval_episodes=2; bench_tasks=1; tiny=--tiny
    bench_args="--backbones tiny --threads 2 --repeats 1"
    model_args="model.backbone.name=vit_tiny_patch16_224 model.backbone.img_size=$image model.backbone.patch_size=8
                model.backbone.embed_dim=32 model.backbone.depth=1 model.backbone.num_heads=2"
    gpu_args="dist.use_gpu=false train.threads=1"
    episode_args="data.episode.max_ways_upper_bound=5 data.episode.max_support_set_size=20 data.episode.max_num_query=3"
    synth_scale=0.25
else
    device=cuda; image=128; md_image=128; steps=20; eval_episodes=20; bench_tasks=4; tiny=
    bench_args="--backbones vit_s16 --threads 8 --repeats 3"
    model_args="model.backbone.name=vit_small_patch16_224 model.backbone.img_size=$image"
    gpu_args="dist.use_gpu=true"
    episode_args="data.episode.max_ways_upper_bound=20 data.episode.max_support_set_size=200 data.episode.max_num_query=10"
    synth_scale=1.0
fi
say "mode $([ $smoke = 1 ] && echo smoke || echo gpu), device $device, deadline ${deadline} s, results in $results"

failed=0
step() {  # step NAME WANT_S COMMAND...: run within min(WANT_S, time left), log, record the outcome
    local name="$1" want="$2"; shift 2
    local left=$((deadline - SECONDS - 5))
    local limit=$(( want < left ? want : left ))
    if [ "$limit" -lt 10 ]; then
        echo "SKIP $name (deadline: ${left} s left)" | tee -a "$summary"
        printf '{"step": "result", "name": "%s", "status": "skip", "seconds": 0}\n' "$name" >> "$results"
        failed=1
        return 1
    fi
    local t0=$SECONDS rc=0
    say "=== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" >>"$out/log.txt" 2>&1 || rc=$?
    local status=pass
    if [ "$rc" != 0 ]; then status=fail; failed=1; fi
    [ "$rc" = 124 ] && status="fail" && say "$name: timed out after ${limit} s"
    echo "$(echo $status | tr a-z A-Z) $name ($((SECONDS - t0)) s, exit $rc)" | tee -a "$summary"
    printf '{"step": "result", "name": "%s", "status": "%s", "seconds": %d, "exit": %d}\n' \
        "$name" "$status" "$((SECONDS - t0))" "$rc" >> "$results"
    return "$rc"
}
torchrun() { "$python" -m torch.distributed.run --standalone --nproc-per-node 1 "$@"; }

step "cuda facts" 60 "$python" tools/gpu_check.py facts "$results" "$device"
step "all-reduce (1 rank, $([ $device = cuda ] && echo NCCL || echo gloo))" 60 \
    torchrun tools/gpu_check.py nccl "$results" "$device"
step "bf16 vs fp32, one SMAT M=8 task" 90 "$python" tools/gpu_check.py precision "$results" "$device" $tiny
grep '"bf16 vs fp32"' "$results" | tail -2 | sed 's/^/[gpu-check] /'

for episode in 10w5s10q md; do
    size=$([ "$episode" = md ] && echo "$md_image" || echo "$image")
    # shellcheck disable=SC2086
    step "bench $episode (bf16, $size px)" 150 "$python" tools/bench_step.py --device "$device" --precision bf16 \
        --image-size "$size" --episode "$episode" --tasks-per-step "$bench_tasks" $bench_args \
        --json "$work/bench_$episode.json"
    "$python" - "$work/bench_$episode.json" "$results" <<'PY'
import json, sys, os
if os.path.exists(sys.argv[1]):
    with open(sys.argv[2], "a") as f:
        for row in json.load(open(sys.argv[1])):
            f.write(json.dumps({"step": "bench", **row}) + "\n")
PY
done

data="$work/data"
step "synthetic benchmark" 90 "$python" -m smat_dist.data.cli synth "$data" --scale "$synth_scale"
train() {  # the torchrun run: checkpoint at half-way, crash (debug hook) after it; then the same command resumes
    # shellcheck disable=SC2086
    torchrun -m smat_dist.train --config configs/smat.yaml $model_args model.backbone.pretrained=false \
        model.precision=bf16 $gpu_args data.root="$data" data.image_size=$image $episode_args data.num_actors=1 \
        train.output_dir="$work/runs" train.run_name=gpu-check train.max_steps=$steps \
        train.checkpoint_every=$((steps / 2)) debug.fault_at_step=$((steps / 2 + 1)) train.tasks_per_step=4 \
        monitor.enabled=false "$@"
}
run_dir="$work/runs/gpu-check"
step "torchrun: crash after the step-$((steps / 2)) checkpoint" 120 bash -c "$(declare -f train torchrun); \
    python=$python model_args='$model_args' gpu_args='$gpu_args' data='$data' image=$image episode_args='$episode_args' \
    steps=$steps work='$work'; train; test \$? -ne 0 && grep -q 'injected fault' '$run_dir/train.log'"
step "torchrun: resume to step $steps" 150 bash -c "$(declare -f train torchrun); \
    python=$python model_args='$model_args' gpu_args='$gpu_args' data='$data' image=$image episode_args='$episode_args' \
    steps=$steps work='$work'; train | tee '$work/resume.out'; grep -q 'resumed from' '$work/resume.out'"
"$python" - "$run_dir/metrics.jsonl" "$results" <<'PY'
import json, sys, os
if os.path.exists(sys.argv[1]):
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    if rows:
        tail = rows[len(rows) // 2:]
        row = {"step": "train", "steps": rows[-1]["step"], "loss": rows[-1]["loss"],
               "median_tasks_per_s_second_half": sorted(r["tasks_per_s"] for r in tail)[len(tail) // 2]}
        open(sys.argv[2], "a").write(json.dumps(row) + "\n")
PY

for precision in bf16 fp32; do
    step "evaluation ($precision)" 90 "$python" -m smat_dist.eval.cli --checkpoint "$run_dir" --data "$data" \
        --out "$work/eval_$precision" -q episodes=$eval_episodes precision=$precision device=$device \
        data.image_size=$image
    "$python" - "$work/eval_$precision/results.csv" "$results" "$precision" <<'PY'
import csv, json, sys, os
if os.path.exists(sys.argv[1]):
    rows = list(csv.DictReader(open(sys.argv[1])))
    open(sys.argv[2], "a").write(json.dumps({"step": "eval", "precision": sys.argv[3], "rows": rows}) + "\n")
PY
done

"$python" tools/gpu_check.py summary "$results" | tee -a "$summary"
say "done in ${SECONDS} s (deadline ${deadline} s); results in $out"
exit $failed
