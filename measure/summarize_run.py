"""tokens/s (median step after warm-up) and peak memory of a snugtune run directory, as JSON.

  python measure/summarize_run.py RUN_DIR [--skip 3]
"""

import json
import statistics
import sys
from pathlib import Path

from snugtune.rundir import read_jsonl

run = Path(sys.argv[1])
skip = int(sys.argv[sys.argv.index("--skip") + 1]) if "--skip" in sys.argv else 3
summary = json.loads((run / "summary.json").read_text())
rows = read_jsonl(run / "metrics.jsonl")
steps = [r for r in rows if "loss" in r][skip:]
print(json.dumps({"recipe": "snugtune", "model": summary["model"], "steps": summary["steps"],
                  "tokens_per_s_median_step": statistics.median(r["tokens_per_s"] for r in steps),
                  "peak_allocated_bytes": summary.get("peak_allocated_bytes"),
                  "peak_reserved_bytes": summary["peak_memory_bytes"], "eval_loss_before": summary["eval_loss_before"],
                  "eval_loss_after": summary["eval_loss_after"], "train_loss_final": summary["train_loss_final"],
                  "device": summary["device"], "versions": summary["versions"]}, indent=2))
