"""planner.explain: the plan as a table that adds up, and refusals that say what fits."""

import json
import subprocess
import sys

from conftest import tiny_config
from snugtune.planner import plan_for_budget
from snugtune.planner.cards import GIB


def test_plan_cli_json_and_exit_3_with_a_suggestion(tmp_path, alpaca_file):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:llama3-8b\ndata: {{path: {alpaca_file}}}\nmethod: lora\nmax_seq_len: 2048\n")
    ok = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(config), "--gpu", "h100", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert {"peak_bytes", "budget_bytes", "fits", "breakdown", "settings"} <= set(result) and result["fits"]
    assert result["breakdown"]["frozen_weights"] > 12 * GIB
    # (with the weights streamed from host memory an 8B bf16 model does fit a 3080: forbid that here)
    config.write_text(config.read_text() + "offload: {weights: false}\n")
    too_small = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(config), "--gpu", "rtx3080"],
                               capture_output=True, text=True)
    assert too_small.returncode == 3
    assert "does NOT fit" in too_small.stdout and "method=qlora" in too_small.stdout


