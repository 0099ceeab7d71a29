"""`snugtune bench`: snugtune's engine and the plain transformers+peft+bitsandbytes recipe (bench/plain.py),
each in its own process, on the same random-weight checkpoint and the same micro-batches; one table.

The setting is DESIGN §10's: QLoRA nf4 + double quant, LoRA r=16 α=32 on every linear layer, gradient
checkpointing, AdamW 8-bit, packed rows of the bundled stdlib data; tokens/s is the median of the warm
steps (the first three are warm-up) and counts real tokens.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from snugtune.engine.rundir import read_jsonl

STACKS = ("snugtune", "plain")


def bench_config(shape: str, seq: int, batch: int, steps: int, cap_gib: float | None, device: str) -> dict:
    data = str(Path(str(resources.files("snugtune") / "bundled" / "stdlib_functions.jsonl")))
    return {"model": f"shape:{shape}", "data": {"path": data, "format": "alpaca", "eval_fraction": 0.02},
            "max_seq_len": seq, "method": "qlora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
            "quant": {"type": "nf4", "double_quant": True},
            "train": {"max_steps": steps, "micro_batch": batch, "grad_accum": 1, "lr": 2e-4,
                      "optimizer": "adamw_8bit", "grad_checkpointing": True, "warmup": 0},
            "save": {"every_steps": 100000}, "eval": {"max_batches": 1},
            "budget": f"{cap_gib}GiB" if cap_gib else "auto", "device": device}


def _snugtune(config_path: Path, work: Path) -> dict:
    run = work / "snugtune-run"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(config_path), f"output_dir={run}",
                           "--quiet", "--fresh"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "exit_code": proc.returncode}
    summary = json.loads((run / "summary.json").read_text())
    steps = read_jsonl(run / "metrics.jsonl")
    speeds = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r][3:] or \
        [r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
    return {"tokens_per_s_median_step": statistics.median(speeds),
            "peak_allocated_bytes": summary.get("peak_allocated_bytes"),
            "peak_reserved_bytes": summary["peak_memory_bytes"] if summary.get("peak_allocated_bytes") else None,
            "loss_last": summary["train_loss_final"], "device": summary["device"]}


def _plain(config_path: Path, work: Path) -> dict:
    out = work / "plain.json"
    proc = subprocess.run([sys.executable, "-m", "snugtune.bench.plain", str(config_path), "--out", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": "out of memory" if "OutOfMemory" in proc.stderr else last, "exit_code": proc.returncode}
    return json.loads(out.read_text())


def run_bench(shape: str = "llama3-8b", seq: int = 2048, batch: int = 1, steps: int = 8,
              against: tuple[str, ...] = ("plain",), cap_gib: float | None = None, device: str = "auto") -> dict:
    """{stack: result} for snugtune and each stack in `against` (plain; unsloth is reported as not run)."""
    results: dict = {"setting": {"shape": shape, "seq": seq, "batch": batch, "steps": steps, "cap_gib": cap_gib}}
    with tempfile.TemporaryDirectory(prefix="snugtune-bench-") as tmp:
        work = Path(tmp)
        config_path = work / "bench.yaml"
        config_path.write_text(yaml.safe_dump(bench_config(shape, seq, batch, steps, cap_gib, device)))
        # build the random-weight checkpoint once, outside both measurements
        from snugtune.models import resolve_model
        resolve_model(f"shape:{shape}")
        results["snugtune"] = _snugtune(config_path, work)
        for stack in against:
            if stack == "plain":
                results["plain"] = _plain(config_path, work)
            else:
                results[stack] = {"error": f"{stack} is not wired into snugtune bench yet"}
    return results


def format_table(results: dict) -> str:
    rows = ["| stack | tokens/s (median step) | peak allocated | peak reserved | last loss |", "|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"  # noqa: E731
    for stack, r in results.items():
        if stack == "setting":
            continue
        if "error" in r:
            rows.append(f"| {stack} | {r['error']} | | | |")
            continue
        rows.append(f"| {stack} | {r['tokens_per_s_median_step']:,.0f} | {gib(r.get('peak_allocated_bytes'))} | "
                    f"{gib(r.get('peak_reserved_bytes'))} | {r['loss_last']:.4f} |")
    return "\n".join(rows)
