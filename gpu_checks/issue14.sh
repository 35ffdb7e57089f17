#!/usr/bin/env bash
# Issue 14 on one GPU, in one device call (see ../shared/gpu/README.md). Prepare on the CPU side:
#   bash ../shared/gpu/prepare.sh --opencv      # cv2.saliency: aug_overhead's official/reference rows
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl \
#       pytest pluggy iniconfig packaging pygments   # ~2 MB, for the sync-debug test
# then: run(command="bash .gpu/env.sh && . /tmp/gpu-env && bash gpu_checks/issue14.sh",
#           carry=[".gpu"], timeout_s=600)
# Every step runs under `timeout`; logs and JSON lines land in $OUT (or ./gpu_out).
# DALI (1.1 GB installed) cannot be carried: loader=auto resolves to torch unless the machine
# has nvidia.dali; the input_pipeline line says which loader ran.
set -u
export PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
step() {  # step NAME SECONDS CMD...: log to $OUT/NAME.log, JSON lines to $OUT/NAME.jsonl
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$OUT/$name.log" > "$OUT/$name.jsonl" || true
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s; $(wc -l < "$OUT/$name.jsonl") JSON lines"
  tail -n 3 "$OUT/$name.log"
}

step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  $PY -c "import torch, torchvision, importlib.util as u; print(torch.__version__, torch.version.cuda,
  torchvision.__version__, torch.cuda.get_device_name(0), \"dali\", u.find_spec(\"nvidia.dali\") is not None,
  \"cv2\", u.find_spec(\"cv2\") is not None)"'
if $PY -c "import pytest" 2>/dev/null; then
  step sync_debug 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_mixers_nosync.py \
    tests/test_loader_dali.py
else
  echo "pytest missing: see the preparation lines at the top"; fi
step aug_overhead 240 $PY benchmarks/aug_overhead.py --device cuda --models r18,r50
step input_pipeline 240 $PY benchmarks/input_pipeline.py --device cuda --loader auto \
  --batch 256 --images 2560 --steps 20 --methods none,saliencymix

$PY - "$OUT" <<'PY' | tee "$OUT/goals.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def lines(name):
    p = out / f"{name}.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
print("Issue 14 goals (H100 or H200, one run each):")
rows = []
for r in lines("aug_overhead"):
    limit = {"cutmix": 0.03, "saliencymix-sample": 0.03, "guided-sr-greedy": 0.05}.get(r["method"])
    if limit is not None:
        rows.append((f"overhead_mix {r['method']} {r['model']} b{r['batch']} <= {limit:.0%}",
                     r["overhead_mix"], r["overhead_mix"] <= limit, r["device_name"]))
for r in lines("input_pipeline"):
    rows.append((f"engine epoch >= 0.9 x step alone (loader={r['loader']}, {r['arch']} "
                 f"b{r['batch']} {r['amp']})", r["epoch_vs_step"], r["epoch_vs_step"] >= 0.9,
                 r["device_name"]))
    rows.append(("saliencymix step >= 0.98 x none step", r.get("saliencymix_step_vs_none"),
                 (r.get("saliencymix_step_vs_none") or 0) >= 0.98, r["device_name"]))
if not rows:
    print("  no measurements (see the logs)")
for what, value, ok, dev in rows:
    print(f"  {'MET ' if ok else 'MISS'} {what}: {value}  [{dev}]")
PY
ls -la "$OUT"
