"""`snugtune bench`: snugtune's engine and the plain transformers+peft+bitsandbytes recipe (bench/plain.py),
each in its own process, on the same random-weight checkpoint and the same micro-batches; one table. Under
--objective dpo: snugtune's DPO beside TRL's DPOTrainer (bench/trl_dpo.py) and Unsloth's (bench/unsloth_dpo.py),
on the same pairs of standard-library code, every sequence max_seq_len (--seq) tokens long.

The setting is DESIGN §10's: QLoRA nf4 + double quant, LoRA r=16 α=32 on every linear layer, gradient
checkpointing, AdamW 8-bit, packed rows of the bundled stdlib data; tokens/s is the median of the warm
steps (the first three are warm-up) and counts real tokens. Beside each figure its model FLOP utilisation
(bench.mfu). --emulate t4 runs every stack as a T4 would (EMULATIONS: config fields, so snugtune plans and
trains through `train`'s own path).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from snugtune.bench.mfu import planned_decisions, utilisation
from snugtune.config import Config, apply_overrides, config_from_dict, read_config_mapping
from snugtune.errors import ConfigError
from snugtune.rundir import METRICS, SUMMARY, read_jsonl


CHARS_PER_TOKEN_BOUND = 8  # Python source tokenizes at 3-4 characters a token: 8 leaves a wide margin
LONGEST_BENCH_TOKENS = 262_144  # twice the longest context of a registry shape; the data for it is ~0.2 GB of text
# --emulate CARD: the config fields that make any GPU run that card's path (its precision, attention kernels and
# memory), for every stack; snugtune also plans for the card (its budget)
EMULATIONS = {
    "t4": ("train.precision=fp16", "train.attention_kernels=sm75", "budget=t4"),
}


def emulated(emulate: str | None, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The overrides of `--emulate CARD` (EMULATIONS), then the user's own."""
    if emulate is None:
        return overrides
    if emulate not in EMULATIONS:
        raise ConfigError(f"--emulate: '{emulate}' is not a card the bench emulates ({', '.join(EMULATIONS)})")
    return (*EMULATIONS[emulate], *overrides)


def long_documents(folder: Path, tokens: int, count: int = 24) -> Path:
    """`count` documents of real code, each at least `tokens` tokens long, written into folder: the
    largest modules of this Python's standard library, concatenated, each document starting at a
    different module. Every row then holds one document truncated to the row's length (no packing: plain
    causal attention, as one long file is trained)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: -p.stat().st_size)[:count]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    chars = CHARS_PER_TOKEN_BOUND * tokens
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(texts)):
        text = ""
        k = i
        while len(text) < chars:
            text += texts[k % len(texts)] + "\n"
            k += 1
        (folder / f"document-{i:02d}.py").write_text(text[:chars], encoding="utf-8")
    return folder


def long_pairs(folder: Path, tokens: int, count: int = 24) -> Path:
    """A file of `count` preference pairs of standard-library code (long_documents), each sequence longer than
    `tokens` tokens so that every one is cut to exactly that many: a prompt asking to continue a module from
    its first lines, chosen its continuation, rejected another module's. Conversational rows, which every
    stack renders with the model's chat template (the same tokens)."""
    documents = sorted(long_documents(folder / "documents", 2 * tokens, count).glob("*.py"))
    texts = [path.read_text(encoding="utf-8") for path in documents]
    start = min(tokens, 4000)  # characters of the prompt: a few hundred tokens, less than max_seq_len
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    rows = [{"prompt": turn("user", f"Continue this module:\n\n{text[:start]}"),
             "chosen": turn("assistant", text[start:]),
             "rejected": turn("assistant", texts[(i + 1) % len(texts)][start:])} for i, text in enumerate(texts)]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def bench_config(shape: str, seq: int, batch: int, steps: int, cap_gib: float | None, device: str,
                 long_text: Path | None = None, pairs: Path | None = None) -> dict:
    """The bench's run: packed rows of the bundled stdlib functions, or (long_text, from long_documents) one
    document of standard-library code per row, truncated to `seq` tokens, for long-context runs; or (pairs,
    from long_pairs) DPO on pairs whose every sequence is cut to `seq` tokens."""
    data = {"path": str(Path(str(resources.files("snugtune") / "bundled" / "stdlib_functions.jsonl"))),
            "format": "alpaca", "eval_fraction": 0.02}
    if long_text is not None:
        data = {"path": str(long_text), "format": "text", "eval_fraction": 0.1}
    if pairs is not None:
        data = {"path": str(pairs), "format": "preference", "eval_fraction": 0.05}
    return {"model": f"shape:{shape}", "data": data, **({"objective": "dpo"} if pairs is not None else {}),
            "max_seq_len": seq, "method": "qlora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
            "quant": {"type": "nf4", "double_quant": True},
            "train": {"max_steps": steps, "micro_batch": batch, "grad_accum": 1, "lr": 2e-4,
                      "optimizer": "adamw_8bit", "grad_checkpointing": True, "warmup": 0,
                      "scheduler": "constant"},  # as the plain recipe's loop: losses compare step by step
            "save": {"every_steps": 100000}, "eval": {"max_batches": 1},
            "budget": f"{cap_gib}GiB" if cap_gib else "auto", "device": device}


