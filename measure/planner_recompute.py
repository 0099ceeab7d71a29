"""Today's planner on a recorded grid: each row's prediction recomputed from the Decisions and model shape it
recorded, beside the prediction the run logged and what it measured (which the planner does not change).

  python measure/planner_recompute.py OUT_DIR/grid.jsonl [--changed-only]

A restructure that leaves predictions unchanged prints "same" on every row; a changed term shows where.
Rows that replayed CUDA graphs also show the pool share (memory.GRAPH_POOL_FRACTION) that would have
predicted them exactly: what the one-point fit of that constant is to be checked against.
"""

import json
import sys

from snugtune.config import config_from_dict
from snugtune.planner.cards import GIB
from snugtune.planner.inventory import inventory_for
from snugtune.planner.memory import GRAPH_POOL_FRACTION, Part, Decisions, estimate, peak


def recomputed(row: dict, inventories: dict) -> dict:
    """The breakdown today's planner gives the row's recorded settings."""
    if row["model"] not in inventories:
        cfg = config_from_dict({"model": f"shape:{row['model']}", "data": {"path": "unused"}})
        inventories[row["model"]] = inventory_for(cfg)
    settings = Decisions(**{**row["settings"], "lora_targets": tuple(row["settings"]["lora_targets"])})
    return estimate(inventories[row["model"]], settings)


def pool_share_that_fits(parts: dict, measured: int) -> str:
    """The graph-pool share of the working memory that would have predicted `measured` exactly."""
    pool = parts.get(Part.GRAPH_POOL, 0)
    if not pool:
        return ""
    working = pool / GRAPH_POOL_FRACTION
    return f" pool share that fits {(measured - (peak(parts) - pool)) / working:.2f}"


def main() -> None:
    inventories: dict = {}
    changed_only = "--changed-only" in sys.argv
    for line in open(sys.argv[1]):
        row = json.loads(line)
        if "settings" not in row:
            continue
        parts = recomputed(row, inventories)
        now = peak(parts)
        same = now == row["predicted_peak"]
        if changed_only and same:
            continue
        s = row["settings"]
        print(f"{row['kind']:6s} {row['model']:30s} {s['method']:9s} {s['max_seq_len']:6d}x{s['micro_batch']} "
              f"logged {row['predicted_peak'] / GIB:6.2f} now {now / GIB:6.2f} "
              f"measured {row['measured_peak'] / GIB:6.2f} GiB error now {now / row['measured_peak'] - 1:+.1%} "
              + ("same" if same else "CHANGED") + pool_share_that_fits(parts, row["measured_peak"]))


if __name__ == "__main__":
    main()
