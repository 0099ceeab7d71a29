"""Where one optimizer step of `snugtune train` spends its time: the real engine (planner, fused LoRA,
compiled blocks, CUDA graphs), with torch.profiler around step STEP only.

  python benchmarks/train_step_profile.py OUT.txt STEP CONFIG.yaml [key=value ...]

Steps before STEP run as usual (warm-up, compilation, graph capture); OUT.txt gets the step's wall time,
kernel time, tokens, whether graphs replayed, and the kernels by total GPU time (top 45).
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from snugtune.engine import train as engine


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled(one_step, out: str, at: int):
    seen = [0]

    def step(run, position, *args, **kwargs):
        seen[0] += 1
        if seen[0] != at:
            return one_step(run, position, *args, **kwargs)
        _sync()
        tokens = position.tokens_trained
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            result = one_step(run, position, *args, **kwargs)
            _sync()
            wall = time.perf_counter() - start
        tokens = position.tokens_trained - tokens
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e6
        graphs = run.graphs and (len(run.graphs.graphs), run.graphs.failure)
        with open(out, "w") as f:
            f.write(f"{' '.join(sys.argv[1:])}\nwall {wall * 1e3:.1f} ms, kernels {busy * 1e3:.1f} ms, "
                    f"tokens {tokens}, {tokens / wall:.0f} tok/s; CUDA graphs (shapes, failure): {graphs}\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90))
        return result
    return step


def main() -> None:
    out, at = sys.argv[1], int(sys.argv[2])
    engine.one_step = profiled(engine.one_step, out, at)
    sys.argv = ["snugtune", "train", *sys.argv[3:], "--quiet", "--fresh"]
    from snugtune.cli import main as cli
    cli()


if __name__ == "__main__":
    main()
