"""Today's planner on every GPU grid row recorded in docs/runs/: each row's peak recomputed from the settings it
ran with (its Decisions, and the model's registry shape as an Inventory built without weights), beside what
it measured, so a change to planner/memory.py shows row by row which recorded runs it brings in or pushes out.

  python measure/planner_recorded.py                       # today's prediction against every measurement
  python measure/planner_recorded.py --before OLD_CHECKOUT  # and the prediction of another checkout's planner

Measured = torch's reserved peak + the CUDA context, as the design's target counts it. How each grid's rows
become Decisions:
- preference_grid_{h100,h200}_2026-12-06.jsonl (issue 38): the Decisions `train` recorded. The context is the
  one measured alone on the H100 call (718,077,952 bytes) for both: the H200 call shared its GPU with another
  process, so its context line and nvidia-smi figure are wrong.
- planner_grid_h200_2026-11-30.jsonl: the Decisions recorded, less the fields added since, set as the engine
  of that day ran (memory_rules of commit f6053cd): blocks compiled on the GPU unless weights were streamed,
  activations offloaded or the MLP tiled; LoRA layers fused unless the base is 8-bit; no dense copy; sft.
- planner_grid_h100_v1.jsonl, _v2.jsonl (2026-11-24): no Decisions recorded; rebuilt from that grid's settings
  (docs/planner.md, "Accuracy on the H100"): LoRA r=16 on every linear layer, dropout 0.05, AdamW 8-bit, bf16,
  packed rows under an attention mask, eager blocks and peft's own LoRA layers (compiled blocks and fused
  layers came later), every position trained (the data's trained tokens were not recorded).
Their `budget` rows (recipes under a simulated card, planned by the planner of that day) record no settings
to rebuild them from and are left out.
- the `snugtune bench` and long-context records (docs/runs/*.json with the plan's settings, 2026-12-01 to
  12-06): the Decisions recorded, with compiled blocks, fused layers, the dense copy and CUDA graphs as the
  run's `speedups` and `cuda_graphs` say it ran them; the H100's context (the records hold none). Runs
  recorded under several names are listed once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from snugtune.config import config_from_dict
from snugtune.memory_rules import compiles_blocks, fuses_lora
from snugtune.methods import METHODS
from snugtune.planner.cards import GIB
from snugtune.planner.choose import tail_share
from snugtune.planner.inventory import inventory_for
from snugtune.planner.memory import estimate, peak
from snugtune.planner.plan import Decisions
from snugtune.registry import block_linear_names

RUNS = Path(__file__).resolve().parent.parent / "docs" / "runs"
H100_CONTEXT = 718_077_952  # device memory in use outside torch's allocator, measured alone (H100, CUDA 13)
PREFERENCE = ("preference_grid_h100_2026-12-06.jsonl", "preference_grid_h200_2026-12-06.jsonl",
              "preference_grid_h100_2026-12-07.jsonl")
SFT_RECORDED = "planner_grid_h200_2026-11-30.jsonl"
SFT_REBUILT = ("planner_grid_h100_v1.jsonl", "planner_grid_h100_v2.jsonl")
WITHIN, UNDER = 0.10, -0.03  # the design's target: within 10%, never more than 3% under


def _decisions(settings: dict) -> Decisions:
    known = {f.name for f in fields(Decisions)}
    return Decisions(**{k: (tuple(v) if k == "lora_targets" else v) for k, v in settings.items() if k in known})


def _as_of_2026_11_30(settings: dict, graphs: dict | None) -> dict:
    """The fields the 2026-11-30 grid did not record, as that day's engine set them; CUDA graphs off where the
    capture failed (the run went on eagerly, without the graphs' pool: its LLM.int8 rows)."""
    method = METHODS[settings["method"]]
    compiled = compiles_blocks("auto", True, settings["stream_weights"]) and not (
        settings["offload_activations"] or settings["tiled_mlp"])
    failed = bool(graphs and graphs["failure"])
    return {"compiled_blocks": compiled, "fused_lora": fuses_lora(method.adapters, method.base_bits), **settings,
            "cuda_graphs": settings["cuda_graphs"] and not failed}


def _as_of_2026_11_24(row: dict, model_type: str) -> dict:
    """The settings of the H100 grid of 2026-11-24 (v1, v2), which recorded none."""
    return {"method": row["method"], "lora_r": 16, "lora_targets": block_linear_names(model_type),
            "lora_last_layers": None, "double_quant": True, "optimizer": "adamw_8bit", "compute_bytes": 2,
            "micro_batch": row["micro_batch"], "max_seq_len": row["seq"], "grad_checkpointing": row["checkpointing"],
            "lora_dropout": 0.05, "attention_mask": True}


BENCH_TRAIN_PAIRS = 23  # bench.compare.long_pairs writes 24 pairs; eval_fraction 0.05 holds one out


def _as_the_run_went(record: dict) -> dict:
    """A bench or long-context record's settings, with the speedups it ran (older records lack the fields), and
    for a preference bench the share of a micro-batch its epochs' last one holds (recorded since 2026-12-07)."""
    ran, graphs, settings = record["speedups"], record.get("cuda_graphs") or {}, record["plan"]["settings"]
    tail = tail_share([0] * BENCH_TRAIN_PAIRS, settings["micro_batch"], 1) \
        if settings.get("objective", "sft") != "sft" else 0.0  # one process, the planner's own rule
    return {"tail_share": tail, **settings, "compiled_blocks": ran["compiled_blocks"] > 0,
            "fused_lora": ran["fused_lora_layers"] > 0, "dense_copy": ran.get("dense_copy_bytes", 0) > 0,
            "cuda_graphs": bool(graphs.get("shapes")) and not graphs.get("failure")}


def bench_rows() -> list[dict]:
    """The bench and long-context records that hold the plan's settings and the measured peak, once each."""
    rows, seen = [], set()
    for path in sorted(RUNS.glob("*.json")):
        record = json.loads(path.read_text())
        run = record.get("snugtune") if isinstance(record, dict) else None
        if not (isinstance(run, dict) and "settings" in run.get("plan", {}) and run.get("peak_reserved_bytes")):
            continue
        settings = _as_the_run_went(run)
        key = json.dumps([record["setting"]["shape"], settings, run["peak_reserved_bytes"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append({"grid": path.name, "kind": "run", "model": record["setting"]["shape"], "settings": settings,
                         "measured": run["peak_reserved_bytes"] + H100_CONTEXT})
    return rows


def recorded_rows() -> list[dict]:
    """Every grid row with a measurement: {grid, kind, model, settings, measured}."""
    rows = []
    for name in (*PREFERENCE, SFT_RECORDED, *SFT_REBUILT):
        for line in (RUNS / name).read_text().splitlines():
            row = json.loads(line)
            if "measured_allocated" not in row or row["kind"] == "budget":
                continue
            if name in PREFERENCE:
                settings, measured = row["settings"], row["measured_reserved"] + H100_CONTEXT
            elif name == SFT_RECORDED:
                settings, measured = _as_of_2026_11_30(row["settings"], row["cuda_graphs"]), row["measured_peak"]
            else:
                model_type = _inventory(row["model"]).model_type
                settings, measured = _as_of_2026_11_24(row, model_type), row["measured_peak"]
            rows.append({"grid": name, "kind": row["kind"], "model": row["model"], "settings": settings,
                         "measured": measured})
    return rows + bench_rows()


_INVENTORIES: dict = {}


def _inventory(shape: str):
    if shape not in _INVENTORIES:
        _INVENTORIES[shape] = inventory_for(config_from_dict({"model": f"shape:{shape}", "data": {"path": "-"}}))
    return _INVENTORIES[shape]


def predictions(rows: list[dict]) -> list[int]:
    return [peak(estimate(_inventory(r["model"]), _decisions(r["settings"]))) for r in rows]


def _before(checkout: str, count: int) -> list[int]:
    """The same rows' predictions by another checkout's planner (this script run with its sources)."""
    out = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(checkout).resolve() / "src")})
    before = json.loads(out.stdout)
    assert len(before) == count, "the two checkouts read different rows"
    return before


def describe(r: dict) -> list[str]:
    s = _decisions(r["settings"])
    ckpt = ("off" if not s.grad_checkpointing else "on" if s.checkpointed_layers is None
            else f"first {s.checkpointed_layers}")
    extra = [name for name, on in (("graphs", s.cuda_graphs), ("dense copy", s.dense_copy),
                                   ("host embeddings", s.embeddings_on_host), ("dropout", s.lora_dropout > 0),
                                   ("compiled", s.compiled_blocks)) if on]
    return [r["grid"].rsplit(".", 1)[0], r["model"] + (" (recipe)" if r["kind"] == "recipe" else ""), s.method,
            s.objective, f"{s.max_seq_len} × {s.micro_batch}", ckpt, ", ".join(extra) or "eager"]


def summary(errors: list[float]) -> str:
    inside = sum(UNDER <= e <= WITHIN for e in errors)
    under = sum(e < UNDER for e in errors)
    return (f"{inside} of {len(errors)} within -3%..+10%, {under} more than 3% under, "
            f"worst {min(errors):+.1%} / {max(errors):+.1%}")


def _group(row: dict) -> str:
    if row["grid"] in PREFERENCE:
        return "preference grid rows (issue 38)"
    return "bench and long-context runs" if row["kind"] == "run" else "SFT grid rows"


def main() -> None:
    rows = recorded_rows()
    now = predictions(rows)
    if "--json" in sys.argv:
        print(json.dumps(now))
        return
    before = _before(sys.argv[sys.argv.index("--before") + 1], len(rows)) if "--before" in sys.argv else None
    head = ["grid", "model", "method", "objective", "seq × micro-batch", "checkpointing", "engine", "measured GiB",
            *(["before GiB", "error before"] if before else []), "now GiB", "error now"]
    for group in dict.fromkeys(_group(r) for r in rows):
        print(f"### {group}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        errors, old_errors = [], []
        for i, r in enumerate(rows):
            if _group(r) != group:
                continue
            errors.append(now[i] / r["measured"] - 1)
            cells = [*describe(r), f"{r['measured'] / GIB:.2f}"]
            if before:
                old_errors.append(before[i] / r["measured"] - 1)
                cells += [f"{before[i] / GIB:.2f}", f"{old_errors[-1]:+.1%}"]
            print("| " + " | ".join([*cells, f"{now[i] / GIB:.2f}", f"{errors[-1]:+.1%}"]) + " |")
        print(f"\nnow: {summary(errors)}" + (f"\nbefore: {summary(old_errors)}" if before else "") + "\n")


if __name__ == "__main__":
    main()
