#!/usr/bin/env bash
# NVIDIA DALI for the GPU machine, which has none and takes at most 64 MiB per call (working
# tree and carried paths together): DALI 2.4 for CUDA 13 (the device's torch is cu130) with
# nvImageCodec, nvjpeg and its pure-Python dependencies, installed for CPython 3.12 into one
# tree (543 MB), xz-compressed (149 MiB) and cut into parts of PART_MB MiB (default 58: with .gpu and the
# checkout, ~65 MB a call) under .dali/ (git-ignored), with .dali/parts.sha256.
#   bash gpu_checks/dali_bundle.sh            # here, on the CPU machine (~3 min, 2 cores)
# Then, on a device machine kept warm (it goes back after ~30 s idle: issue the calls back to
# back), one call per part; each copies its part to /tmp/dali-parts there, and the call that
# completes the set unpacks it to /tmp/dali-site (`gpu_checks/dali_install.sh`); then an
# issue14.sh call (its 545 s leave no room for the unpacking), which finds /tmp/dali-site and
# then also tests DALI's GPU operators (step dali) and times loader=auto (-> DALI). After the
# usual full issue14.sh run, with >= 4 min of device time left:
#   run(command="bash gpu_checks/dali_install.sh", carry=[".dali/parts.sha256", ".dali/part.aa"])
#   run(command="bash gpu_checks/dali_install.sh", carry=[".dali/parts.sha256", ".dali/part.ab"])
#   run(command="bash gpu_checks/dali_install.sh", carry=[".dali/parts.sha256", ".dali/part.ac"])
#   run(command="bash .gpu/env.sh && . /tmp/gpu-env && STEPS='dali input_pipeline' \
#       LOADERS=auto bash gpu_checks/issue14.sh", carry=[".gpu"], timeout_s=300)
# libnvcomp (only dlopen'ed, for compressed TIFF/numpy data) and DALI's bindings for other
# Pythons are left out.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.dali/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.dali/' >> .git/info/exclude; }
py=${PYTHON:-python3}
PART_MB=${PART_MB:-58}
PYV=${PYV:-3.12}  # the device's Python (another, e.g. 3.11, to rehearse here on DALI's CPU ops)
cp=cp${PYV/./}
plat="--only-binary=:all: --python-version $PYV --implementation cp --abi $cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# packaging and numpy are on the GPU image already (six, which astunparse needs, may not be)
$py -m pip install -q --no-deps --no-compile $plat --target "$work/site" \
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 \
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0 six==1.17.0 \
  2>&1 | grep -v "^WARNING: Location" || true
test -f "$work/site/nvidia/dali/backend_impl.cpython-${cp#cp}-x86_64-linux-gnu.so"
find "$work/site" -name '*.cpython-*.so' ! -name "*.cpython-${cp#cp}-*" -delete  # other Pythons' bindings
rm -rf "$work/site/bin"
rm -rf .dali && mkdir -p .dali
tar -C "$work/site" -cf - . | xz -6 -T0 | split -b "${PART_MB}M" - .dali/part.
(cd .dali && sha256sum part.* > parts.sha256)
du -sh "$work/site" .dali/part.*
echo "carry one of these per call, with .dali/parts.sha256:"; ls .dali/part.*
