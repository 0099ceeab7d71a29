"""Planner accuracy for the preference objectives on the GPU (issue 38: within ±10%, never more than 3% under):
DPO, ORPO and KTO rows of the planner grid, predicted vs measured peak memory and step time, and the two
preference recipes on their own card's budget. Rows run as measure/planner_grid.py runs them (its run_one:
`snugtune train` in its own process, every setting explicit, the same JSON line per configuration).

  python measure/preference_grid.py OUT_DIR [--jobs 4] [--deadline 480] [--only SUBSTRING]

The pairs are bench.compare.long_pairs: standard-library code whose every sequence is longer than the row's
max_seq_len, so each pair is two full sequences (the planner's worst case, as packed SFT rows are full).
"""

import json
import sys
import time
from pathlib import Path

import planner_grid as grid  # measure/planner_grid.py: run_one, the CUDA context, the row format
from snugtune.bench.compare import long_pairs

# (shape, method, objective, tokens a sequence, pairs a micro-batch, checkpointing: on | off | first N, extra)
GRID = [
    ("smollm2-135m", "lora", "dpo", 512, 4, "off", []),
    ("smollm2-135m", "qlora", "orpo", 1024, 2, "on", []),
    ("smollm2-135m", "full", "dpo", 512, 2, "on", []),         # the reference a frozen copy (fits an H100)
    ("smollm2-135m", "freeze", "kto", 512, 4, "off", []),
    ("tinyllama-1.1b", "qlora", "dpo", 1024, 4, "on", []),
    ("tinyllama-1.1b", "qlora", "dpo", 1024, 2, "off", []),
    ("tinyllama-1.1b", "qlora", "dpo", 2048, 1, "on", []),
    ("tinyllama-1.1b", "qlora", "orpo", 1024, 4, "on", []),
    ("tinyllama-1.1b", "qlora", "kto", 1024, 4, "on", []),
    ("tinyllama-1.1b", "lora", "dpo", 1024, 2, "11", []),
    ("tinyllama-1.1b", "freeze", "dpo", 512, 2, "on", []),
    ("llama3-8b", "qlora", "dpo", 1024, 1, "on", []),
    ("llama3-8b", "qlora", "dpo", 1024, 2, "on", []),
    ("llama3-8b", "qlora", "orpo", 1024, 2, "on", []),
    ("llama3-8b", "qlora", "kto", 1024, 2, "on", []),
    ("llama3-8b", "qlora", "dpo", 4096, 1, "on", []),
]
RECIPES = {"tinyllama-1.1b": "examples/tinyllama-1.1b_qlora-dpo_t4.yaml",
           "llama3-8b": "examples/llama3-8b_qlora-orpo_t4.yaml"}
PAIRS: list[str] = []  # the overrides that point at the pairs, set in main()


def grid_job(i: int, config: tuple, context: int) -> dict:
    shape, method, objective, seq, mb, ckpt, extra = config
    overrides = grid.grid_overrides(shape, method, seq, mb, ckpt, extra) + [f"objective={objective}", *PAIRS]
    row = grid.run_one(grid.BASE_CFG, overrides, Path(f"/tmp/preference-grid/g{i}"), grid.TIMEOUT_S, context)
    return {"kind": "grid", "model": shape, "method": method, "objective": objective, "seq": seq,
            "micro_batch_asked": mb, "checkpointing": ckpt, "extra": extra, **row}


def recipe_job(shape: str, context: int) -> dict:
    """The recipe as shipped (micro_batch: auto, its card's budget) on its model's shape and the pairs."""
    cfg = RECIPES[shape]
    overrides = [f"model=shape:{shape}", f"train.max_steps={grid.STEPS}", *grid.COMMON, *PAIRS]
    row = grid.run_one(cfg, overrides, Path(f"/tmp/preference-grid/r-{shape}"), grid.TIMEOUT_S, context)
    if "measured_peak" in row:
        row["used_fraction"] = row["measured_peak"] / row["budget_bytes"]
    return {"kind": "recipe", "recipe": cfg, "model": shape, **row}


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 4
    deadline = float(sys.argv[sys.argv.index("--deadline") + 1]) if "--deadline" in sys.argv else 480
    grid.END[0] = time.time() + deadline + grid.GRACE_S
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    context = grid.cuda_context_bytes()
    pairs = long_pairs(out_dir.resolve() / "pairs", max(g[3] for g in GRID))
    PAIRS.extend([f"data.path={pairs}", "data.format=preference", "data.eval_fraction=0.05"])
    log = (out_dir / "preference_grid.jsonl").open("a")
    log.write(json.dumps({"kind": "context", "cuda_context_bytes": context, "gpu": grid.torch.cuda.get_device_name(),
                          "torch": grid.torch.__version__}) + "\n")
    for shape in dict.fromkeys(g[0] for g in GRID):  # small to large
        tasks = [(grid_job, (i, g, context)) for i, g in enumerate(GRID) if g[0] == shape and only in str(g)]
        if shape in RECIPES and only in RECIPES[shape]:
            tasks.append((recipe_job, (shape, context)))
        path, built = grid.build(shape)
        started = time.time()
        grid.run_group(tasks, grid.BIG_JOBS if shape in grid.BIG else jobs, log)
        print(f"# {shape}: built in {built:.0f}s, group done in {time.time() - started:.0f}s", flush=True)
    log.close()


if __name__ == "__main__":
    main()
