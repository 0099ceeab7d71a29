"""Where a plan runs out of memory: `snugtune train` with the probe step watched. Instead of stepping down
after an out-of-memory error, print its traceback and the allocator's state and exit 9; otherwise print the
probe's peak and train on. Memory in use is printed before and after the probe's training step and its
evaluation batch.

  python measure/probe_memory.py CONFIG.yaml [key=value ...]
  python measure/probe_memory.py --long-documents 98304 --budget 21 --real-cap 15 [key=value ...]
  python measure/probe_memory.py ... --trace OUT.txt

--long-documents N: the bench's long-context run (llama3-8b shape, one standard-library document of N
tokens a row, 3 steps) instead of a config file. --real-cap GiB: plan for the config's budget but cap the
process at this: whether a plan the planner refuses at the smaller budget really does not fit. --trace FILE:
record the allocator's history and write what is alive at the probe's peak (at the out-of-memory error if
there is one), grouped by the line that allocated it (measure/memory_trace.py's report).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# as the CLI sets it, before --trace's recording starts the allocator
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402
import yaml  # noqa: E402

from snugtune.engine import recovery, train as engine  # noqa: E402
from snugtune.memory_rules import CUDA_CONTEXT_BYTES  # noqa: E402

GIB = 2**30


def memory(tag: str) -> None:
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    print(f"{tag}: allocated {torch.cuda.memory_allocated() / GIB:.2f} GiB, "
          f"peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB", flush=True)


def watched(function, tag: str):
    def call(*args, **kwargs):
        memory(f"before {tag}")
        result = function(*args, **kwargs)
        memory(f"after {tag}")
        return result
    return call


def write_trace(path: str | None) -> None:
    if not path:
        return
    from memory_trace import first_loss_allocation, peak_report
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    Path(path).write_text("\n".join(peak_report(trace, first_loss_allocation(trace))) + "\n")
    print(f"trace of the probe's peak written to {path}", flush=True)


def watched_probe(probe, trace_path: str | None):
    def call(run):
        plan = run.plan
        print("plan:", plan and {part.label: round(size / GIB, 2) for part, size in plan.breakdown.items()},
              flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            probe(run)
        except torch.OutOfMemoryError:
            traceback.print_exc()
            print(torch.cuda.memory_summary(abbreviated=True))
            write_trace(trace_path)
            sys.exit(9)
        memory("probe passed")
        write_trace(trace_path)
    return call


def capped_at(gib: float):
    def cap(device, budget):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction((gib * GIB - CUDA_CONTEXT_BYTES) / total, device)
        return f"memory capped at {gib} GiB (planned for {budget})"
    return cap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--long-documents", type=int)
    parser.add_argument("--budget", type=float, default=15.0, help="GiB, with --long-documents")
    parser.add_argument("--real-cap", type=float)
    parser.add_argument("--trace", help="write what is alive at the probe's peak to this file")
    args = parser.parse_args()
    overrides = args.overrides
    if args.long_documents:
        from snugtune.bench.compare import bench_config, long_documents
        work = Path(f"/tmp/probe_memory_{args.long_documents}")
        docs = long_documents(work / "docs", args.long_documents)
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump(bench_config("llama3-8b", args.long_documents, 1, 3, args.budget,
                                                           "auto", docs)))
        overrides = ([args.config] if args.config else []) + overrides + [f"output_dir={work}/run"]
    else:
        config_path = Path(args.config)
    if args.trace:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")
    recovery.probe = watched_probe(recovery.probe, args.trace)
    recovery.accumulate_gradients = watched(recovery.accumulate_gradients, "the training step")
    if args.real_cap:
        engine.cap_memory = capped_at(args.real_cap)
    sys.argv = ["snugtune", "train", str(config_path), *overrides, "--fresh"]
    from snugtune.cli import main as cli
    cli()


if __name__ == "__main__":
    main()
