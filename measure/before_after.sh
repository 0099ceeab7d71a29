#!/usr/bin/env bash
# A restructure's GPU check: `snugtune bench` on the code before it (BEFORE: the src folder of the older tree)
# and on this tree, one after the other on one warm machine, TinyLlama 4 x 512 and Llama-3.1-8B 1 x 2048 under a
# 15 GiB cap, snugtune alone (the stacks compared against are the same code either side).
#   bash measure/before_after.sh BEFORE_SRC OUT_DIR [tinyllama|llama3-8b|both] [SIDES, default "after before"]
set -euo pipefail
before=$(cd "$1" && pwd); out=$2; which=${3:-both}; sides=${4:-after before}; here=$(pwd)
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
site=$here/.devsite
PYTHONPATH=$site:$here/src python3 -c "from snugtune.models.resolve import resolve_model as r; r('shape:tinyllama-1.1b'); r('shape:llama3-8b')"
for side in $sides; do
  src=$here/src; [ "$side" = before ] && src=$before
  if [ "$which" != llama3-8b ]; then
    PYTHONPATH=$site:$src python3 -m snugtune bench --shape tinyllama-1.1b --seq 512 --batch 4 --steps 20 \
      --against "" --json "$out/tinyllama_4x512_$side.json" 2>&1 | tail -4
  fi
  if [ "$which" != tinyllama ]; then
    PYTHONPATH=$site:$src python3 -m snugtune bench --shape llama3-8b --seq 2048 --cap 15 --steps 10 \
      --against "" --json "$out/llama3-8b_1x2048_cap15_$side.json" 2>&1 | tail -4
  fi
done
