"""Issue 38 on one GPU, in one device call: `snugtune bench --objective dpo` (snugtune's DPO beside TRL's
DPOTrainer on transformers+peft+bitsandbytes and Unsloth's, TinyLlama and the 8B shape, 1,024 tokens a sequence
under a 15 GiB cap), then the planner's accuracy for the preference objectives (issue 38: within ±10%, never more
than 3% under): DPO, ORPO and KTO rows of the planner grid, predicted vs measured peak memory and step time, and
the two preference recipes on their own card's budget, until the deadline. Grid rows run as
measure/planner_grid.py runs them (its run_one: `snugtune train` in its own process, every setting explicit).

  python measure/preference_grid.py OUT_DIR [PIECE ...] [--deadline 520] [--jobs 4] [--big-jobs 5]
                                    [--only SUBSTRING]
    bench-tinyllama bench-8b   snugtune bench --objective dpo --seq 1024 --cap 15 --against trl,unsloth
    grid                       the grid rows and the recipes (--only: those whose row names SUBSTRING)
    longest-tinyllama longest-8b   (not in the default list: a second call) each stack's longest pair under the
                                   cap (--max-context 16384, 3 steps a trial)
  Default pieces: bench-tinyllama bench-8b grid. A piece starts only if its estimate fits before the deadline.
  SMOKE=1: every piece on shape:tiny, short sequences, 2 steps, the CPU (the check that the GPU call cannot die
  of a typo; tests/bench/test_preference_session.py runs it).

On the GPU machine (one call, at most 540 s; .devsite carries trl, unsloth, bitsandbytes; .devcache the tokenizer):
  XDG_CACHE_HOME=$PWD/.devcache PYTHONPATH=$PWD/.devsite:$PWD/src HF_HUB_OFFLINE=1 \
    timeout 540 python measure/preference_grid.py $OUT --deadline 500
Out: preference_grid.jsonl (one JSON line per grid row or recipe), bench-*.json (each bench's results), bench.txt
(their tables).

The pairs are bench.compare.long_pairs: standard-library code whose every sequence is longer than the row's
max_seq_len, so each pair is two full sequences (the planner's worst case, as packed SFT rows are full).
"""

import json
import os
import subprocess
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
PAIRS: dict[int, Path] = {}  # tokens a sequence -> pairs whose prompt leaves answer tokens at that length
SMOKE = os.environ.get("SMOKE") == "1"
SMOKE_GRID = [("tiny", "lora", "dpo", 64, 2, "off", []), ("tiny", "qlora", "orpo", 64, 2, "on", []),
              ("tiny", "full", "dpo", 64, 2, "on", []), ("tiny", "freeze", "kto", 96, 2, "off", [])]
# piece -> (shape, seconds it is expected to take on an H100, bench arguments beyond the common ones)
BENCHES = {"bench-tinyllama": ("tinyllama-1.1b", 150, []), "bench-8b": ("llama3-8b", 240, []),
           "longest-tinyllama": ("tinyllama-1.1b", 400, ["--max-context", "16384", "--steps", "3"]),
           "longest-8b": ("llama3-8b", 500, ["--max-context", "16384", "--steps", "3"])}
DEFAULT_PIECES = ["bench-tinyllama", "bench-8b", "grid"]


def pair_overrides(seq: int) -> list[str]:
    return [f"data.path={PAIRS[seq]}", "data.format=preference", "data.eval_fraction=0.05"]


def grid_job(i: int, config: tuple, context: int) -> dict:
    shape, method, objective, seq, mb, ckpt, extra = config
    overrides = grid.grid_overrides(shape, method, seq, mb, ckpt, extra) + [f"objective={objective}",
                                                                            *pair_overrides(seq)]
    row = grid.run_one(grid.BASE_CFG, overrides, Path(f"/tmp/preference-grid/g{i}"), grid.TIMEOUT_S, context)
    return {"kind": "grid", "model": shape, "method": method, "objective": objective, "seq": seq,
            "micro_batch_asked": mb, "checkpointing": ckpt, "extra": extra, **row}


