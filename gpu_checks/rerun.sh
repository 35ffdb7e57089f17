#!/usr/bin/env bash
# Second call of the session: the steps that failed or were cut in session.sh (logs only).
set -u
export PY=${PYTHON:-python3} OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu_out}; W=/tmp/gw2; mkdir -p "$OUT" "$W"
step() { local name=$1 secs=$2; shift 2; echo "== $name"; timeout --kill-after=5 "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$?"; grep -h '^{' "$OUT/$name.log" | cut -c1-400; tail -n 3 "$OUT/$name.log"; }
step sync_debug 60 $PY -m pytest -q -p no:cacheprovider tests/test_mixers_nosync.py -k cuda
step aug_overhead 110 $PY benchmarks/aug_overhead.py --device cuda --models r18,r50 --r18-repeats 8 --r50-repeats 4 --mix-repeats 15
BACKENDS=detectron2 step d2_speed 100 bash gpu_checks/transfer_speed.sh "$W/t"
smix data shapes "$W/data" --classes 3 --per-class 24 --size 64 >/dev/null 2>&1
$PY -c "import torchvision; from smix.checkpoint import BackboneMeta, save_checkpoint; save_checkpoint('$W/r18.safetensors', torchvision.models.resnet18(num_classes=3), BackboneMeta('resnet18', 3, ('circle','square','triangle'), input_size=64, resize=64, crop=64, dataset='shapes'))"
step cam_torchrun 60 torchrun --nproc_per_node 1 -m cam localize --ckpt "$W/r18.safetensors" --voc-root "$W/data" --out "$W/camloc"
