"""measure/preference_grid.py, issue 38's GPU call, runs its pieces on the CPU (SMOKE=1: shape:tiny, 2 steps) so the
device call cannot die of a typo: a bench piece leaves its JSON and table, the grid its rows and a recipe's."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_the_preference_session_runs_a_longest_pair_bench_and_the_orpo_grid_rows(tmp_path):
    env = {**os.environ, "SMOKE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "measure" / "preference_grid.py"), str(tmp_path),
                           "longest-tinyllama", "grid", "--only", "orpo", "--deadline", "900"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    bench = json.loads((tmp_path / "longest-tinyllama.json").read_text())
    assert bench["setting"]["objective"] == "dpo" and bench["setting"]["max_context"] == 96
    assert bench["snugtune"]["longest_context_tokens"] == 64 and bench["trl"]["longest_context_tokens"] == 64
    assert "| trl |" in (tmp_path / "bench.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "preference_grid.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] in ("grid", "recipe")]
    assert {r.get("objective") for r in trained if r["kind"] == "grid"} == {"orpo"}
    assert [r["recipe"] for r in trained if r["kind"] == "recipe"] == ["examples/llama3-8b_qlora-orpo_t4.yaml"]
    assert all(r["rc"] == 0 and r["predicted_peak"] > 0 for r in trained)
