"""Helpers for the tests that train with several gloo processes on the CPU: a tiny run's config, ranks
started as torchrun starts them, waiting for them, and comparing their runs with one process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def tiny_run(data: Path, out: Path, method: str = "lora", precision: str = "fp32", **train_fields) -> dict:
    """A shape:tiny config saving every step (the checkpoints' moments are the gradients the tests compare)."""
    return {"model": "shape:tiny", "method": method, "output_dir": str(out), "device": "cpu", "max_seq_len": 96,
            "data": {"path": str(data), "eval_fraction": 0.0, "packing": False},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
            "train": {"micro_batch": 2, "lr": 1e-2, "seed": 0, "optimizer": "adamw", "max_grad_norm": None,
                      "precision": precision, **train_fields},
            "save": {"every_steps": 1, "keep": 10}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**more: str) -> dict:
    """This process's environment for a child: one thread (2 shared cores), this checkout's sources first."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **more}


def spawn(command: list[str], processes: int = 2) -> list[subprocess.Popen]:
    """`processes` ranks of one gloo group, started as torchrun would (without its agent, so a test can
    signal one rank and read each rank's exit status)."""
    port = str(free_port())
    return [subprocess.Popen(command, env=child_env(RANK=str(rank), LOCAL_RANK=str(rank),
                                                    WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                                                    MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(processes)]


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    """Each process's (exit status, stderr); kills them all if one outlives the timeout (a hang)."""
    deadline = time.monotonic() + timeout
    try:
        results = []
        for proc in procs:
            _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, stderr))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def wait_for_steps(run_dir: Path, procs: list[subprocess.Popen], steps: int = 2, timeout: float = 300) -> None:
    """Until the run's metrics log `steps` losses (its loop is running); fails if a process ends first."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= steps):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)
        time.sleep(0.2)


def _metrics(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _first_moments(run: Path, step: int) -> list[torch.Tensor]:
    """AdamW's first moment per trainable tensor after `step`: 0.1 x the gradient after step 1, a running
    average of the gradients after later steps (linear in them: a gradient-scale error shows)."""
    state = torch.load(run / "checkpoints" / f"step-{step}" / "state.pt", weights_only=True)["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def _relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x.reshape(-1) - y.reshape(-1)).abs().max()) for x, y in zip(a, b)) / max(
        float(x.abs().max()) for x in a)


def adapter_gap(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' final adapter weights."""
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def assert_trains_like(two: Path, one: Path, tolerance: float, later: float | None = None) -> None:
    """Same steps, tokens, losses, grad norms (before clipping) and gradients (every step's moments;
    `later` relaxes the steps after the first)."""
    two_summary, one_summary = (json.loads((run / "summary.json").read_text()) for run in (two, one))
    assert two_summary["world_size"] == 2 and two_summary["steps"] == one_summary["steps"]
    assert two_summary["tokens_trained"] == one_summary["tokens_trained"]
    for key in ("loss", "grad_norm"):
        pairs = list(zip(_metrics(one, key), _metrics(two, key), strict=True))
        assert all(s1 == s2 and abs(a - b) <= tolerance * abs(a) for (s1, a), (s2, b) in pairs), (key, pairs)
    for step in range(1, one_summary["steps"] + 1):
        gap = _relative_gap(_first_moments(one, step), _first_moments(two, step))
        assert gap < (tolerance if step == 1 else later or tolerance), (step, gap)
