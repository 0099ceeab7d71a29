#!/usr/bin/env bash
# A DPO run through CUDA graphs beside the same run eager, on the GPU: the shipped stdlib pairs (lengths vary, so
# micro-batches come in many shapes: captured, replayed, and past max_graphs eager beside the pool), shape
# smollm2-135m with random weights, 40 steps (about 90 s a run on an H100, compilation included). Prints
# each run's graph record and the two runs' per-step losses. Ran once (2026-12-07): the graphs run finished, the
# call's time limit cut the eager one.
#   OUT=DIR bash measure/dpo_graphs_check.sh
set -u
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
for graphs in true false; do
  cat > "$OUT/dpo_graphs_$graphs.yaml" <<YAML
model: shape:smollm2-135m
data: {path: $PWD/src/snugtune/bundled/stdlib_pairs.jsonl, format: preference, eval_fraction: 0.1, too_long: drop}
max_seq_len: 192
method: lora
objective: dpo
lora: {r: 16, alpha: 32, dropout: 0.0, targets: all-linear}
train: {max_steps: 40, micro_batch: 2, grad_accum: 2, lr: 1.0e-3, optimizer: adamw, grad_checkpointing: false,
        cuda_graphs: $graphs, seed: 0, warmup: 0, scheduler: constant}
save: {every_steps: 1000}
eval: {max_batches: 2}
output_dir: $OUT/run_$graphs
YAML
  $PY -m snugtune train "$OUT/dpo_graphs_$graphs.yaml" --quiet --fresh 2>&1 | tail -3
  # at once, so that a call cut short still tells what the graphs did
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print('cuda_graphs:', s.get('cuda_graphs'))" \
    "$OUT/run_$graphs/summary.json"
  rm -rf "$OUT/run_$graphs/checkpoints" "$OUT/run_$graphs"/*.safetensors  # too big to come back
done
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for g in ("true", "false"):
    summary = json.loads((out / f"run_{g}" / "summary.json").read_text())
    print(g, "cuda_graphs:", summary.get("cuda_graphs"), "peak_reserved:", summary.get("peak_reserved_bytes"))
    runs[g] = [json.loads(l) for l in (out / f"run_{g}" / "metrics.jsonl").read_text().splitlines()]
steps = {g: {r["step"]: r for r in rows if "loss" in r} for g, rows in runs.items()}
worst = 0.0
for step in sorted(steps["true"]):
    a, b = steps["true"][step], steps["false"].get(step)
    if b:
        worst = max(worst, abs(a["loss"] - b["loss"]))
        print(step, round(a["loss"], 5), round(b["loss"], 5), a.get("rewards/accuracies"), b.get("rewards/accuracies"))
print("largest per-step loss difference, graphs vs eager:", worst)
PYEOF
