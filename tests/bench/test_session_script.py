"""measure/session_2026-12-06.sh, the GPU call of issue 36, runs its pieces on the CPU (SMOKE=1: shape:tiny, 2
steps) so the device call cannot die of a typo: a piece leaves its bench JSON and table in $OUT. One piece (a recipe
emulating a T4 against plain): the others differ only in bench arguments, which tests/bench/test_compare.py covers."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_the_session_script_runs_a_t4_recipe_piece(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "SMOKE": "1", "DEADLINE": "900", "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run(["bash", str(REPO_ROOT / "measure" / "session_2026-12-06.sh"), "t4-llama2"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    benches = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [b["piece"] for b in benches] == ["t4-llama2"]
    t4, = benches
    assert t4["setting"]["emulate"] == "t4" and "error" not in t4["snugtune"] and "error" not in t4["plain"]
    assert t4["snugtune"]["precision"] == t4["plain"]["precision"] == "fp16"
    summary = (tmp_path / "summary.txt").read_text()
    assert "## t4-llama2" in summary and "| snugtune |" in summary
    assert len(list(tmp_path.iterdir())) <= 8  # what a device call brings back
