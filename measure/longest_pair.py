"""Each stack's longest DPO pair under a memory cap, tried at the lengths given rather than searched from the
bench's length (`snugtune bench --max-context` doubles from --seq: too many 8B trials for one device call).

  python measure/longest_pair.py OUT_DIR --shape llama3-8b --cap 15 snugtune:25600,28672 trl:4096,6144,8192 ...
  python measure/longest_pair.py OUT_DIR --smoke      # shape tiny, the CPU, 2 steps: the check for typos

A stack's lengths run in the order given (tokens a sequence; a pair is two) as the bench's trials do
(bench.compare.run_stack on bench_config with long_pairs, 3 steps, 1 pair a micro-batch), until the first that
fails. Writes OUT_DIR/longest_pair.jsonl (one line a trial: stack, tokens a sequence, tokens/s, peak memory or
the error) as each ends, and prints each stack's longest that trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from snugtune.bench.compare import bench_config, long_pairs, run_stack
from snugtune.config import apply_overrides


def trials(out_dir: Path, shape: str, cap: float | None, device: str, plan: dict[str, list[int]], steps: int,
           deadline: float, overrides: list[str]) -> dict[str, int | None]:
    from snugtune.models.resolve import resolve_model
    resolve_model(f"shape:{shape}")  # the random-weight checkpoint, built once, outside every trial
    longest: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="longest-pair-") as tmp, \
            (out_dir / "longest_pair.jsonl").open("a") as log:
        work = Path(tmp)
        pairs_at: dict[int, Path] = {}  # one pairs file a length, whichever stacks try it
        for stack, lengths in plan.items():
            longest[stack] = None
            for tokens in lengths:
                if time.time() > deadline:
                    print(f"{stack} {tokens}: skipped (deadline)", flush=True)
                    break
                if tokens not in pairs_at:
                    pairs_at[tokens] = long_pairs(work / f"pairs-{tokens}", tokens)
                pairs = pairs_at[tokens]
                config = apply_overrides(bench_config(shape, tokens, 1, steps, cap, device, pairs=pairs), overrides)
                result = run_stack(stack, config, work)
                row = {"stack": stack, "shape": shape, "cap_gib": cap, "tokens_a_sequence": tokens,
                       "tokens_per_s": result.get("tokens_per_s_median_step"), "error": result.get("error"),
                       "peak_allocated_bytes": result.get("peak_allocated_bytes"),
                       "peak_reserved_bytes": result.get("peak_reserved_bytes"), "plan": result.get("plan")}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"{stack} 2 x {tokens:,}: " + (f"trains, {row['tokens_per_s']:,.0f} tok/s" if not row["error"]
                                                     else f"fails: {row['error'][-200:]}"), flush=True)
                if row["error"]:
                    break
                longest[stack] = tokens
    return longest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("plan", nargs="*", help="STACK:LEN,LEN,... (tokens a sequence, tried in order)")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--cap", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds from the start; no trial starts after")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plan = {s.split(":")[0]: [int(n) for n in s.split(":")[1].split(",")] for s in args.plan}
    shape, cap, device, steps = args.shape, args.cap, "auto", args.steps
    if args.smoke:
        shape, cap, device, steps = "tiny", None, "cpu", 2
        plan = {"snugtune": [64, 128], "trl": [64]}
        args.overrides = [*args.overrides, "train.optimizer=adamw_8bit"]
    longest = trials(args.out_dir, shape, cap, device, plan, steps, time.time() + args.deadline, args.overrides)
    for stack, tokens in longest.items():
        print(f"longest under {cap} GiB, {stack}: " + (f"2 x {tokens:,} tokens" if tokens else "none of those tried"))


if __name__ == "__main__":
    sys.exit(main())
