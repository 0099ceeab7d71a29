"""Shared helpers: tiny data files and configs written by the tests themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from snugtune.config import Config, config_from_dict


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Arithmetic question/answer pairs of varying length: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        pad = " Please answer carefully." * rng.randint(0, 3)
        rows.append({"instruction": f"Add {a} and {b}.{pad}", "input": "", "output": f"The sum is {a + b}."})
    return rows


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())


def tiny_config(tmp_path: Path, data_path: Path, **sections) -> Config:
    """A shape:tiny config writing into tmp_path/run; keyword sections override the defaults."""
    raw = {"model": "shape:tiny", "data": {"path": str(data_path), "eval_fraction": 0.1}, "max_seq_len": 96,
           "method": "lora", "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
           "train": {"max_steps": 3, "micro_batch": 4, "lr": 1e-2, "seed": 0},
           "save": {"every_steps": 100}, "output_dir": str(tmp_path / "run"), "device": "cpu"}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config_from_dict(raw)
