#!/usr/bin/env bash
# The lead's device call of 2026-12-06 (one call, ~10 minutes): issue 33's before/after check (TinyLlama 4 x 512
# both sides; Llama-3.1-8B 1 x 2048 under a 15 GiB cap before, and after beside Unsloth as issue 36's cap15-2048
# piece), then issue 36's T4-profile TinyLlama recipe against plain fp16 if time is left.
#   export PYTHONPATH=$PWD/.devsite:$PWD/src; bash measure/session_lead_2026-12-06.sh   (carry .devsite, .before)
set -u
OUT=${OUT:?}
bash measure/before_after.sh .before/src "$OUT" tinyllama "after before" 2>&1 | tee -a "$OUT/lead.log"
bash measure/before_after.sh .before/src "$OUT" llama3-8b "before" 2>&1 | tee -a "$OUT/lead.log"
DEADLINE=${DEADLINE:-330} bash measure/session_2026-12-06.sh cap15-2048 t4-tinyllama 2>&1 | tail -30
