"""Planner accuracy: predicted vs measured peak GPU memory over a grid of configurations.

  python benchmarks/planner_grid.py OUT.json [--quick | --validate]

Each configuration trains 3 steps in its own process (snugtune train), and its summary's
torch.cuda.max_memory_allocated / max_memory_reserved are compared with the planner's prediction of
the allocated peak and of the reserved peak (allocated + allocator overhead; the CUDA context is
outside torch's allocator and not in either measurement).
"""

import json
import subprocess
import sys
from pathlib import Path

from snugtune.config import load_config
from snugtune.planner import plan_for_budget
from snugtune.planner.cards import GIB
from snugtune.planner.memory import peak_allocated

CFG = "examples/tinyllama-1.1b_qlora_t4.yaml"
DATA = str(Path("src/snugtune/bundled/stdlib_functions.jsonl").resolve())
GRID = [  # model, method, max_seq_len, micro_batch, checkpointing
    ("shape:tinyllama-1.1b", "qlora", 512, 4, True), ("shape:tinyllama-1.1b", "qlora", 2048, 1, True),
    ("shape:tinyllama-1.1b", "qlora", 512, 4, False), ("shape:tinyllama-1.1b", "lora", 1024, 2, True),
    ("shape:tinyllama-1.1b", "lora-8bit", 512, 2, True), ("shape:smollm2-135m", "lora", 2048, 4, False),
    ("shape:llama3.2-1b", "qlora", 2048, 2, True), ("shape:qwen2.5-1.5b", "qlora", 1024, 4, True),
]

# Held out: configurations the formula was not adjusted on (run with --validate).
VALIDATE = [
    ("shape:llama3.2-3b", "qlora", 4096, 1, True), ("shape:deepseek-r1-distill-qwen-1.5b", "lora-8bit", 1024, 2, True),
    ("shape:smollm2-135m", "qlora", 4096, 2, False), ("shape:mistral-7b", "qlora", 1024, 1, True),
    ("shape:stable-code-3b", "qlora", 512, 2, True),
]

rows = []
grid = VALIDATE if "--validate" in sys.argv else GRID[:3] if "--quick" in sys.argv else GRID
for model, method, seq, mb, ckpt in grid:
    overrides = [f"model={model}", f"method={method}", f"max_seq_len={seq}", f"train.micro_batch={mb}",
                 "train.grad_accum=1", f"train.grad_checkpointing={str(ckpt).lower()}", "train.max_steps=3",
                 f"data.path={DATA}", "lora.targets=all-linear", "train.optimizer=adamw_8bit", "budget=h100",
                 "save.every_steps=1000", "eval.max_batches=1"]
    cfg = load_config(CFG, overrides)
    plan = plan_for_budget(cfg, 79 * GIB, "h100")
    out = f"/tmp/grid-{len(rows)}"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", CFG, *overrides, f"output_dir={out}", "-q",
                           "--fresh"], capture_output=True, text=True)
    row = {"model": model, "method": method, "seq": seq, "micro_batch": mb, "checkpointing": ckpt,
           "predicted_allocated": peak_allocated(plan.breakdown),
           "predicted_reserved": plan.peak_bytes - plan.breakdown["CUDA context"], "rc": proc.returncode}
    if proc.returncode == 0:
        summary = json.loads(Path(out, "summary.json").read_text())
        row.update(measured_allocated=summary["peak_allocated_bytes"], measured_reserved=summary["peak_memory_bytes"])
        row["error_allocated"] = row["predicted_allocated"] / row["measured_allocated"] - 1
        row["error_reserved"] = row["predicted_reserved"] / row["measured_reserved"] - 1
    else:
        row["stderr"] = proc.stderr[-500:]
    rows.append(row)
    print(json.dumps({k: (round(v / GIB, 3) if isinstance(v, int) and v > 2**20 else v) for k, v in row.items()}),
          flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=2))
