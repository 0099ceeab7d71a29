"""Planner accuracy on the GPU: predicted vs measured peak memory over a grid, and the plans chosen
under simulated small cards.

  python benchmarks/planner_grid.py OUT_DIR [--jobs 5] [--deadline SECONDS]
  python benchmarks/planner_grid.py --recompute OUT_DIR/grid.jsonl   # today's planner vs an earlier run

GRID: each configuration trains 3 steps in its own process (snugtune train, budget h100, settings as
given); the planner's prediction is compared with torch's max_memory_reserved + the CUDA context
(measured once here) and with max_memory_allocated.
BUDGETS: each recipe config trains 3 steps under a simulated card (budget=NGiB caps the process with
set_per_process_memory_fraction) with micro-batch and checkpointing left to the planner (micro_batch =
the recipe's rows per step, grad_accum 1, checkpointing auto); recorded: whether it ran without an OOM,
what it chose, and the share of the budget it used.

Configurations of one model run concurrently (--jobs processes; torch's peak counters are per process,
so the memory figures are unaffected; timings are not measured here) and each model's random-weight
checkpoint is deleted after its group, to stay within the machine's disk. Rows are appended to
OUT_DIR/grid.jsonl as they finish.
"""

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from snugtune.config import load_config
from snugtune.models import default_cache_dir, resolve_model
from snugtune.planner import plan_for_budget
from snugtune.planner.cards import GIB
from snugtune.planner.memory import peak_allocated

DATA = str(Path("src/snugtune/bundled/stdlib_functions.jsonl").resolve())
GRID_CFG = "examples/tinyllama-1.1b_qlora_t4.yaml"
# (shape, method, max_seq_len, micro_batch, checkpointing); recipe settings marked in the comments
GRID = [
    ("smollm2-135m", "lora", 8192, 1, False), ("smollm2-135m", "qlora", 2048, 8, True),
    ("smollm2-135m", "freeze", 1024, 8, False),
    ("tinyllama-1.1b", "qlora", 512, 4, True),  # chatdoctor-1b
    ("tinyllama-1.1b", "qlora", 512, 4, False), ("tinyllama-1.1b", "lora-8bit", 512, 2, True),
    ("tinyllama-1.1b", "lora", 1024, 2, True), ("tinyllama-1.1b", "freeze", 2048, 2, True),
    ("llama3.2-1b", "qlora", 8192, 1, True), ("llama3.2-1b", "lora", 4096, 2, False),
    ("deepseek-r1-distill-qwen-1.5b", "lora-8bit", 1024, 1, True),  # math-1.5b
    ("deepseek-r1-distill-qwen-1.5b", "lora-8bit", 1024, 2, True),
    ("deepseek-r1-distill-qwen-1.5b", "qlora", 2048, 4, True),
    ("deepseek-r1-distill-qwen-1.5b", "lora-8bit", 256, 8, False),
    ("phi-2", "qlora", 512, 1, True),  # guanaco-matrix
    ("phi-2", "qlora", 1024, 2, False), ("phi-2", "freeze", 512, 2, True),
    ("stable-code-3b", "qlora", 1024, 2, True),  # code-3b-10gb
    ("stable-code-3b", "lora-8bit", 1024, 2, True),
    ("codellama-7b", "lora-8bit", 256, 1, True),  # code-7b
    ("codellama-7b", "qlora", 2048, 2, True), ("codellama-7b", "lora-8bit", 1024, 1, False),
    ("llama3-8b", "qlora", 2048, 1, True), ("llama3-8b", "qlora", 8192, 1, True),
    ("llama3-8b", "lora-8bit", 512, 1, True), ("llama3-8b", "lora", 1024, 1, True),
    ("llama3-8b", "qlora", 512, 8, True),
]
RECIPES = {  # shape -> recipe config (its own method, LoRA settings, sequence length and rows per step)
    "tinyllama-1.1b": "examples/tinyllama-1.1b_qlora_t4.yaml",
    "deepseek-r1-distill-qwen-1.5b": "examples/deepseek-r1-distill-qwen-1.5b_lora-8bit_t4.yaml",
    "phi-2": "examples/phi-2_qlora_t4.yaml",
    "stable-code-3b": "examples/stable-code-3b_qlora_rtx3080.yaml",
    "codellama-7b": "examples/codellama-7b_lora-8bit_t4.yaml",
}
BUDGETS_GIB = (10, 15)
COMMON = ["train.max_steps=3", "save.every_steps=1000", "eval.max_batches=1", f"data.path={DATA}",
          "data.format=alpaca", "data.max_samples=null"]


def cuda_context_bytes() -> int:
    """Device memory this process uses outside torch's allocator once CUDA and cuBLAS are up."""
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def trained_per_row(cfg) -> list[int]:
    """Trained positions of each packed training row, as `train` gives them to the planner."""
    from snugtune.data.batches import epoch_rows, trained_tokens_per_row
    from snugtune.data.prepare import prepare_data
    from snugtune.models import _tokenizer_dir, load_tokenizer
    tokenizer = load_tokenizer(_tokenizer_dir(default_cache_dir()))  # every shape uses this tokenizer
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
    rows = epoch_rows(data.train, cfg.train.seed, 0, cfg.max_seq_len if cfg.data.packing else None)
    return trained_tokens_per_row(rows)


def run_train(cfg: str, overrides: list[str], out: str) -> tuple[int, str, dict | None]:
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", cfg, *overrides, f"output_dir={out}", "-q",
                           "--fresh"], capture_output=True, text=True)
    summary = Path(out, "summary.json")
    text = proc.stdout + proc.stderr
    return proc.returncode, text, json.loads(summary.read_text()) if proc.returncode == 0 else None


