#!/usr/bin/env bash
# Issue 36 on one GPU, in one device call: the T4 profile of the shipped recipes against the plain recipe,
# snugtune beside Unsloth under a real 15 GiB cap at four lengths (bench protocol, 10 steps, MFU printed),
# and a reduced step-time grid with the planner's runner-up. Pieces run in the order given, each under its own
# timeout, and none starts unless its estimate fits before the deadline; results land in $OUT as they finish.
#
#   measure/session_2026-12-06.sh [PIECE ...]   (default: all, in this order)
#     t4-check                           measure/fast_path_check.py on a T4's path: fp16, sm75 kernels, against
#                                        plain fp16 and fp32 (loss and LoRA gradients on one batch)
#     t4-tinyllama t4-llama2             the recipes as shipped, --emulate t4, against plain fp16
#     cap15-2048 cap15-4096              packed rows, --cap 15, against Unsloth (grad_checkpointing: auto)
#     cap15-16384 cap15-28672            one document a row, --cap 15, against Unsloth
#     grid                               measure/step_time_grid.py until the deadline
#     t4-llama2-auto                     (not in the default list) the Llama-2-7B recipe with
#                                        grad_checkpointing: auto in place of its true, against plain fp16
#     t4-llama2-profile                  (not in the default list) where one step of the Llama-2-7B recipe goes,
#                                        --emulate t4 (measure/train_step_profile.py, step 7 of 10)
#     t4-orpo-8b t4-dpo-tinyllama        (not in the default list) issue 38's two preference recipes as shipped,
#                                        --emulate t4, snugtune alone (no peer benches ORPO; TRL and Unsloth DPO
#                                        are benched on the 8B's pairs elsewhere)
#     partial                            (not in the default list) 2048 with 26 of 32 blocks recomputed, under
#                                        the 15 GiB cap and under a 30 GiB one: is the allocator under the cap
#                                        why partial checkpointing ran slower than full?
#   DEADLINE=560 (seconds from the start; no piece starts past it)  SMOKE=1: every piece on shape:tiny, 2 steps,
#   the CPU (the check that the GPU call cannot die of a typo; tests/bench/test_session_script.py runs it)
#
# On the GPU machine: carry .devsite (../shared/tools/device-site.sh --unsloth) and run
#   export PYTHONPATH=$PWD/.devsite:$PWD/src; bash measure/session_2026-12-06.sh
# Out (8 files at most come back): session.log (everything), bench.jsonl (one bench JSON a line, its piece
# named), step_time_grid.jsonl, summary.txt (each piece's table).
set -u
OUT=${OUT:?set OUT to the folder results go to}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."  # the repository: the recipes and measure/ are read from here
DEADLINE=${DEADLINE:-560}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
WORK=$(mktemp -d /tmp/session-XXXX)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PIECES=("$@")
[ ${#PIECES[@]} -gt 0 ] || PIECES=(t4-check t4-tinyllama cap15-2048 cap15-4096 cap15-16384 cap15-28672 t4-llama2 grid)

log() { echo "$*" | tee -a "$OUT/session.log"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# bench NAME ESTIMATE_S ARGS...: one `snugtune bench` (SMOKE: shape tiny, short rows, 2 steps, the CPU)
bench() {
  local name=$1 estimate=$2; shift 2
  local args=("$@")
  if [ "$SMOKE" = 1 ]; then
    local given=("${args[@]}") a; args=()
    for a in "${given[@]}"; do case $a in tinyllama-1.1b|llama2-7b|llama3-8b) args+=(tiny) ;; *) args+=("$a") ;; esac; done
    args+=(--steps 2 --device cpu --set train.optimizer=adamw_8bit)  # paged optimizers need a GPU
    # a recipe's rows (512 tokens) short too, as seq_of cuts the others: fp16 on the CPU, 90 s instead of 45 s
    case " ${given[*]} " in *" --recipe "*) args+=(--set max_seq_len=128) ;; esac
    estimate=0
  fi
  if [ "$(left)" -lt "$estimate" ]; then
    log "## $name: skipped ($(left) s left, about $estimate s needed)"; return
  fi
  log "## $name: snugtune bench ${args[*]}"
  local budget=$(( $(left) > 60 ? $(left) + 30 : 90 ))
  timeout "$budget" $PY -m snugtune bench "${args[@]}" --json "$WORK/$name.json" 2>&1 | tee -a "$OUT/session.log" \
    | sed -n '/^| stack/,$p' >> "$WORK/$name.table"
  if [ -s "$WORK/$name.json" ]; then
    $PY -c "import json,sys; print(json.dumps({'piece': sys.argv[1], **json.load(open(sys.argv[2]))}))" \
      "$name" "$WORK/$name.json" >> "$OUT/bench.jsonl"
    { echo "## $name"; cat "$WORK/$name.table"; echo; } >> "$OUT/summary.txt"
  else
    log "## $name: no result (see session.log)"
  fi
}

# check ESTIMATE_S: the fast path against plain on a T4's path (SMOKE: shape tiny on the CPU, fp16 autocast)
check() {
  local estimate=$1 args=(--shape tinyllama-1.1b --seq 512)
  [ "$SMOKE" = 1 ] && { args=(--shape tiny --seq 128 --bf16); estimate=0; }
  if [ "$(left)" -lt "$estimate" ]; then log "## t4-check: skipped ($(left) s left)"; return; fi
  log "## t4-check: measure/fast_path_check.py ${args[*]} --set train.precision=fp16 --set train.attention_kernels=sm75"
  { echo "## t4-check"; timeout "$(( $(left) + 30 ))" $PY measure/fast_path_check.py "${args[@]}" \
      --set train.precision=fp16 --set train.attention_kernels=sm75 2>&1 | tee -a "$OUT/session.log" | tail -n 4
    echo "exit ${PIPESTATUS[0]}"; echo; } >> "$OUT/summary.txt"
}

