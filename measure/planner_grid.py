"""Planner accuracy on the GPU, for the engine as it runs by default (compiled blocks, CUDA graphs, fused
loss, offload, MLP tiling, weight streaming): predicted vs measured peak memory and step time over a grid,
and each shipped recipe on its own card's budget with micro_batch: auto.

  python measure/planner_grid.py OUT_DIR [--jobs 8] [--deadline 480] [--only SUBSTRING]

Every configuration trains a few steps with `snugtune train` in its own process (an OOM or a leak does
not carry to the next), under a per-configuration timeout, models ordered small to large; the
configurations of one model run --jobs at a time (BIG_JOBS for the 7-8B models; torch's peak counters
are per process, so memory is unaffected; step times are then measured beside other work and are upper
figures). Each model's random-weight checkpoint is built while the model before it trains, and deleted
after its group. No configuration starts after --deadline seconds, and each is stopped by then + GRACE_S,
so the whole run ends within deadline + GRACE_S (a row then says "skipped" or "timeout"). One JSON line a
configuration goes to OUT_DIR/grid.jsonl as it finishes (recompute it with measure/planner_recompute.py):
- predicted: the plan `train` made for exactly the settings it ran (summary.json's plan, with its
  Decisions, so the prediction can be recomputed later from the row alone);
- measured: torch.cuda.max_memory_reserved + the CUDA context measured once here, and the allocated peak;
- step time: predicted by the planner's step-time model, measured as the median of the last steps'
  time from metrics.jsonl (after compilation and graph capture).
"""

import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from snugtune.bench.compare import long_documents
from snugtune.models.cache import default_cache_dir
from snugtune.models.resolve import resolve_model
from snugtune.planner.cards import GIB

DATA = str(Path("src/snugtune/bundled/stdlib_functions.jsonl").resolve())
BASE_CFG = "examples/tinyllama-1.1b_qlora_t4.yaml"
STEPS = 5             # two eager warm-ups, the capture, then replays: the last two are timed
LONG_STEPS = 3        # rows of 32k tokens and more: a step takes seconds
TIMEOUT_S = 180
LONG_TIMEOUT_S = 300
GRACE_S = 60          # past the deadline, running configurations get this long to finish
BIG = ("codellama-7b", "llama3-8b")
BIG_JOBS = 5          # 7-8B configurations at once (their predicted peaks add up to about 100 GiB)
END = [float("inf")]  # the time no configuration may run past (set in main)
# (shape, method, seq, micro_batch, checkpointing: on | off | first N blocks, extra overrides), small to large
GRID = [
    ("smollm2-135m", "lora", 256, 8, "off", []),
    ("smollm2-135m", "qlora", 1024, 4, "on", []),
    ("smollm2-135m", "freeze", 512, 8, "off", []),
    ("smollm2-135m", "full", 256, 4, "on", []),
    ("smollm2-135m", "lora-8bit", 512, 2, "off", []),
    ("smollm2-135m", "qlora", 2048, 8, "15", []),
    ("smollm2-135m", "lora", 8192, 1, "off", ["train.cuda_graphs=false"]),
    ("tinyllama-1.1b", "qlora", 512, 4, "on", []),
    ("tinyllama-1.1b", "qlora", 512, 4, "on", ["train.cuda_graphs=false"]),
    ("tinyllama-1.1b", "qlora", 512, 4, "off", []),
    ("tinyllama-1.1b", "qlora", 512, 4, "on", ["lora.dropout=0.05"]),
    ("tinyllama-1.1b", "lora-8bit", 512, 2, "on", []),
    ("tinyllama-1.1b", "lora", 1024, 2, "11", []),
    ("tinyllama-1.1b", "freeze", 2048, 2, "on", []),
    ("tinyllama-1.1b", "full", 256, 1, "on", []),
    ("tinyllama-1.1b", "qlora", 4096, 2, "on", ["offload.embeddings=true"]),
    ("llama3.2-1b", "qlora", 8192, 1, "on", []),
    ("llama3.2-1b", "lora", 4096, 2, "off", []),
    ("deepseek-r1-distill-qwen-1.5b", "lora-8bit", 1024, 1, "on", []),
    ("deepseek-r1-distill-qwen-1.5b", "qlora", 2048, 4, "on", []),
    ("deepseek-r1-distill-qwen-1.5b", "lora-8bit", 256, 8, "off", []),
    ("phi-2", "qlora", 512, 1, "on", []),
    ("phi-2", "qlora", 1024, 2, "off", []),
    ("stable-code-3b", "qlora", 1024, 2, "on", []),
    ("codellama-7b", "lora-8bit", 256, 1, "on", []),
    ("codellama-7b", "qlora", 2048, 2, "on", []),
    ("llama3-8b", "qlora", 512, 8, "on", []),
    ("llama3-8b", "qlora", 2048, 1, "on", []),
    ("llama3-8b", "qlora", 4096, 1, "on", []),
    ("llama3-8b", "qlora", 4096, 1, "on", ["train.cuda_graphs=false"]),
    ("llama3-8b", "qlora", 4096, 1, "off", []),
    ("llama3-8b", "qlora", 8192, 1, "on", ["train.tiled_mlp=true"]),
    ("llama3-8b", "qlora", 16384, 1, "on", ["offload.activations=true"]),
    ("llama3-8b", "lora", 1024, 1, "on", ["offload.weights=true"]),
    ("llama3-8b", "qlora", 32768, 1, "on", ["train.tiled_mlp=true", "offload.activations=true",
                                              "offload.embeddings=true"]),
    ("llama3-8b", "qlora", 65536, 1, "on", ["train.tiled_mlp=true", "offload.activations=true",
                                              "offload.weights=true"]),
]
RECIPES = {  # shape -> the recipe trained on its own card's budget, micro_batch: auto as shipped
    "tinyllama-1.1b": "examples/tinyllama-1.1b_qlora_t4.yaml",
    "deepseek-r1-distill-qwen-1.5b": "examples/deepseek-r1-distill-qwen-1.5b_lora-8bit_t4.yaml",
    "phi-2": "examples/phi-2_qlora_t4.yaml",
    "stable-code-3b": "examples/stable-code-3b_qlora_rtx3080.yaml",
    "codellama-7b": "examples/codellama-7b_lora-8bit_t4.yaml",
    "llama3-8b": "examples/mistral-7b_qlora_t4.yaml",  # Mistral's recipe on the 8B shape: the same card
}
COMMON = ["save.every_steps=1000", "eval.max_batches=1", f"data.path={DATA}", "data.format=alpaca",
          "data.max_samples=null", "log.tensorboard=false", "train.log_every=1"]