def recipe_config(recipe: Path, shape: str, steps: int, device: str, overrides: tuple[str, ...] = (),
                  pairs: Path | None = None) -> dict:
    """A shipped recipe as the bench runs it: its method, LoRA, quantization, micro-batch, accumulation,
    optimizer, schedule, length, objective and budget as written (then `overrides`, key=value), on the
    random-weight `shape` and the bench's rows (a preference recipe: `pairs`, from long_pairs), for `steps`
    optimizer steps. `micro_batch: auto` becomes the recipe's rows_per_step (the other stacks have no planner
    to split it; --set train.micro_batch=N splits it)."""
    raw = read_config_mapping(Path(recipe))
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{recipe}: train must be a mapping of keys, not a {type(train).__name__}")
    base = bench_config(shape, 2048, 1, steps, None, device, pairs=pairs)
    raw.pop("output_dir", None)
    raw.setdefault("max_seq_len", Config.model_fields["max_seq_len"].default)  # every stack reads the length
    raw["train"] = {**train, "max_steps": steps}
    raw["train"].pop("epochs", None)
    if raw["train"].get("micro_batch") == "auto":  # every stack trains the same micro-batches: one a step
        raw["train"]["micro_batch"] = raw["train"].get("rows_per_step") or 1
    raw.update({k: base[k] for k in ("model", "data", "save", "eval", "device")})
    return apply_overrides(raw, list(overrides))


