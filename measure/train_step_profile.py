"""Where one optimizer step of `snugtune train` spends its time: the real engine (planner, fused LoRA,
compiled blocks, CUDA graphs), with torch.profiler around step STEP only.

  python measure/train_step_profile.py OUT.txt STEP CONFIG.yaml [key=value ...]

Steps before STEP run as usual (warm-up, compilation, graph capture); OUT.txt gets the step's wall time,
kernel time, tokens, whether graphs replayed, the kernels by total GPU time (top 45), the copies by
input shape, and which operators and Python lines issued the device-to-device memcpys.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from snugtune.data.batches import real_tokens
from snugtune.engine import train as engine


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled(out: str, at: int):
    """engine.train's accumulate_gradients and optimizer_step, with step `at` (both halves) under the profiler."""
    accumulate, step = engine.accumulate_gradients, engine.optimizer_step
    seen, held = [0], {}

    def accumulate_gradients(model, group, *args, **kwargs):
        seen[0] += 1
        if seen[0] != at:
            return accumulate(model, group, *args, **kwargs)
        _sync()
        held["tokens"] = sum(real_tokens(b) for b in group)
        held["graphs"] = args[5] if len(args) > 5 else kwargs.get("graphs")
        held["profile"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                                  with_stack=True).__enter__()
        held["start"] = time.perf_counter()
        return accumulate(model, group, *args, **kwargs)

    def optimizer_step(*args, **kwargs):
        result = step(*args, **kwargs)
        if seen[0] == at and "profile" in held:
            _sync()
            wall = time.perf_counter() - held["start"]
            prof = held.pop("profile")
            prof.__exit__(None, None, None)
            write_report(out, prof, wall, held["tokens"], held["graphs"])
        return result
    return accumulate_gradients, optimizer_step


def write_report(out: str, prof, wall: float, tokens: int, graphs) -> None:
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    graphs = graphs and (len(graphs.graphs), graphs.failure)
    with open(out, "w") as f:
        f.write(f"{' '.join(sys.argv[1:])}\nwall {wall * 1e3:.1f} ms, kernels {busy * 1e3:.1f} ms, "
                f"tokens {tokens}, {tokens / wall:.0f} tok/s; CUDA graphs (shapes, failure): {graphs}\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90))
        # copies by input shape: which tensors the device-to-device copies move
        by_shape = [e for e in prof.key_averages(group_by_input_shape=True)
                    if e.key in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy")]
        by_shape.sort(key=lambda e: -e.device_time_total)
        f.write("\ncopies by input shape (device ms, calls, shapes)\n")
        for e in by_shape[:25]:
            f.write(f"{e.device_time_total / 1e3:9.2f} {e.count:6d} {e.key} {e.input_shapes}\n")
        f.write("\ndevice-to-device memcpys by the operators and Python lines that issued them\n")
        for origin, (count, ms) in memcpy_origins(prof.events()).most_common(15):
            f.write(f"{ms:9.2f} {count:6d} {origin}\n")


def memcpy_origins(events) -> Counter:
    """'op < parent op < ... | python frames' -> [memcpys, device ms], for the DtoD memcpys among `events`."""
    found: dict[str, list] = {}
    for e in events:
        copies = [k for k in e.kernels if "DtoD" in k.name]
        if not copies:
            continue
        chain, parent = [], e
        while parent is not None and len(chain) < 6:
            chain.append(parent.name)
            parent = parent.cpu_parent
        frames = [line for line in (e.stack or []) if "snugtune" in line or "bitsandbytes" in line][:3]
        entry = found.setdefault(" < ".join(chain) + " | " + " ; ".join(frames), [0, 0.0])
        entry[0] += len(copies)
        entry[1] += sum(k.duration for k in copies) / 1e3
    return Counter({k: tuple(v) for k, v in found.items()})


def main() -> None:
    out, at = sys.argv[1], int(sys.argv[2])
    engine.accumulate_gradients, engine.optimizer_step = profiled(out, at)
    sys.argv = ["snugtune", "train", *sys.argv[3:], "--quiet", "--fresh"]
    from snugtune.cli import main as cli
    cli()


if __name__ == "__main__":
    main()
