"""Why did a CUDA-graph capture fail? Runs a recipe through `snugtune train` in this process, as the bench
runs it (random-weight shape, the bench's rows), and prints each capture's input shapes, "CAPTURE OK" or
"CAPTURE FAILED" with the Python traceback of the first operation the capture could not record (the CUDA
error that reaches engine.graphs, "operation failed due to a previous error during capture", names none).
Synchronising calls raise inside a capture (sync debug mode 'error'). With TORCH_LOGS=recompiles, dynamo
logs every block recompiled and why, which shows whether compilation happened during a capture.

  TORCH_LOGS=recompiles python3 measure/capture_probe.py examples/llama2-7b_qlora_t4.yaml llama2-7b 5 \\
      /tmp/probe train.micro_batch=1
  (recipe, shape, optimizer steps, output folder, then key=value overrides)

docs/runs/capture_failure_llama2-7b_guanaco_recipe_h200_2026-12-01.txt is its output for that recipe before
the fix in engine.graphs: a block recompiled inside the capture and Inductor benchmarked a kernel there.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import yaml

from snugtune.bench.compare import recipe_config
from snugtune.engine import graphs


def probing_capture(capture):
    def probe(self, static):
        print("CAPTURE", {k: tuple(v.shape) for k, v in static.items()}, "runs", dict(self.runs), flush=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = capture(self, static)
            print("CAPTURE OK", flush=True)
            return result
        except Exception:
            print("CAPTURE FAILED", flush=True)
            traceback.print_exc()
            raise
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return probe


def main(recipe: str, shape: str, steps: str, out: str, *overrides: str) -> None:
    from snugtune.cli import app
    graphs.StepGraphs._capture = probing_capture(graphs.StepGraphs._capture)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(recipe_config(Path(recipe), shape, int(steps), "cuda", overrides)))
    sys.argv = ["snugtune", "train", str(config), f"output_dir={folder / 'run'}", "--fresh", "--quiet", "--debug"]
    try:
        app()
    except SystemExit as stop:
        print("exit", stop.code)
    summary = json.loads((folder / "run" / "summary.json").read_text())
    print("cuda_graphs", summary.get("cuda_graphs"), "speedups", summary.get("speedups"))


if __name__ == "__main__":
    main(*sys.argv[1:])
