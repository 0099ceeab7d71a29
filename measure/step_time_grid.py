"""The step-time model and `auto`'s choices on one card, one configuration at a time (nothing else on the GPU).

  python measure/step_time_grid.py OUT_DIR [--deadline S] [--runner-up-every K] [--only SUBSTRING[,SUBSTRING...]] [--steps N]
  python measure/step_time_grid.py OUT_DIR --smoke       # every configuration on shape:tiny, 2 steps, the CPU

Each configuration is a `snugtune bench`-style run (packed standard-library rows, or one document a row) left to
the planner (micro_batch, checkpointing, CUDA graphs, dense copy, offload: auto) and trained by `snugtune train`
in its own process. Its plan is recomputed here first, from the same facts `train` plans from (the data's
trained positions, whether rows carry a mask), with every candidate the planner weighed; on every K-th
configuration the runner-up (the planner's second-fastest plan that fits at the chosen level) is trained too,
all its planned fields set, so the two measured step times say whether `auto` picked the faster.

Out (OUT_DIR/step_time_grid.jsonl, one JSON line per run as it finishes):
- kind "step_time_row": the measured seconds per optimizer step (real tokens of each warm step, after the
  eager warm-ups and captures, over its tokens/s; the median) beside its Decisions, in the rows format of
  docs/runs/step_time_rows.jsonl (copy it to docs/runs/step_time_grid_<card>_<date>.jsonl, then
  `python measure/step_time_fit.py collect`);
- kind "runner_up": chosen vs runner-up, predicted and measured, and whether the chosen was the faster.
The last lines printed: each row's predicted / measured, how many within +-25%, and auto's score.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time_fit import describe, predicted_seconds  # noqa: E402

from snugtune.bench.compare import EMULATIONS, bench_config, long_documents  # noqa: E402
from snugtune.config import apply_overrides, config_from_dict, config_to_yaml  # noqa: E402

T4 = list(EMULATIONS["t4"])
CAP15 = ["budget=15GiB"]
# (name, shape, tokens per row, rows per step, one document a row, overrides), fastest first: each a setting the
# planner decides differently (graphs, copy, recomputation, offload, tiling) or a T4 profile
GRID = [
    ("smollm2 2048x8", "smollm2-135m", 2048, 8, False, []),
    ("tinyllama 512x4 t4", "tinyllama-1.1b", 512, 4, False, T4),
    ("tinyllama 512x16", "tinyllama-1.1b", 512, 16, False, []),
    ("llama3.2-1b 8192x1 document", "llama3.2-1b", 8192, 1, True, []),
    ("tinyllama 2048x8 t4", "tinyllama-1.1b", 2048, 8, False, T4),
    ("llama3.2-1b 4096x4 15GiB", "llama3.2-1b", 4096, 4, False, CAP15),
    ("llama2-7b 512x8 t4", "llama2-7b", 512, 8, False, T4),
    ("llama3-8b 2048x1 15GiB", "llama3-8b", 2048, 1, False, CAP15),
    ("llama3-8b 4096x1", "llama3-8b", 4096, 1, False, []),
    ("llama3-8b 16384x1 document 15GiB", "llama3-8b", 16384, 1, True, CAP15),
]
WARM_FROM = 3         # steps before this index warm up (two eager runs, then a graph capture); a second batch
                      # shape warms up later: 16 steps leave its eager runs a minority of the timed ones
TIMEOUT_S = 300
END = [float("inf")]  # no run goes past this time (set in main from --deadline, plus GRACE_S)
GRACE_S = 60


def gpu() -> tuple[str, int] | None:
    """(name, memory in bytes) of the GPU, from nvidia-smi: this process never starts CUDA (its context would
    sit on the card beside every measured run)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, mib = out[0].rsplit(",", 1)
    return name.strip(), int(mib) * 2**20


def grid_config(entry: tuple, steps: int, device: str, documents: Path | None, smoke: bool) -> dict:
    """The run a grid entry asks for: the bench's rows, every planned setting left to the planner."""
    name, shape, seq, rows, one_document, overrides = entry
    if smoke:
        shape, seq = "tiny", min(seq, 128)
    raw = bench_config(shape, seq, rows, steps, None, device, documents if one_document else None)
    auto = ["train.micro_batch=auto", f"train.rows_per_step={rows}", "train.grad_accum=1",
            "train.grad_checkpointing=auto", "train.cuda_graphs=auto", "quant.dense_copy=auto", "train.log_every=1"]
    budget = ["budget=h100"] if smoke else []  # the CPU has no card: plan for one, as a dry run does
    return apply_overrides(raw, auto + budget + list(overrides))


