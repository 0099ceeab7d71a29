"""Print the planner's plan for 960 configurations as JSON, to compare two versions of the code:

    PYTHONPATH=OLD/src python measure/planner_same_plans.py > old.json
    PYTHONPATH=src     python measure/planner_same_plans.py > new.json
    cmp old.json new.json

4 shapes x 5 methods x 2 lengths x 2 micro-batches x 2 checkpointing settings x 2 dropouts x 3 budgets;
each plan's fit, peak, settings, breakdown, suggestion and accumulation. No GPU, no model weights.
"""

import itertools
import json
import sys
from dataclasses import asdict

from snugtune.config import config_from_dict
from snugtune.planner.choose import plan_for_budget

GIB = 2**30
rows = []
for shape, method, seq, mb, ckpt, dropout, budget in itertools.product(
        ["tinyllama-1.1b", "llama3-8b", "phi-2", "mistral-7b"], ["lora", "qlora", "lora-8bit", "freeze", "full"],
        [512, 4096], [1, 4], [True, "auto"], [0.0, 0.05], [10, 15, 80]):
    raw = {"model": f"shape:{shape}", "data": {"path": "x.jsonl"}, "method": method, "max_seq_len": seq,
           "lora": {"dropout": dropout}, "train": {"micro_batch": mb, "grad_checkpointing": ckpt}}
    plan = plan_for_budget(config_from_dict(raw), budget * GIB, host_available=64 * GIB)  # fixed: comparable anywhere
    rows.append({"key": [shape, method, seq, mb, ckpt, dropout, budget], "fits": plan.fits, "peak": plan.peak_bytes,
                 "settings": asdict(plan.decisions), "breakdown": {part.label: size for part, size in plan.breakdown.items()}, "suggestion": plan.suggestion,
                 "accum": plan.grad_accum})
json.dump(rows, sys.stdout, default=str)
