"""What is alive at a training run's peak GPU memory, grouped by the Python line that allocated it.

  python measure/memory_trace.py OUT.txt CONFIG [key=value ...]

Runs `snugtune train CONFIG overrides` in this process with torch's allocator history recorded, replays
the allocation trace to the moment of the largest allocated total after the model is loaded, and
writes the live tensors at that moment grouped by the first frame outside torch. This is how a
planner term is checked against what the engine really keeps (docs/planner.md).
"""

import os
import sys
from collections import defaultdict

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

MIB = 2**20


def _where(frames: list[dict]) -> str:
    """The first two frames outside torch's own Python files: the line that asked for the memory."""
    picked = [f for f in frames if "site-packages/torch/" not in f["filename"] and not f["filename"].startswith("<")]
    return " <- ".join(f"{f['filename'].split('site-packages/')[-1].split('/src/')[-1]}:{f['line']} {f['name']}"
                       for f in picked[:2]) or "(torch internals)"


def first_loss_allocation(trace: list[dict]) -> int:
    """Where the peak after loading is looked for: the first allocation made by the loss's own file."""
    return next((i for i, e in enumerate(trace) if e["action"] == "alloc"
                 and any("snugtune/loss.py" in f["filename"] for f in e["frames"])), 0)


def peak_report(trace: list[dict], start: int) -> list[str]:
    live: dict[int, tuple[int, list]] = {}
    total = best = 0
    best_index = -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event["frames"])
            total += event["size"]
        elif event["action"] in ("free_requested",) and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
        if i >= start and total > best:
            best, best_index = total, i
    live.clear()
    for event in trace[:best_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event["frames"])
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        g = groups[_where(frames)]
        g[0] += size
        g[1] += 1
    lines = [f"peak allocated in trace: {best / MIB:.1f} MiB at event {best_index} of {len(trace)}",
             f"triggering allocation: {_where(trace[best_index]['frames'])}"]
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"{size / MIB:10.1f} MiB {count:6d} blocks  {where}")
    return lines


def main() -> None:
    out, cfg, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")
    from snugtune.cli import app
    try:
        app(["train", cfg, *overrides, "-q", "--fresh"], standalone_mode=False)
    except (SystemExit, Exception) as exc:  # the trace up to a failure is still worth reading
        print(f"train ended with {exc!r}")
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][0]
    lines = [f"config: {cfg} {' '.join(overrides)}",
             f"torch max_memory_allocated: {torch.cuda.max_memory_allocated() / MIB:.1f} MiB"]
    lines += peak_report(trace, first_loss_allocation(trace))
    text = "\n".join(lines)
    print(text)
    with open(out, "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