def recipe_job(shape: str, context: int) -> dict:
    """The recipe as shipped (micro_batch: auto, its card's budget) on its model's shape and the pairs."""
    cfg = RECIPES[shape]
    smoke = ["model=shape:tiny", "train.optimizer=adamw_8bit"] if SMOKE else []  # paged optimizers need a GPU
    overrides = [f"model=shape:{shape}", f"train.max_steps={grid.STEPS}", *grid.COMMON,
                 *pair_overrides(max(PAIRS)), *smoke]
    row = grid.run_one(cfg, overrides, Path(f"/tmp/preference-grid/r-{shape}"), grid.TIMEOUT_S, context)
    if "measured_peak" in row:
        row["used_fraction"] = row["measured_peak"] / row["budget_bytes"]
    return {"kind": "recipe", "recipe": cfg, "model": shape, **row}


def left() -> float:
    return grid.END[0] - grid.GRACE_S - time.time()


def bench(piece: str, out_dir: Path) -> None:
    """One `snugtune bench --objective dpo` in its own process, under what is left of the deadline."""
    shape, estimate, extra = BENCHES[piece]
    args = ["--shape", shape, "--seq", "1024", "--batch", "1", "--cap", "15", "--against", "trl,unsloth", *extra]
    if SMOKE:
        # a longest-pair piece: one trial a stack (64 tokens; the doubling to 128 passes the limit of 96)
        args = ["--shape", "tiny", "--seq", "64", "--batch", "2", "--steps", "2", "--device", "cpu",
                "--against", "trl,unsloth", *(["--max-context", "96"] if "--max-context" in extra else [])]
    elif left() < estimate:
        print(f"## {piece}: skipped ({left():.0f} s left, about {estimate} s needed)", flush=True)
        return
    print(f"## {piece}: snugtune bench --objective dpo {' '.join(args)}", flush=True)
    out = out_dir / f"{piece}.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "snugtune", "bench", "--objective", "dpo", *args, "--json",
                               str(out)], capture_output=True, text=True, timeout=max(left(), 60) + grid.GRACE_S)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as expired:
        text = f"timed out\n{expired.stdout or ''}{expired.stderr or ''}"
    print(text[-3000:], flush=True)
    with (out_dir / "bench.txt").open("a") as table:
        table.write(f"## {piece}: {' '.join(args)}\n{text[text.find('| stack'):] if '| stack' in text else text[-1500:]}\n")


def grid_piece(out_dir: Path, jobs: int, only: str, context: int) -> None:
    """The grid rows and the recipes, smallest model first, until the deadline."""
    rows = SMOKE_GRID if SMOKE else GRID
    for seq in sorted({g[3] for g in rows}):  # one set a length: a 4,096-token row's prompt would fill 512
        PAIRS[seq] = long_pairs(out_dir.resolve() / "pairs" / str(seq), seq)
    with (out_dir / "preference_grid.jsonl").open("a") as log:
        log.write(json.dumps({"kind": "context", "cuda_context_bytes": context, "smoke": SMOKE, "torch": grid.torch.__version__,
                              "gpu": grid.torch.cuda.get_device_name() if grid.torch.cuda.is_available() else None}) + "\n")
        for shape in dict.fromkeys(g[0] for g in rows):  # small to large
            tasks = [(grid_job, (i, g, context)) for i, g in enumerate(rows) if g[0] == shape and only in str(g)]
            for recipe_shape, recipe in RECIPES.items():
                if (recipe_shape == shape or SMOKE) and only in recipe:
                    tasks.append((recipe_job, (recipe_shape, context)))
            path, built = grid.build(shape)
            started = time.time()
            grid.run_group(tasks, grid.BIG_JOBS if shape in grid.BIG else jobs, log)
            print(f"# {shape}: built in {built:.0f}s, group done in {time.time() - started:.0f}s", flush=True)


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    values = {sys.argv[i + 1] for i, a in enumerate(sys.argv) if a.startswith("--")}
    pieces = [a for a in sys.argv[2:] if not a.startswith("--") and a not in values] or DEFAULT_PIECES
    unknown = [p for p in pieces if p not in (*BENCHES, "grid")]
    if unknown:
        sys.exit(f"unknown piece(s) {unknown}: choose from {', '.join((*BENCHES, 'grid'))}")
    grid.END[0] = time.time() + float(option("--deadline", "520")) + grid.GRACE_S
    if SMOKE:
        grid.STEPS = 2
    grid.BIG_JOBS = int(option("--big-jobs", str(grid.BIG_JOBS)))  # fewer when another piece shares the card
    context = 0 if SMOKE else grid.cuda_context_bytes()
    for piece in pieces:
        if piece == "grid":
            grid_piece(out_dir, int(option("--jobs", "4")), option("--only", ""), context)
        else:
            bench(piece, out_dir)


if __name__ == "__main__":
    main()