def _snugtune(config_path: Path, work: Path) -> dict:
    run = work / "snugtune-run"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(config_path), f"output_dir={run}",
                           "--quiet", "--fresh"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "exit_code": proc.returncode}
    summary = json.loads((run / SUMMARY).read_text())
    steps = read_jsonl(run / METRICS)
    speeds = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r][3:] or \
        [r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
    return {"tokens_per_s_median_step": statistics.median(speeds),
            "peak_allocated_bytes": summary.get("peak_allocated_bytes"),
            "peak_reserved_bytes": summary["peak_memory_bytes"] if summary.get("peak_allocated_bytes") else None,
            "loss_last": summary["train_loss_final"], "device": summary["device"], "plan": summary.get("plan"),
            "speedups": summary.get("speedups"), "cuda_graphs": summary.get("cuda_graphs"),
            "precision": summary.get("precision")}


def _other_stack(module: str, config_path: Path, work: Path) -> dict:
    """Run bench.plain or bench.unsloth_stack in its own process on the same config; its JSON result."""
    out = work / f"{module}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local checkpoints only
    proc = subprocess.run([sys.executable, "-m", f"snugtune.bench.{module}", str(config_path), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": "out of memory" if "OutOfMemory" in proc.stderr else last, "exit_code": proc.returncode}
    return json.loads(out.read_text())


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def run_stack(stack: str, config: dict, work: Path) -> dict:
    """One stack on one config, in its own process: snugtune, plain or unsloth; with its FLOP utilisation."""
    result = _run_stack(stack, config, work)
    if "error" not in result:
        result.update(utilisation(config, stack, result))
    return result


def _run_stack(stack: str, config: dict, work: Path) -> dict:
    config_path = work / f"{stack}-{config['max_seq_len']}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    if stack == "snugtune":
        return _snugtune(config_path, work)
    dpo = config.get("objective") == "dpo"
    if stack == ("trl" if dpo else "plain"):
        return _other_stack("trl_dpo" if dpo else "plain", config_path, work)
    if stack != "unsloth":
        known = "trl, unsloth under --objective dpo" if dpo else "plain, unsloth (trl: under --objective dpo)"
        return {"error": f"unknown stack {stack} ({known})", "unavailable": True}
    if importlib.util.find_spec("unsloth") is None:
        return {"error": "unsloth is not installed here (../shared/tools/device-site.sh --unsloth carries it to "
                         "the GPU machine)", "unavailable": True}
    if config["device"] == "cpu" or not _cuda_available():
        return {"error": "unsloth needs a GPU", "unavailable": True}
    return _other_stack("unsloth_dpo" if dpo else "unsloth_stack", config_path, work)


def longest_context(trains, start: int, limit: int, granularity: int = 1024) -> tuple[int | None, dict | None]:
    """The longest sequence (a multiple of `granularity` from `start` up to `limit`) at which trains(seq)
    returns a result without "error": doubling until a failure, then bisection. (length, its result)."""
    best, best_result, failed = None, None, None
    seq = start
    while seq <= limit:
        result = trains(seq)
        if "error" in result:
            failed = seq
            break
        best, best_result = seq, result
        seq *= 2
    if best is None:
        return None, None
    high = failed if failed is not None else min(seq, limit + granularity)
    while high - best > granularity:
        mid = (best + high) // 2 // granularity * granularity
        if mid <= best:
            break
        result = trains(mid)
        if "error" in result:
            high = mid
        else:
            best, best_result = mid, result
    return best, best_result


def checked_settings(shape: str, seq: int, batch: int, steps: int, cap_gib: float | None, device: str,
                     recipe: Path | None, overrides: tuple[str, ...], max_context: int | None, objective: str):
    """The benched run's Config, validated before any checkpoint or data is built (ConfigError naming the
    recipe, or the bench's options, otherwise), the lengths the bench would build data for bounded."""
    if recipe:
        raw, source = recipe_config(recipe, shape, steps, device, overrides), f"{recipe} with the bench's settings"
    else:
        if cap_gib is not None and not cap_gib > 0:
            raise ConfigError(f"bench: --cap must be a number of GiB above 0, not {cap_gib}")
        pairs = Path("pairs.jsonl") if objective != "sft" else None  # not read: the config names its objective
        raw = apply_overrides(bench_config(shape, seq, batch, steps, cap_gib, device, pairs=pairs), list(overrides))
        source = "bench (--seq is max_seq_len, --batch train.micro_batch, --steps train.max_steps, --cap budget)"
    settings = config_from_dict(raw, source=source)
    for name, tokens in (("max_seq_len", settings.max_seq_len), ("--max-context", max_context)):
        if tokens is not None and not 8 <= tokens <= LONGEST_BENCH_TOKENS:
            raise ConfigError(f"{source}: {name} must be 8 to {LONGEST_BENCH_TOKENS:,} tokens for the bench, "
                              f"not {tokens:,}")
    return settings


def benched_objective(settings: Config, recipe: Path | None, asked: str) -> str:
    """What the bench trains: a recipe's own objective (after --set), else --objective; ConfigError for one it
    does not bench, or a --set objective= that contradicts --objective."""
    if recipe:
        if settings.objective not in STACKS:
            raise ConfigError(f"{recipe}: the bench trains SFT rows or preference pairs; a {settings.objective} "
                              f"recipe is not benched")
        return settings.objective
    if settings.objective != asked:
        raise ConfigError(f"--set objective={settings.objective}: the bench's objective is --objective ({asked})")
    return asked


# the stacks benched beside snugtune under each objective, the default first (ORPO: none has its bench here)
STACKS = {"sft": ("plain", "unsloth"), "dpo": ("trl", "unsloth"), "orpo": ()}


def checked_stacks(against: tuple[str, ...] | None, objective: str) -> tuple[str, ...]:
    """The stacks to bench beside snugtune: `against`, or the objective's default; ConfigError naming an unknown one."""
    if against is None:
        return STACKS[objective][:1]
    for stack in against:
        if stack not in STACKS[objective]:
            raise ConfigError(f"--against: '{stack}' is not a stack the bench runs under {objective} "
                              f"({', '.join(STACKS[objective]) or 'none'}; empty: snugtune alone)")
    return tuple(dict.fromkeys(against))  # each once


def check_json_target(path: Path) -> None:
    """Refuse (ConfigError) a --json path the results could not be written to, a link, or a file there that is
    not an earlier bench's results (the bench replaces only what a bench wrote)."""
    if path.is_symlink():
        raise ConfigError(f"--json {path}: a link; give the file's own path")
    if path.is_dir():
        raise ConfigError(f"--json {path}: a folder; give a file path")
    if not path.parent.is_dir():
        raise ConfigError(f"--json {path}: the folder {path.parent} does not exist")
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and isinstance(earlier.get("setting"), dict) and "snugtune" in earlier):
            raise ConfigError(f"--json {path}: the file exists and is not a bench's results; it is left as it is")
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")  # the results are written beside it, then renamed
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--json {path}: cannot write in {path.parent} ({err.strerror})") from None


def run_bench(shape: str = "llama3-8b", seq: int = 2048, batch: int = 1, steps: int = 8,
              against: tuple[str, ...] | None = None, cap_gib: float | None = None, device: str = "auto",
              max_context: int | None = None, recipe: Path | None = None, overrides: tuple[str, ...] = (),
              one_document: bool = False, emulate: str | None = None, objective: str = "sft") -> dict:
    """{stack: result} for snugtune and each stack in `against` (plain, unsloth), each in its own process
    on the same checkpoint and rows. max_context: also find each stack's longest single sequence (one long
    document of standard-library code per row, see long_documents) that trains under the cap, up to this
    many tokens. recipe: a config file's settings instead of the bench's own (recipe_config; seq, batch
    and cap then come from it). one_document: rows of one long document each instead of packed samples.
    emulate: a card of EMULATIONS every stack runs as (its overrides come before `overrides`).
    objective dpo: pairs (long_pairs) of `seq` tokens a sequence, `batch` pairs a micro-batch; max_context
    then finds each stack's longest pair."""
    overrides = emulated(emulate, overrides)
    if cap_gib is not None and (recipe or emulate):
        raise ConfigError("--cap: a recipe's budget is its own and --emulate plans for the card's memory "
                          "(--set budget=... changes either)")
    if max_context and recipe:
        raise ConfigError("--max-context searches the bench's own settings, not a recipe's")
    settings = checked_settings(shape, seq, batch, steps, cap_gib, device, recipe, overrides, max_context, objective)
    objective = benched_objective(settings, recipe, objective)  # a recipe's own, as its length and budget are
    against = checked_stacks(against, objective)
    seq = settings.max_seq_len
    results: dict = {"setting": {"shape": shape, "seq": seq, "batch": batch, "steps": steps, "cap_gib": cap_gib,
                                 "max_context": max_context, "recipe": str(recipe) if recipe else None,
                                 "overrides": list(overrides), "one_document": one_document, "emulate": emulate,
                                 "objective": objective}}
    with tempfile.TemporaryDirectory(prefix="snugtune-bench-") as tmp:
        work = Path(tmp)
        # build the random-weight checkpoint once, outside every measurement
        from snugtune.models.resolve import resolve_model
        resolve_model(f"shape:{shape}")
        stacks = ("snugtune", *against)
        documents = long_documents(work / "documents", seq) if one_document else None
        pairs = long_pairs(work / "pairs", seq) if objective != "sft" else None
        config = recipe_config(recipe, shape, steps, device, overrides, pairs) if recipe else \
            apply_overrides(bench_config(shape, seq, batch, steps, cap_gib, device, documents, pairs), list(overrides))
        for stack in stacks:
            results[stack] = run_stack(stack, config, work)
        if max_context:
            documents = long_documents(work / "long", max_context) if objective == "sft" else None
            pairs = long_pairs(work / "long-pairs", max_context) if objective != "sft" else None
            for stack in stacks:
                if results[stack].get("unavailable"):  # a stack that cannot run here has no longest sequence
                    continue
                trial = lambda n: run_stack(stack, {**apply_overrides(bench_config(  # noqa: E731
                    shape, n, 1, 3, cap_gib, device, documents, pairs), list(overrides)), "max_seq_len": n}, work)
                length, at_length = longest_context(trial, min(seq, max_context), max_context,
                                                    granularity=min(1024, seq))
                results[stack]["longest_context_tokens"] = length
                results[stack]["tokens_per_s_at_longest"] = at_length["tokens_per_s_median_step"] if at_length else None
    return results


def format_table(results: dict) -> str:
    """The bench's table: per stack tokens/s, its model FLOP utilisation (and with recomputation), memory, the
    last loss and the longest sequence; then what snugtune's planner predicted for the card it planned for."""
    rows = ["| stack | tokens/s (median step) | MFU (with recompute) | peak allocated | peak reserved | last loss | "
            "longest sequence under the cap (tokens/s there) |", "|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"  # noqa: E731
    for stack, r in results.items():
        if stack == "setting":
            continue
        longest = "-"
        if r.get("longest_context_tokens"):
            longest = f"{r['longest_context_tokens']:,} ({r['tokens_per_s_at_longest']:,.0f})"
        if "error" in r:
            rows.append(f"| {stack} | {r['error']} | | | | | {longest} |")
            continue
        mfu = f"{r['mfu']:.1%} ({r['mfu_with_recompute']:.1%})" if r.get("mfu") is not None else "-"
        rows.append(f"| {stack} | {r['tokens_per_s_median_step']:,.0f} | {mfu} | {gib(r.get('peak_allocated_bytes'))} | "
                    f"{gib(r.get('peak_reserved_bytes'))} | {r['loss_last']:.4f} | {longest} |")
    return "\n".join(rows + planned_lines(results.get("snugtune", {})))


def planned_lines(result: dict) -> list[str]:
    """snugtune's plan beside what it measured: the step time its model predicted for the card planned for."""
    plan = result.get("plan") or {}
    if not plan.get("predicted_step_seconds") or "error" in result:
        return []
    predicted = plan["predicted_step_seconds"]
    tokens = planned_decisions(plan["settings"]).tokens * plan.get("grad_accum", 1)  # a pair's both sequences
    line = (f"\nplanned for {plan['card']}: predicted {predicted:.3f} s a step ({tokens / predicted:,.0f} tok/s at "
            f"full rows), on {result['device']}")
    return [line + f"; {result['model_flops_per_token'] / 1e9:.2f} GFLOP a token for the model, "
                   f"{result['recompute_flops_per_token'] / 1e9:.2f} recomputed"]
