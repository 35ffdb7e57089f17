#!/usr/bin/env bash
# s/iteration of `smix transfer` on the d2-voc recipe (batch 16, 480-800 px) from a random
# ResNet-50, fp32 vs bf16, detectron2 and torchvision; prints one JSON line per run.
set -u; W=$1; mkdir -p "$W"
smix data shapes "$W/data" --classes 4 --per-class 12 --size 256 >/dev/null
$PY - "$W" <<'PY'
import sys, torchvision
from pathlib import Path
from smix.checkpoint import BackboneMeta, save_checkpoint
m = torchvision.models.resnet50()
save_checkpoint(Path(sys.argv[1]) / "r50.safetensors", m,
                BackboneMeta("resnet50", 1000, tuple(f"c{i}" for i in range(1000))))
PY
for backend in ${BACKENDS:-detectron2 torchvision}; do for amp in ${AMPS:-off bf16}; do
  run="$W/$backend-$amp"; t0=$(date +%s.%N)
  timeout 45 smix transfer --ckpt "$W/r50.safetensors" --voc-root "$W/data" --classes auto \
    --iters ${ITERS:-12} --backend $backend --out "$run" amp=$amp log_period=4 checkpoint_period=100000 ${EXTRA:-} \
    workers=4 > "$run.log" 2>&1; rc=$?
  grep -ih "micro" "$run.log" | head -2
  $PY - "$run" "$backend" "$amp" "$rc" "$t0" <<'PY'
import json, sys, time
from pathlib import Path
run, backend, amp, rc, t0 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
rows = [json.loads(l) for l in (Path(run) / "log.jsonl").read_text().splitlines()] \
    if (Path(run) / "log.jsonl").exists() else []
rows = [r for r in rows if "iter" in r]
s_it = None
if backend == "detectron2" and rows:
    s_it = rows[-1].get("time")
elif len(rows) >= 2:  # cumulative sec_per_iter: the last window only (no warm-up)
    a, b = rows[-2], rows[-1]
    s_it = (b["sec_per_iter"] * b["iter"] - a["sec_per_iter"] * a["iter"]) / (b["iter"] - a["iter"])
import torch
print(json.dumps({"check": "transfer_speed", "backend": backend, "amp": amp, "rc": rc,
                  "s_per_iter": s_it, "iters_logged": rows[-1]["iter"] if rows else 0,
                  "wall_s": round(time.time() - t0, 1),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}))
PY
done; done
