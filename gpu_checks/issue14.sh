#!/usr/bin/env bash
# Issue 14 in ONE device call: 11 steps within a 545 s budget (a step gets at most what is left;
# most important first; STEPS="a b" runs only those), then a summary; in $OUT goals.txt and
# logs.tgz (the step logs):
#   run(command="bash .gpu/env.sh && . /tmp/gpu-env && bash gpu_checks/issue14.sh",
#       carry=[".gpu"], timeout_s=580)          # .gpu: bash ../shared/gpu/prepare.sh
# With DALI (the device has none; 149 MiB in three parts, a call each, on a warm machine): see
# gpu_checks/dali_bundle.sh; this script then also tests DALI's GPU operators (step dali) and
# times loader=auto (-> DALI); after a full run, STEPS="dali input_pipeline" LOADERS=auto does
# only that.
# What it measures: the CUDA graphs of the detectors, the greedy walk and the SaliencyMix /
# Guided-SR plans, and the Triton kernels (tests: graph == eager, kernels == tensor ops, no host
# sync; aug_overhead: overhead_mix with graphs and kernels, overhead_mix_eager without graphs,
# overhead_mix_tensor_ops without kernels, same rounds; single synchronised calls and 16 calls
# per sync);
# loader=nvjpeg (test: nvjpeg + fp16 resampling vs the CPU path; decode_resample: nvjpeg batch
# decode, batched vs per-image resampling); where each mixer's time goes (mixer_profile: host
# vs kernel time, kernels per call); the engine epoch with the torch loader (uint8 workers,
# colour on the GPU) and with loader=nvjpeg against one step baseline (input_pipeline, 4
# batches per worker); which stage caps each loader (loader_stages, worker_transform,
# worker_overhead).
# CPU dry run (small settings): DEVICE=cpu AUG_ARGS="--quick --models r18" \
#   PIPE_ARGS="--arch resnet18 --size 64 --images 48 --batch 8 --workers 1 --steps 2" \
#   STAGE_ARGS="--batch 8 --workers 1 --images 64 --size 64" OVER_ARGS="--workers 1 --images 64" \
#   DEC_ARGS="--batch 8 --repeats 1" PROF_ARGS="--calls 3" PERS_ARGS="--workers 1 --images 32 \
#   --batch 8 --epochs 2" OUT=/tmp/r2 bash gpu_checks/issue14.sh
set -u
export PY=${PYTHON:-python3} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
AUG_ARGS=${AUG_ARGS:---models r18,r50 --r18-repeats 8 --r50-repeats 4 --mix-repeats 15}
PIPE_ARGS=${PIPE_ARGS:---batch 256 --steps 12}  # 4 batches per worker: 15,360 images
DEC_ARGS=${DEC_ARGS:---batch 256 --repeats 5}
PROF_ARGS=${PROF_ARGS:---calls 30}
PERS_ARGS=${PERS_ARGS:---workers 15 --images 1024 --batch 128 --size 224 --epochs 4}
STAGE_ARGS=${STAGE_ARGS:---batch 256}  # 2 batches per worker: 7,680 images
OVER_ARGS=${OVER_ARGS:---workers 15 --images 4096}
KERNEL_ARGS=${KERNEL_ARGS:-}  # default: walks of 64 and 256, detector 64x32, 32x224, 256x224
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
if ! $PY -c "import torch" 2>/dev/null; then  # else every step fails and the summary is empty
  echo "issue14.sh: $PY cannot import torch; set PYTHON (the GPU env: . /tmp/gpu-env)" >&2
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # benchmarks import each other
# DALI, where gpu_checks/dali_install.sh unpacked it (the device image has none): then
# loader=auto resolves to DALI, and the engine epoch is timed with it and with the torch loader
DALI_SITE=${DALI_SITE:-/tmp/dali-site}
if [[ -f $DALI_SITE/.complete ]]; then
  export PYTHONPATH=$PYTHONPATH:$DALI_SITE; LOADERS=${LOADERS:-auto,torch}
else
  LOADERS=${LOADERS:-auto,nvjpeg}
