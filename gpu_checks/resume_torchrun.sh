#!/usr/bin/env bash
# Issue 12 on the GPU: saliencymix and cutout runs resumed (the round trip that failed),
# robustness FGSM and CAM localisation through torchrun.
set -u; W=$1; mkdir -p "$W"
smix data shapes "$W/data" --classes 3 --per-class 24 --size 64 >/dev/null
for m in saliencymix cutout; do
  smix pretrain --preset shapes-resnet18 --data "$W/data" --method $m --out "$W/$m" --epochs 1 \
    amp=${AMP:-bf16} progress=false | tail -1
  smix pretrain --resume "$W/$m" --epochs 2 progress=false | tail -1; echo "resume $m rc=$?"
done
ck="$W/saliencymix/backbone.safetensors"
torchrun --nproc_per_node 1 -m robustness fgsm --ckpt "$ck" --data "$W/data/val" \
  --out "$W/fgsm" --eps 1,8 | tail -2; echo "torchrun robustness rc=$?"
torchrun --nproc_per_node 1 -m cam localize --ckpt "$ck" --voc-root "$W/data" \
  --out "$W/camloc" | tail -2; echo "torchrun cam rc=$?"
python3 -c "import json,sys; [print(json.dumps({'check':'resume_torchrun','run':p,'results':json.load(open(p))['results']})[:600]) for p in sys.argv[1:]]" \
  "$W"/saliencymix/metrics.json "$W"/fgsm/metrics.json "$W"/camloc/metrics.json