# profile NAME ESTIMATE_S RECIPE SHAPE: one step of a recipe as the bench runs it (--emulate t4) under torch.profiler
# (SMOKE: shape tiny, 3 steps, the second profiled, the CPU)
profile() {
  local name=$1 estimate=$2 recipe=$3 shape=$4 steps=10 at=7 extra=()
  [ "$SMOKE" = 1 ] && { shape=tiny; steps=3; at=2; estimate=0; extra=(device=cpu max_seq_len=128 train.optimizer=adamw_8bit); }
  if [ "$(left)" -lt "$estimate" ]; then log "## $name: skipped ($(left) s left, about $estimate s needed)"; return; fi
  log "## $name: measure/train_step_profile.py, step $at of $recipe on shape:$shape, --emulate t4"
  $PY -c "import sys, yaml; from pathlib import Path; from snugtune.bench.compare import emulated, recipe_config
yaml.safe_dump(recipe_config(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), 'auto', emulated('t4', ())),
               open(sys.argv[4], 'w'))" "$recipe" "$shape" "$steps" "$WORK/$name.yaml"
  { echo "## $name"; timeout "$(( $(left) > 60 ? $(left) + 30 : 90 ))" $PY measure/train_step_profile.py \
      "$OUT/$name.txt" "$at" "$WORK/$name.yaml" output_dir="$WORK/$name-run" "${extra[@]}" 2>&1 \
      | tee -a "$OUT/session.log" | tail -n 3
    echo "exit ${PIPESTATUS[0]}"; head -n 2 "$OUT/$name.txt" 2>/dev/null; echo; } >> "$OUT/summary.txt"
}

seq_of() { [ "$SMOKE" = 1 ] && echo $(( $1 < 128 ? $1 : 128 )) || echo "$1"; }

log "# session $(date -u +%FT%TZ) pieces: ${PIECES[*]} deadline ${DEADLINE}s smoke=$SMOKE"
[ "$SMOKE" = 1 ] || nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv 2>&1 | tee -a "$OUT/session.log"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$OUT/session.log"

for piece in "${PIECES[@]}"; do
  case $piece in
    t4-check) check 90 ;;
    t4-tinyllama) bench "$piece" 100 --shape tinyllama-1.1b --recipe examples/tinyllama-1.1b_qlora_t4.yaml \
                    --emulate t4 --steps 20 --against plain ;;
    t4-llama2) bench "$piece" 150 --shape llama2-7b --recipe examples/llama2-7b_qlora_t4.yaml --emulate t4 \
                 --steps 10 --against plain ;;
    t4-llama2-auto) bench "$piece" 150 --shape llama2-7b --recipe examples/llama2-7b_qlora_t4.yaml --emulate t4 \
                      --steps 10 --against plain --set train.grad_checkpointing=auto ;;
    t4-llama2-profile) profile "$piece" 150 examples/llama2-7b_qlora_t4.yaml llama2-7b ;;
    t4-orpo-8b) bench "$piece" 200 --shape llama3-8b --recipe examples/llama3-8b_qlora-orpo_t4.yaml --emulate t4 \
                  --steps 6 --against "" ;;
    t4-dpo-tinyllama) bench "$piece" 120 --shape tinyllama-1.1b --recipe examples/tinyllama-1.1b_qlora-dpo_t4.yaml \
                        --emulate t4 --steps 10 --against "" ;;
    cap15-2048|cap15-4096)
      bench "$piece" 120 --shape llama3-8b --seq "$(seq_of "${piece#cap15-}")" --cap 15 --steps 10 \
        --against unsloth --set train.grad_checkpointing=auto ;;
    cap15-16384|cap15-28672)
      bench "$piece" 200 --shape llama3-8b --seq "$(seq_of "${piece#cap15-}")" --one-document --cap 15 \
        --steps 10 --against unsloth --set train.grad_checkpointing=auto ;;
    grid)
      if [ "$SMOKE" = 1 ]; then extra=(--smoke --only "tinyllama 512x4 t4"); else extra=(--deadline "$(( $(left) - 60 ))"); fi
      if [ "$SMOKE" != 1 ] && [ "$(left)" -lt 120 ]; then log "## grid: skipped ($(left) s left)"; continue; fi
      log "## grid: measure/step_time_grid.py ${extra[*]}"
      timeout "$(( $(left) > 60 ? $(left) + 30 : 90 ))" $PY measure/step_time_grid.py "$WORK/grid" "${extra[@]}" 2>&1 \
        | tee -a "$OUT/session.log"
      [ -s "$WORK/grid/step_time_grid.jsonl" ] && cp "$WORK/grid/step_time_grid.jsonl" "$OUT/"
      { echo "## grid"; cat "$WORK/grid/report.txt" 2>/dev/null; echo; } >> "$OUT/summary.txt" ;;
    partial)
      for cap in 15 30; do
        bench "partial-cap$cap" 100 --shape llama3-8b --seq "$(seq_of 2048)" --cap "$cap" --steps 10 --against "" \
          --set train.grad_checkpointing=true --set train.checkpoint_layers=26 --set quant.dense_copy=false
      done ;;
    *) log "## $piece: unknown piece" ;;
  esac
done
log "# done in $(( $(date +%s) - START )) s"
cat "$OUT/summary.txt" 2>/dev/null