fi
T0=$(date +%s)
BUDGET=${BUDGET:-545}  # seconds for all steps; a step gets at most what is left of it
STEPS=${STEPS:-}  # e.g. "tests aug_overhead": only those steps (default: all)
step() {  # step NAME SECONDS CMD...: the log in $OUT/NAME.log, its JSON lines echoed
  local name=$1 secs=$2; shift 2
  if [[ -n $STEPS && " $STEPS " != *" $name "* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 15 )); then echo "== $name skipped: ${left}s of the budget left"; return; fi
  (( secs > left )) && secs=$left
  echo "== $name (timeout ${secs}s, t=$(( $(date +%s) - T0 ))s)"
  timeout --kill-after=5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$?"; grep -h '^{' "$OUT/$name.log" | cut -c1-600; tail -n 3 "$OUT/$name.log"
}
# Most important first (what a step that runs out of budget loses is the least needed): goals 1
# and 3 were measured as met on an H200 (0.9075, 0.990); goal 2 (aug_overhead) is what is open.
# The tests step includes Triton's first compiles (each kernel's first-use check compiles its
# specialisations, ~70 in all; later steps find them in Triton's on-disk cache).
# graph == eager (detectors, greedy walk, mixer plans), every mixer under sync_debug "error",
# the Triton kernels (walk, both detectors', boxes and paste, blend) against their tensor ops,
# nvjpeg decode + fp16 resampling against the CPU path
step tests 180 $PY -m pytest -q -rs -p no:cacheprovider tests/test_mixers_nosync.py \
  tests/test_graphs.py tests/test_greedy_triton.py tests/test_saliency_triton.py \
  tests/test_boxes_triton.py tests/test_guided_triton.py tests/test_loader_nvjpeg.py \
  tests/test_saliency.py -k cuda
# DALI's GPU operators against its CPU ones (crop distribution, eval and resize pixels), where
# gpu_checks/dali_install.sh unpacked DALI
[[ -f $DALI_SITE/.complete ]] && step dali 60 $PY -m pytest -q -rs -p no:cacheprovider \
  tests/test_loader_dali.py
# the Triton kernels (greedy walk, fine-grained and spectral-residual detectors, boxes + paste,
# mask + blend) against tensor ops
step triton_kernels 75 $PY benchmarks/triton_kernels.py --device "$DEVICE" $KERNEL_ARGS
step aug_overhead 170 $PY benchmarks/aug_overhead.py --device "$DEVICE" $AUG_ARGS
step mixer_profile 40 $PY benchmarks/mixer_profile.py --device "$DEVICE" $PROF_ARGS
step input_pipeline 170 $PY benchmarks/input_pipeline.py --device "$DEVICE" --loader "$LOADERS" \
  $PIPE_ARGS --methods none,saliencymix --data /tmp/jpeg
# which stage caps the torch loader (IPC, decode, pinning, device finish), and nvjpeg's
step loader_stages 75 $PY benchmarks/loader_stages.py --device "$DEVICE" --loader torch,nvjpeg \
  $STAGE_ARGS --data /tmp/jpeg
step decode_resample 40 $PY benchmarks/decode_resample.py --device "$DEVICE" $DEC_ARGS
step worker_transform 25 $PY benchmarks/worker_transform.py --images 64
step worker_overhead 55 $PY benchmarks/worker_overhead.py $OVER_ARGS
step persistent_workers 45 $PY benchmarks/persistent_workers.py --device "$DEVICE" $PERS_ARGS
# can this machine torch.compile for CUDA (Triton builds its launcher with a C compiler)? The
# next lever on the detectors' ~100 tiny kernels per call, if mixer_profile says kernels dominate
step compile_probe 45 $PY -c "import time, torch; t = time.time(); \
f = torch.compile(lambda x: (x.sin() * 2 + 1).relu().sum(-1)); \
x = torch.randn(64, 1024, device='$DEVICE'); torch.testing.assert_close(f(x), (x.sin() * 2 + 1).relu().sum(-1)); \
print('{\"benchmark\": \"compile_probe\", \"ok\": true, \"compile_s\": %.1f}' % (time.time() - t))"
$PY - "$OUT" <<'PY' | tee "$OUT/goals.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def lines(name):
    p = out / f"{name}.log"
    text = p.read_text(errors="replace").splitlines() if p.exists() else []
    return [json.loads(l) for l in text if l.startswith("{")]
goals = {"cutmix": 0.03, "saliencymix-sample": 0.03, "guided-sr-greedy": 0.05}
for name, title in (("tests", "GPU tests"), ("dali", "DALI GPU tests")):
    log = out / f"{name}.log"
    if log.exists():
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-3:]
        print(f"{title}:", " | ".join(tail))
