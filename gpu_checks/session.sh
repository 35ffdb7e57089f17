#!/usr/bin/env bash
# One device call for the GPU figures of issues 11, 12 and 14 (see ../shared/gpu/README.md).
#   run(command="bash .gpu/env.sh && . /tmp/gpu-env && bash gpu_checks/session.sh", carry=[".gpu"])
# Steps in order of value, each under `timeout`; logs and JSON lines land in $OUT.
set -u
export PY=${PYTHON:-python3} OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu_out}; W=/tmp/gw; mkdir -p "$OUT" "$W"
T0=$(date +%s)
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s, t=$(( $(date +%s) - T0 ))s)"
  timeout --kill-after=5 "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -h '^{' "$OUT/$name.log" > "$OUT/$name.jsonl" || true
  echo "   rc=$rc; $(wc -l < "$OUT/$name.jsonl") JSON lines"; tail -n 4 "$OUT/$name.log"
}
step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  $PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))"'
# issue 14: every mixer under sync_debug_mode("error")
step sync_debug 60 $PY -m pytest -q -x -p no:cacheprovider tests/test_mixers_nosync.py -k cuda
# issue 14: mixer overhead at both settings of the issue's table
step aug_overhead 110 $PY benchmarks/aug_overhead.py --device cuda --models r18,r50 \
  --r18-repeats 8 --r50-repeats 4 --mix-repeats 15
# issue 11: s/iteration, d2-voc recipe, fp32 vs bf16, both backends; micro-batch auto's choice
step transfer_speed 185 bash gpu_checks/transfer_speed.sh "$W/t"
# issue 14: loader alone / step alone / engine epoch, ResNet-50 batch 256 bf16, loader=auto
step input_pipeline 150 $PY benchmarks/input_pipeline.py --device cuda --loader auto \
  --batch 256 --images 2560 --steps 12 --methods none,saliencymix --data "$W/jpeg"
# issue 12: resume of a paper method on the GPU; robustness and cam through torchrun
step resume_torchrun 90 bash gpu_checks/resume_torchrun.sh "$W/r"
echo "total $(( $(date +%s) - T0 ))s"
