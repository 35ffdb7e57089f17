#!/usr/bin/env bash
# Issue 14 in ONE device call of at most 240 s (3 steps + a summary; 4 files in $OUT):
#   run(command="bash .gpu/env.sh && . /tmp/gpu-env && bash gpu_checks/issue14.sh",
#       carry=[".gpu"], timeout_s=300)          # .gpu: bash ../shared/gpu/prepare.sh
# What it measures: the CUDA graphs of the detectors, the greedy walk and the SaliencyMix /
# Guided-SR plans (tests: graph == eager, no host sync; aug_overhead: overhead_mix with graphs,
# overhead_mix_eager without, same rounds), and the torch loader with uint8 workers and the
# colour ops on the GPU (input_pipeline: colour_on=device).
# CPU dry run (small settings): DEVICE=cpu AUG_ARGS="--quick --models r18" \
#   PIPE_ARGS="--arch resnet18 --size 64 --images 48 --batch 8 --workers 1 --steps 2" \
#   OUT=/tmp/r2 bash gpu_checks/issue14.sh
set -u
export PY=${PYTHON:-python3} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
AUG_ARGS=${AUG_ARGS:---models r18,r50 --r18-repeats 8 --r50-repeats 4 --mix-repeats 15}
PIPE_ARGS=${PIPE_ARGS:---batch 256 --images 2560 --steps 12}
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
T0=$(date +%s)
step() {  # step NAME SECONDS CMD...: the log in $OUT/NAME.log, its JSON lines echoed
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s, t=$(( $(date +%s) - T0 ))s)"
  timeout --kill-after=5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$?"; grep -h '^{' "$OUT/$name.log" | cut -c1-600; tail -n 3 "$OUT/$name.log"
}
# graph == eager (detectors, greedy walk, mixer plans), every mixer under sync_debug "error"
step tests 40 $PY -m pytest -q -rs -p no:cacheprovider tests/test_mixers_nosync.py \
  tests/test_graphs.py -k cuda
step aug_overhead 100 $PY benchmarks/aug_overhead.py --device "$DEVICE" $AUG_ARGS
step input_pipeline 95 $PY benchmarks/input_pipeline.py --device "$DEVICE" --loader auto \
  $PIPE_ARGS --methods none,saliencymix --data /tmp/jpeg
$PY - "$OUT" <<'PY' | tee "$OUT/goals.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def lines(name):
    p = out / f"{name}.log"
    text = p.read_text(errors="replace").splitlines() if p.exists() else []
    return [json.loads(l) for l in text if l.startswith("{")]
goals = {"cutmix": 0.03, "saliencymix-sample": 0.03, "guided-sr-greedy": 0.05}
print("Issue 14 goals:")
for r in lines("aug_overhead"):
    if r["method"] in goals or "overhead_mix_eager" in r:
        limit = goals.get(r["method"])
        verdict = "    " if limit is None else ("MET " if r["overhead_mix"] <= limit else "MISS")
        print(f"  {verdict} {r['model']} b{r['batch']} {r['method']}: overhead_mix "
              f"{r['overhead_mix']} (graphs off: {r.get('overhead_mix_eager')}; t_mix "
              f"{r['t_mix_s']} s, none step {r['t_none_s']} s) [{r['device_name']}]")
for r in lines("input_pipeline"):
    for key, limit in (("epoch_vs_step", 0.9), ("saliencymix_step_vs_none", 0.98)):
        v = r.get(key)
        print(f"  {'MET ' if v is not None and v >= limit else 'MISS'} {key} >= {limit}: {v}"
              f"  (loader {r['loader_img_s']} img/s, epoch {r['epoch_img_s']}, step none "
              f"{r.get('step_none_img_s')}; loader={r['loader']}, colour on {r.get('colour_on')})")
PY
echo "total $(( $(date +%s) - T0 ))s"