print("Issue 14 goals:")
for r in lines("aug_overhead"):
    if r["method"] in goals or "overhead_mix_eager" in r:
        limit = goals.get(r["method"]) if r["device"] == "cuda" else None  # goals: a GPU's
        verdict = "    " if limit is None else ("MET " if r["overhead_mix"] <= limit else "MISS")
        piped = r.get("overhead_mix_pipelined")
        pverdict = "" if limit is None or piped is None else (" MET" if piped <= limit else " MISS")
        print(f"  {verdict} {r['model']} b{r['batch']} {r['method']}: overhead_mix "
              f"{r['overhead_mix']} (graphs off: {r.get('overhead_mix_eager')}; t_mix "
              f"{r['t_mix_s']} s, none step {r['t_none_s']} s) | {r.get('pipeline')} calls per "
              f"sync: overhead_mix {piped}{pverdict}, full step {r.get('overhead_pipelined')} "
              f"| apply(sample()): {r.get('overhead_mix_two_pass')}, "
              f"{r.get('overhead_mix_two_pass_pipelined')} | Triton off: "
              f"{r.get('overhead_mix_tensor_ops')}, {r.get('overhead_mix_tensor_ops_pipelined')}"
              f" [{r['device_name']}]")
for r in lines("triton_kernels"):
    if not r["kernel_ran"]:
        print(f"  {r['case']}, {r['shape']}: the kernel did not run on {r['device_name']} "
              f"({r.get('note', 'see tests.log for its warning')}): no comparison")
        continue
    print(f"  {r['case']}, {r['shape']}: Triton {r['kernel_ms']} ms vs tensor ops "
          f"{r['tensor_ops_ms']} ms (x{r['speedup']}); {r['pipeline']} per sync: "
          f"{r['kernel_pipelined_ms']} vs {r['tensor_ops_pipelined_ms']} ms "
          f"(x{r['speedup_pipelined']}); kernel ran: {r['kernel_ran']} [{r['device_name']}]")
for r in lines("input_pipeline"):
    for key, limit in (("epoch_vs_step", 0.9), ("saliencymix_step_vs_none", 0.98)):
        v = r.get(key)
        verdict = ("    " if r["device"] != "cuda" else
                   "MET " if v is not None and v >= limit else "MISS")
        print(f"  {verdict} {key} >= {limit}: {v}"
              f"  (loader {r['loader_img_s']} img/s, first batch {r.get('loader_first_batch_s')}"
              f" s, epoch {r['epoch_img_s']} of {r['images']} images, step none "
              f"{r.get('step_none_img_s')}; loader={r.get('loader_asked')} -> {r['loader']}, "
              f"colour on {r.get('colour_on')})"
              f" [{r['device_name']}]")
for r in lines("decode_resample"):
    print(f"  nvjpeg batch: decode {r['decode_img_s']} img/s, resample {r['resample_img_s']} "
          f"(per-image {r['per_image_img_s']}, x{r['resample_speedup']}), assemble "
          f"{r['assemble_img_s']} img/s [{r['device_name']}]")
for r in lines("persistent_workers"):
    print(f"  persistent workers: epoch {r['persistent_epoch_s']} s vs fresh {r['fresh_epoch_s']} s"
          f" (x{r['epoch_speedup']}; first batch {r['persistent_first_batch_s']} vs "
          f"{r['fresh_first_batch_s']} s) [{r['device_name']}]")
for r in lines("loader_stages"):
    stages = {k[:-6]: v for k, v in r.items() if k.endswith("_img_s")}
    print(f"  loader {r['loader']} stages (img/s, {r['workers']} workers): {stages}")
for r in lines("worker_transform"):
    print(f"  one worker: {r['uint8_half_ms_per_image']} ms/image for decode+crop+flip on tensors"
          f" (PIL: {r['uint8_half_pil_ms_per_image']}, x{r['speedup_vs_pil_half']}; decode "
          f"{r['decode_ms_per_image']}) -> 15 such: {round(15000 / r['uint8_half_ms_per_image'])}"
          f" img/s at most")
for r in lines("worker_overhead"):
    print(f"  workers, {r['workers']} of them: bookkeeping on blanks {r['blank_old_img_s']} -> "
          f"{r['blank_new_img_s']} img/s (x{r['blank_speedup']}); reader PIL -> tensors "
          f"{r['reader_old_img_s']} -> {r['reader_new_img_s']} img/s (x{r['reader_speedup']}); "
          f"all {r['all_old_img_s']} -> {r['all_new_img_s']} img/s (x{r['all_speedup']})")
for r in lines("compile_probe"):
    print(f"  torch.compile works here: compiled in {r['compile_s']} s")
for r in lines("mixer_profile"):
    print(f"  profile {r['method']}: wall {r['wall_ms_per_call']} ms, host {r['host_ms_per_call']}"
          f" ms, kernels {r['device_ms_per_call']} ms ({r['kernels_per_call']}/call, graphs "
          f"{r['graph_launches_per_call']}); top host {r['top_host_ms'][:3]}")
PY
echo "total $(( $(date +%s) - T0 ))s"
# one archive of the step logs beside goals.txt: a run returns only a few files from $OUT
(cd "$OUT" && tar -czf logs.tgz -- *.log && rm -f -- *.log)