def step_tokens(cfg) -> tuple[list[int], list]:
    """Real tokens of each optimizer step (what `train` counts in tokens/s), and epoch 0's rows, from the same
    pipeline (epoch 0's order repeated: the grid's steps stay within an epoch or two)."""
    from snugtune.data.batches import epoch_rows
    from snugtune.data.prepare import prepare_data
    from snugtune.models.cache import default_cache_dir
    from snugtune.models.embedded import embedded_tokenizer_dir
    from snugtune.models.load import load_tokenizer
    # every shape model carries the embedded tokenizer: reading it builds no checkpoint (which would start CUDA
    # here, and hold the card's memory beside every run)
    tokenizer = load_tokenizer(embedded_tokenizer_dir(default_cache_dir()))
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
    rows = epoch_rows(data.train, cfg.train.seed, 0, cfg.max_seq_len if cfg.data.packing else None)
    real = [sum(len(s.input_ids) for s in row) for row in rows] * (1 + cfg.train.max_steps * cfg.train.step_rows
                                                                   // max(1, len(rows)))
    per = cfg.train.step_rows
    return [sum(real[k * per:(k + 1) * per]) for k in range(cfg.train.max_steps)], rows


def planned(cfg, card: tuple[str, int] | None):
    """(chosen plan, runner-up Decisions or None): the planner's search on the facts `train` plans from."""
    from snugtune.data.batches import trained_tokens_per_row
    from snugtune.memory_rules import rows_masked
    from snugtune.objectives import SUPERVISED
    from snugtune.planner.cards import budget_bytes, has_varlen_attention
    from snugtune.planner.choose import RunFacts, host_memory_available, search
    from snugtune.planner.inventory import inventory_for
    from snugtune.planner.memory import host_bytes, peak
    from snugtune.planner.plan import SAFETY
    _, rows = step_tokens(cfg)
    if cfg.budget == "auto" and card:
        name, size = card
    else:
        size, _, name = budget_bytes(cfg.budget)
    varlen = card is not None and has_varlen_attention(card[0]) and cfg.train.attention_kernels == "auto"
    facts = RunFacts(sorted(trained_tokens_per_row(rows), reverse=True),
                     masked=rows_masked(cfg.data.packing, varlen, any(len(r) > 1 for r in rows)), cuda=card is not None,
                     lengths_vary=SUPERVISED.lengths_vary(rows, 8))  # as `train` judges its rows (grid rows are SFT)
    inv = inventory_for(cfg)
    host = host_memory_available()
    plan, weighed = search(cfg, inv, size, name, facts, host, SAFETY * size)
    if plan is None:
        return None, None
    d = plan.decisions
    same_level = [c for c in weighed if (c.decisions.offload_activations, c.decisions.stream_weights,
                                         c.decisions.embeddings_on_host, c.decisions.shards) ==
                  (d.offload_activations, d.stream_weights, d.embeddings_on_host, d.shards)
                  and peak(c.parts) <= SAFETY * size and host_bytes(c.parts) <= 0.9 * host and c.decisions != d]
    runner = min(same_level, key=lambda c: c.seconds) if same_level else None
    return plan, runner


def train(raw: dict, work: Path, name: str) -> dict:
    """`snugtune train` on raw in its own process: its summary, or the error."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = work / f"{name}-run"
    timeout = max(1.0, min(TIMEOUT_S, END[0] - time.time()))
    try:
        proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(path), f"output_dir={run}", "-q",
                               "--fresh"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": json.loads((run / "summary.json").read_text()),
            "rates": [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]}


def measured_seconds(result: dict, tokens: list[int]) -> float | None:
    """Median seconds of the warm steps: each step's real tokens over its tokens/s."""
    seconds = [t / r for t, r in zip(tokens, result["rates"]) if r > 0]
    return statistics.median(seconds[min(WARM_FROM, len(seconds) - 1):]) if seconds else None


def measured_row(entry_name: str, cfg, result: dict, tokens: list[int]) -> dict | None:
    """A step_time_row from a finished run (its plan's Decisions, its measured seconds)."""
    seconds = measured_seconds(result, tokens)
    if seconds is None:
        return None
    plan = result["summary"]["plan"]
    return {"kind": "step_time_row", "source": f"step_time_grid: {entry_name}", "device": result["summary"]["device"],
            "model": cfg.model.removeprefix("shape:"), "decisions": plan["settings"], "grad_accum": plan["grad_accum"],
            "tokens_per_step": statistics.median(tokens[min(WARM_FROM, len(tokens) - 1):]), "measured_step_s": seconds,
            "held": True, "reason": None,
            # what a row far from its prediction needs looked at: every step's rate, and whether graphs replayed
            "tokens_per_s": result["rates"], "cuda_graphs": result["summary"].get("cuda_graphs"),
            "speedups": result["summary"].get("speedups")}


def one_entry(entry: tuple, args, card, documents: Path | None, out: Path, log, index: int) -> None:
    raw = grid_config(entry, args["steps"], args["device"], documents, args["smoke"])
    cfg = config_from_dict(raw)
    assert cfg.model.startswith("shape:"), "the grid runs registry shapes (step_tokens reads their tokenizer)"
    tokens, _ = step_tokens(cfg)
    plan, runner = planned(cfg, card)
    chosen = train(raw, out / "runs", f"g{index}")
    row = measured_row(entry[0], cfg, chosen, tokens) if "error" not in chosen else None
    log({"kind": "step_time_row", "source": f"step_time_grid: {entry[0]}",
         "error": chosen.get("error", "no step timed")} if row is None else row)
    if row is None or runner is None or index % args["every"]:
        return
    forced = yaml.safe_load(config_to_yaml(runner_config(cfg, runner.decisions)))
    second = train(forced, out / "runs", f"g{index}-runner-up")
    other = measured_row(entry[0] + " (runner-up)", cfg, second, tokens) if "error" not in second else None
    if other is None:
        log({"kind": "runner_up", "name": entry[0], "error": second.get("error", "no warm steps")})
        return
    log(other)
    log({"kind": "runner_up", "name": entry[0], "chosen": describe(row), "runner_up": describe(other),
         "chosen_predicted_s": plan.step_seconds, "runner_up_predicted_s": runner.seconds,
         "chosen_measured_s": row["measured_step_s"], "runner_up_measured_s": other["measured_step_s"],
         "chosen_faster": row["measured_step_s"] <= other["measured_step_s"],
         "same_plan_as_train": _same(plan.decisions, row["decisions"])})


def runner_config(cfg, decisions):
    from snugtune.planner.plan import resolved_config
    return resolved_config(cfg, decisions)


def _same(decisions, settings: dict) -> bool:
    mine = {**asdict(decisions), "lora_targets": list(decisions.lora_targets)}
    return all(settings.get(k) == v for k, v in mine.items() if k != "trained_tokens")


def report(rows: list[dict]) -> str:
    measured = [r for r in rows if r.get("kind") == "step_time_row" and "measured_step_s" in r]
    lines = [f"{predicted_seconds(r) / r['measured_step_s']:5.2f}  {r['measured_step_s']:8.3f} s  {r['source']}: "
             f"{describe(r)}" for r in measured]
    inside = sum(abs(predicted_seconds(r) / r["measured_step_s"] - 1) <= 0.25 for r in measured)
    duels = [r for r in rows if r.get("kind") == "runner_up" and "chosen_faster" in r]
    lines.append(f"step time within +-25%: {inside} of {len(measured)}; auto chose the faster plan in "
                 f"{sum(r['chosen_faster'] for r in duels)} of {len(duels)}")
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv
    smoke = "--smoke" in argv
    option = lambda name, default: type(default)(argv[argv.index(name) + 1]) if name in argv else default  # noqa: E731
    args = {"smoke": smoke, "steps": option("--steps", 2 if smoke else 16), "every": option("--runner-up-every", 2),
            "device": "cpu" if smoke else "auto"}
    deadline = time.time() + option("--deadline", 420.0)
    END[0] = deadline + GRACE_S
    only = option("--only", "")
    card = None if smoke else gpu()
    entries = [e for e in GRID if any(part in e[0] for part in only.split(","))]
    longest = max((e[2] for e in entries if e[4]), default=0)
    documents = long_documents(out / "documents", 2 * (128 if smoke else longest), count=1) if longest else None
    rows: list[dict] = []
    with (out / "step_time_grid.jsonl").open("a") as handle:
        def log(row: dict) -> None:
            rows.append(row)
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "decisions"}), flush=True)
        for index, entry in enumerate(entries):
            if time.time() > deadline:
                log({"kind": "skipped", "name": entry[0], "why": "past the deadline"})
                continue
            one_entry(entry, args, card, documents, out, log, index)
    (out / "report.txt").write_text(report(rows) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()