OFF_OFFLOAD = ["offload.embeddings=false", "offload.activations=false", "offload.weights=false"]
LONG_FROM = 8192      # rows this long are chunks of one long standard-library document (bench.long_documents):
                      # one document, so every packed row holds one chunk and attention is unmasked
LONG_DATA: list[str] = []  # the overrides that point at those documents, set in main()


def cuda_context_bytes() -> int:
    """Device memory this process uses outside torch's allocator once CUDA and cuBLAS are up."""
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def grid_overrides(shape: str, method: str, seq: int, mb: int, ckpt: str, extra: list[str]) -> list[str]:
    """Every setting explicit, so the plan `train` makes is the configuration it runs."""
    layers = [f"train.checkpoint_layers={ckpt}"] if ckpt.isdigit() else []
    steps = LONG_STEPS if seq >= 32768 else STEPS
    given = {item.split("=")[0] for item in extra}
    return [f"model=shape:{shape}", f"method={method}", f"max_seq_len={seq}", f"train.micro_batch={mb}",
            "train.grad_accum=1", "train.rows_per_step=null", f"train.max_steps={steps}",
            f"train.grad_checkpointing={'false' if ckpt == 'off' else 'true'}", *layers,
            "lora.targets=all-linear", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
            "train.optimizer=adamw_8bit", "train.tiled_mlp=false", "budget=h100",
            *[o for o in OFF_OFFLOAD if o.split("=")[0] not in given], *extra, *COMMON]


