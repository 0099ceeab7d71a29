"""`snugtune bench` end to end on CPU: both stacks run on the same checkpoint and rows."""

import json
import subprocess
import sys


def test_bench_runs_snugtune_and_the_plain_recipe_on_the_same_data(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "bench", "--shape", "tiny", "--seq", "128", "--batch",
                           "2", "--steps", "4", "--device", "cpu", "--against", "plain,unsloth", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| snugtune |" in proc.stdout and "| plain |" in proc.stdout
    results = json.loads(out.read_text())
    assert results["snugtune"]["tokens_per_s_median_step"] > 0 and results["plain"]["tokens_per_s_median_step"] > 0
    # same checkpoint, same rows, same learning rate: the two stacks end at nearly the same loss
    assert abs(results["snugtune"]["loss_last"] - results["plain"]["loss_last"]) < 0.01
    assert "not wired" in results["unsloth"]["error"]
