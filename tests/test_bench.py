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
    assert "unsloth" in results["unsloth"]["error"]  # not installed here, or no GPU: said, not faked


def test_longest_context_doubles_then_bisects_to_the_granularity():
    from snugtune.bench import longest_context
    tried = []

    def trains(seq):
        tried.append(seq)
        return {"tokens_per_s_median_step": 1.0} if seq <= 5000 else {"error": "out of memory"}
    length, result = longest_context(trains, 1024, 65536)
    assert length == max(s for s in tried if s <= 5000) and length % 1024 == 0 and 5000 - length < 1024
    assert tried[:4] == [1024, 2048, 4096, 8192] and result is not None
    assert longest_context(lambda seq: {"error": "oom"}, 1024, 8192) == (None, None)
    capped, _ = longest_context(lambda seq: {"tokens_per_s_median_step": 1.0}, 1024, 3000)
    assert capped == 2048  # never beyond the limit


def test_bench_max_context_reports_each_stacks_longest_sequence(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "bench", "--shape", "tiny", "--seq", "64", "--batch", "1",
                           "--steps", "4", "--device", "cpu", "--max-context", "128", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    # on a CPU nothing runs out of memory: both stacks reach the limit, trained on standard-library modules
    assert results["snugtune"]["longest_context_tokens"] == 128 and results["plain"]["longest_context_tokens"] == 128
    assert "128 (" in proc.stdout