def measured_step_seconds(out: Path, summary: dict, timed: int = 2) -> float | None:
    """Median seconds of the last `timed` steps (tokens of a step over its logged tokens/s)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-timed:]
    if not rates or not summary["steps"]:
        return None
    per_step = summary["tokens_trained"] / summary["steps"]
    return statistics.median(per_step / rate for rate in rates)


def run_one(cfg: str, overrides: list[str], out: Path, timeout: int, context: int) -> dict:
    started = time.time()
    if started > END[0] - GRACE_S:
        return {"rc": "skipped", "overrides": overrides}
    timeout = min(timeout, END[0] - started)
    try:
        proc = subprocess.run([sys.executable, "-m", "snugtune", "train", cfg, *overrides, f"output_dir={out}", "-q",
                               "--fresh"], capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as expired:
        rc, text = "timeout", str(expired.stdout or "")[-400:] + str(expired.stderr or "")[-800:]
    row = {"rc": rc, "seconds": round(time.time() - started, 1), "overrides": overrides}
    if rc != 0:
        row["output_tail"] = text[-1200:]
        return row
    summary = json.loads((out / "summary.json").read_text())
    plan = summary["plan"]
    row.update(predicted_peak=plan["predicted_peak_bytes"], settings=plan["settings"], breakdown=plan["breakdown"],
               measured_peak=summary["peak_memory_bytes"] + context, measured_reserved=summary["peak_memory_bytes"],
               measured_allocated=summary["peak_allocated_bytes"], oom_resplits=summary["oom_resplits"],
               predicted_step_s=plan["predicted_step_seconds"], measured_step_s=measured_step_seconds(out, summary),
               speedups=summary["speedups"], cuda_graphs=summary["cuda_graphs"], budget_bytes=plan["budget_bytes"],
               micro_batch=summary["micro_batch"], grad_accum=summary["grad_accum"])
    row["error_peak"] = row["predicted_peak"] / row["measured_peak"] - 1
    if row["measured_step_s"]:
        row["error_step"] = row["predicted_step_s"] / row["measured_step_s"] - 1
    return row


def grid_job(i: int, config: tuple, context: int) -> dict:
    shape, method, seq, mb, ckpt, extra = config
    timeout = LONG_TIMEOUT_S if seq >= 32768 else TIMEOUT_S
    overrides = grid_overrides(*config) + (LONG_DATA if seq >= LONG_FROM else [])
    row = run_one(BASE_CFG, overrides, Path(f"/tmp/grid/g{i}"), timeout, context)
    return {"kind": "grid", "model": shape, "method": method, "seq": seq, "micro_batch_asked": mb,
            "checkpointing": ckpt, "extra": extra, **row}


def recipe_job(shape: str, context: int) -> dict:
    """The recipe as shipped (micro_batch: auto, its card's budget) on its model's shape."""
    cfg = RECIPES[shape]
    overrides = [f"model=shape:{shape}", f"train.max_steps={STEPS}", *COMMON]
    row = run_one(cfg, overrides, Path(f"/tmp/grid/r-{shape}"), TIMEOUT_S, context)
    if "measured_peak" in row:
        row["used_fraction"] = row["measured_peak"] / row["budget_bytes"]
    return {"kind": "recipe", "recipe": cfg, "model": shape, **row}


def brief(row: dict) -> str:
    keep = {k: (round(v / GIB, 2) if isinstance(v, int) and v > 2**24 else round(v, 3) if isinstance(v, float) else v)
            for k, v in row.items() if k not in ("breakdown", "output_tail", "settings", "overrides", "speedups")}
    return json.dumps(keep)


def run_group(tasks: list, jobs: int, log) -> None:
    """One model's configurations, `jobs` at a time; each row logged and shown as it finishes."""
    with ThreadPoolExecutor(jobs) as pool:
        for row in pool.map(lambda task: task[0](*task[1]), tasks):
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(brief(row), flush=True)
            if "output_tail" in row:
                print(row["output_tail"][-600:], flush=True)


def build(shape: str) -> tuple[Path, float]:
    """The shape's random-weight checkpoint (built on the GPU, then freed) and the seconds it took."""
    started = time.time()
    path = resolve_model(f"shape:{shape}").path
    torch.cuda.empty_cache()
    return path, time.time() - started


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 8
    deadline = float(sys.argv[sys.argv.index("--deadline") + 1]) if "--deadline" in sys.argv else 480
    END[0] = time.time() + deadline + GRACE_S
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    context = cuda_context_bytes()
    documents = long_documents(out_dir.resolve() / "long-documents", 2 * max(g[2] for g in GRID), count=1)
    LONG_DATA.extend([f"data.path={documents}", "data.format=text", "data.eval_fraction=0.0"])
    log = (out_dir / "grid.jsonl").open("a")
    log.write(json.dumps({"kind": "context", "cuda_context_bytes": context, "gpu": torch.cuda.get_device_name(),
                          "torch": torch.__version__}) + "\n")
    groups = {}
    for shape in dict.fromkeys(g[0] for g in GRID):  # small to large
        tasks = [(grid_job, (i, g, context)) for i, g in enumerate(GRID) if g[0] == shape and only in str(g)]
        if shape in RECIPES and only in RECIPES[shape]:
            tasks.append((recipe_job, (shape, context)))
        if tasks:
            groups[shape] = tasks
    shapes = list(groups)
    with ThreadPoolExecutor(1) as builder:
        next_build = builder.submit(build, shapes[0]) if shapes else None
        for k, shape in enumerate(shapes):
            path, built = next_build.result()
            if k + 1 < len(shapes):
                next_build = builder.submit(build, shapes[k + 1])
            started = time.time()
            run_group(groups[shape], BIG_JOBS if shape in BIG else jobs, log)
            print(f"# {shape}: built in {built:.0f}s, group done in {time.time() - started:.0f}s", flush=True)
            if path.is_relative_to(default_cache_dir()):
                shutil.rmtree(path, ignore_errors=True)
    log.close()


if __name__ == "__main__":
    main()