def grid_overrides(shape: str, method: str, seq: int, mb: int, ckpt: bool) -> list[str]:
    return [f"model=shape:{shape}", f"method={method}", f"max_seq_len={seq}", f"train.micro_batch={mb}",
            "train.grad_accum=1", f"train.grad_checkpointing={str(ckpt).lower()}", "lora.targets=all-linear",
            "train.optimizer=adamw_8bit", "budget=h100", *COMMON]


def grid_plan(overrides: list[str]):
    """The planner's prediction for a grid configuration, knowing its data, as `train` plans it."""
    cfg = load_config(GRID_CFG, overrides)
    return plan_for_budget(cfg, 79 * GIB, "h100", trained_per_row=trained_per_row(cfg))


def grid_job(i: int, shape: str, method: str, seq: int, mb: int, ckpt: bool, context: int) -> dict:
    overrides = grid_overrides(shape, method, seq, mb, ckpt)
    plan = grid_plan(overrides)
    rc, text, summary = run_train(GRID_CFG, overrides, f"/tmp/grid/g{i}")
    row = {"kind": "grid", "model": shape, "method": method, "seq": seq, "micro_batch": mb, "checkpointing": ckpt,
           "predicted_peak": plan.peak_bytes, "predicted_allocated": peak_allocated(plan.breakdown),
           "breakdown": plan.breakdown, "rc": rc}
    if summary:
        row.update(measured_allocated=summary["peak_allocated_bytes"],
                   measured_peak=summary["peak_memory_bytes"] + context, oom_resplits=summary["oom_resplits"])
        row["error_peak"] = row["predicted_peak"] / row["measured_peak"] - 1
        row["error_allocated"] = row["predicted_allocated"] / row["measured_allocated"] - 1
    else:
        row["output_tail"] = text[-800:]
    return row


def budget_job(i: int, shape: str, gib: int, context: int) -> dict:
    cfg = RECIPES[shape]
    base = load_config(cfg, [f"model=shape:{shape}"])
    rows_per_step = base.train.micro_batch * base.train.grad_accum
    overrides = [f"model=shape:{shape}", f"budget={gib}GiB", f"train.micro_batch={rows_per_step}",
                 "train.grad_accum=1", "train.grad_checkpointing=auto", *COMMON]
    rc, text, summary = run_train(cfg, overrides, f"/tmp/grid/b{i}")
    row = {"kind": "budget", "recipe": cfg, "model": shape, "budget_gib": gib, "rows_per_step": rows_per_step,
           "rc": rc, "oom_in_output": "ran out of memory" in text}
    if summary:
        used = summary["peak_memory_bytes"] + context
        row.update(plan=summary["plan"], oom_resplits=summary["oom_resplits"], measured_peak=used,
                   measured_allocated=summary["peak_allocated_bytes"], used_fraction=used / (gib * GIB),
                   error_peak=summary["plan"]["predicted_peak_bytes"] / used - 1)
    else:
        row["output_tail"] = text[-800:]
    return row


def recompute(grid_file: str) -> None:
    """Predictions of the current planner for the fixed-setting rows of an earlier run (what they
    measured does not depend on the planner), with the errors."""
    for line in open(grid_file):
        row = json.loads(line)
        if row["kind"] != "grid" or "measured_peak" not in row:
            continue
        plan = grid_plan(grid_overrides(row["model"], row["method"], row["seq"], row["micro_batch"],
                                        row["checkpointing"]))
        print(f"{row['model']:30s} {row['method']:9s} {row['seq']:5d}x{row['micro_batch']} ckpt={row['checkpointing']!s:5s} "
              f"predicted {plan.peak_bytes / GIB:6.2f} measured {row['measured_peak'] / GIB:6.2f} GiB "
              f"error {plan.peak_bytes / row['measured_peak'] - 1:+.1%}")


def main() -> None:
    if sys.argv[1] == "--recompute":
        return recompute(sys.argv[2])
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 5
    deadline = time.time() + (float(sys.argv[sys.argv.index("--deadline") + 1]) if "--deadline" in sys.argv else 1e9)
    context = cuda_context_bytes()
    log = (out_dir / "grid.jsonl").open("a")
    log.write(json.dumps({"kind": "context", "cuda_context_bytes": context, "gpu": torch.cuda.get_device_name()})
              + "\n")
    order = list(dict.fromkeys(shape for shape, *_ in GRID))
    order.insert(0, order.pop(order.index("llama3-8b")))  # the largest first: it must not miss the deadline
    for shape in order:
        if time.time() > deadline:
            break
        started = time.time()
        path = resolve_model(f"shape:{shape}").path  # built once on the GPU, then freed
        torch.cuda.empty_cache()
        built = time.time() - started
        tasks = [(grid_job, (i, *g, context)) for i, g in enumerate(GRID) if g[0] == shape]
        if shape in RECIPES:
            tasks += [(budget_job, (100 * order.index(shape) + gib, shape, gib, context)) for gib in BUDGETS_GIB]
        with ThreadPoolExecutor(jobs) as pool:
            for row in pool.map(lambda task: task[0](*task[1]), tasks):
                log.write(json.dumps(row) + "\n")
                log.flush()
                brief = {k: (round(v / GIB, 2) if isinstance(v, int) and v > 2**24 else
                             round(v, 3) if isinstance(v, float) else v)
                         for k, v in row.items() if k not in ("breakdown", "output_tail", "plan")}
                print(json.dumps(brief), flush=True)
                if "output_tail" in row:
                    print(row["output_tail"][-400:], flush=True)
        print(f"# {shape}: built in {built:.0f}s, group done in {time.time() - started:.0f}s", flush=True)
        if path.is_relative_to(default_cache_dir()):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
