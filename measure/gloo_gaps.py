"""The gaps table of docs/distributed.md ("What the tests hold"): how far each two-process gloo run of
tests/engine/test_distributed.py lands from its one-process reference.

    pytest tests/engine/test_distributed.py --basetemp=/tmp/gloo-runs
    python3 measure/gloo_gaps.py /tmp/gloo-runs/gloo0

Per run: the largest relative gap of the logged losses and grad norms, of AdamW's first moments after step 1
and after the later steps (the gradients, see the tests), and the largest absolute gap of the final adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def logged(run: Path, key: str) -> list[float]:
    return [row[key] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in row]


def moments(run: Path, step: int) -> list[torch.Tensor]:
    state = torch.load(run / "checkpoints" / f"step-{step}" / "state.pt", weights_only=True)["optimizer"]["state"]
    return [state[i]["exp_avg"].reshape(-1) for i in sorted(state)]


def relative(a: list, b: list) -> float:
    return max(abs(x - y) for x, y in zip(a, b)) / max(abs(x) for x in a)


def moment_gap(one: Path, two: Path, step: int) -> float:
    a, b = moments(one, step), moments(two, step)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(float(x.abs().max()) for x in a)


def gaps(one: Path, two: Path) -> dict:
    steps = json.loads((one / "summary.json").read_text())["steps"]
    wa, wb = (load_file(str(run / "adapter_model.safetensors")) for run in (one, two))
    return {"loss": relative(logged(one, "loss"), logged(two, "loss")),
            "grad_norm": relative(logged(one, "grad_norm"), logged(two, "grad_norm")),
            "gradients_step_1": moment_gap(one, two, 1),
            "gradients_later": [moment_gap(one, two, step) for step in range(2, steps + 1)],
            "adapter": max(float((wa[k] - wb[k]).abs().max()) for k in wa)}


def pairs(root: Path) -> dict[str, Path]:
    """Two-process run -> its one-process reference, by the test's folder names."""
    found = {}
    for two in sorted(p for p in root.iterdir() if (p / "summary.json").is_file() and not p.name.startswith("one_")):
        if "tail" in two.name:
            found[two.name] = root / f"one_{two.name.split('_', 1)[1]}"
        else:
            summary = json.loads((two / "summary.json").read_text())
            compiled = "_compiled" if summary["speedups"]["compiled_blocks"] else ""
            found[two.name] = root / f"one_{summary['method']}_{summary['precision']}{compiled}"
    return found


def main() -> None:
    root = Path(sys.argv[1])
    print(json.dumps({two: gaps(one, root / two) for two, one in pairs(root).items()}, indent=1))


if __name__ == "__main__":
    main()
