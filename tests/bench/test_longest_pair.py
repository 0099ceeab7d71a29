"""measure/longest_pair.py, the longest-pair trials of issue 38's GPU call, runs on the CPU (--smoke: shape:tiny, 2
steps) so the device call cannot die of a typo: each stack's lengths run in order and each trial leaves its row."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_the_longest_pair_trials_run_each_stacks_lengths_and_name_its_longest(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "measure" / "longest_pair.py"), str(tmp_path), "--smoke"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "longest_pair.jsonl").read_text().splitlines()]
    assert [(r["stack"], r["tokens_a_sequence"]) for r in rows] == [("snugtune", 64), ("snugtune", 128), ("trl", 64)]
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows)
    assert "snugtune: 2 x 128 tokens" in proc.stdout and "trl: 2 x 64 tokens" in proc.stdout


def test_a_stacks_trials_stop_at_its_first_failure_and_the_next_stack_goes_on(tmp_path, monkeypatch):
    import importlib.util
    import time
    spec = importlib.util.spec_from_file_location("longest_pair", REPO_ROOT / "measure" / "longest_pair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", lambda name: None)
    ran = []

    def run_stack(stack, config, work):  # out of memory past 96 tokens a sequence
        ran.append((stack, config["max_seq_len"]))
        return {"error": "CUDA out of memory"} if config["max_seq_len"] > 96 else {"tokens_per_s_median_step": 1.0}
    monkeypatch.setattr(module, "run_stack", run_stack)
    longest = module.trials(tmp_path, "tiny", 15.0, "cpu", {"snugtune": [64, 128, 96], "trl": [128]}, 2,
                            time.time() + 60, [])
    assert ran == [("snugtune", 64), ("snugtune", 128), ("trl", 128)]
    assert longest == {"snugtune": 64, "trl": None}
    rows = [json.loads(line) for line in (tmp_path / "longest_pair.jsonl").read_text().splitlines()]
    assert [r["error"] for r in rows] == [None, "CUDA out of memory", "CUDA out of memory"]
