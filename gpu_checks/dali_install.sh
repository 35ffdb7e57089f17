#!/usr/bin/env bash
# On the GPU machine: keep the DALI parts this call carried (.dali/part.*, made by
# gpu_checks/dali_bundle.sh) in $PARTS (/tmp/dali-parts, which outlives the call while the
# machine stays warm); once every part of .dali/parts.sha256 is there and intact, unpack them to
# $SITE (/tmp/dali-site) and import DALI from it. Exit 0 while parts are still missing (the next
# call brings them) or when DALI is installed; 1 on a corrupt part or a failed import.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
PARTS=${PARTS:-/tmp/dali-parts} SITE=${SITE:-/tmp/dali-site}
if [[ -f $SITE/.complete ]]; then echo "dali: already installed in $SITE"; exit 0; fi
mkdir -p "$PARTS"
[[ -f .dali/parts.sha256 ]] || { echo "dali: no .dali/parts.sha256 carried"; exit 1; }
cp .dali/parts.sha256 "$PARTS/"
for part in .dali/part.*; do
  if [[ -f $part ]]; then cp "$part" "$PARTS/"; fi
done
missing=$(cd "$PARTS" && awk '{print $2}' parts.sha256 | while read -r p; do [[ -f $p ]] || echo "$p"; done)
if [[ -n $missing ]]; then
  echo "dali: have $(cd "$PARTS" && ls part.* 2>/dev/null | tr '\n' ' '); still missing:" $missing
  exit 0
fi
(cd "$PARTS" && sha256sum --quiet -c parts.sha256) || { echo "dali: a part is corrupt"; exit 1; }
rm -rf "$SITE" && mkdir -p "$SITE"
(cd "$PARTS" && cat $(awk '{print $2}' parts.sha256)) | xz -dc | tar -C "$SITE" -xf -
PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} ${PYTHON:-python3} -c "import nvidia.dali as d; \
from nvidia.dali.plugin.pytorch import DALIGenericIterator; print('dali: installed', d.__version__)"
touch "$SITE/.complete"
