#!/usr/bin/env bash
# Where a DPO step of `snugtune bench --objective dpo` spends its time: the bench's own config (one pair of
# 1,024-token sequences, QLoRA r 16, 15 GiB cap, checkpointing on) trained by `snugtune train` with
# torch.profiler around step 6 (measure/train_step_profile.py).
#   OUT=DIR bash measure/dpo_profile.sh SHAPE [SHAPE ...]     (e.g. tinyllama-1.1b llama3-8b)
# Out: $OUT/dpo_profile_SHAPE.txt
set -u
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
for shape in "$@"; do
  work=$(mktemp -d /tmp/dpo-profile-XXXX)
  $PY - "$shape" "$work" <<'PYEOF'
import sys
from pathlib import Path
import yaml
from snugtune.bench.compare import bench_config, long_pairs
shape, work = sys.argv[1], Path(sys.argv[2])
config = bench_config(shape, 1024, 1, 8, 15, "auto", None, long_pairs(work / "pairs", 1024))
(work / "dpo.yaml").write_text(yaml.safe_dump(config))
PYEOF
  $PY measure/train_step_profile.py "$OUT/dpo_profile_$shape.txt" 6 "$work/dpo.yaml" "output_dir=$work/run" 2>&1 | tail -3
done
