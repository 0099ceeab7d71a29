"""How a run of several processes stops: a signal to any one stops all of them at the same step with one
checkpoint; a process that dies or hangs does not hold the others, which stop within
train.collective_timeout_s with one line saying another process failed (exit 2).

Ranks are started as torchrun starts them, without its agent (which would end the others itself when one
dies), so each rank's own exit shows; two gloo processes on the CPU.
"""

import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import alpaca_rows, write_jsonl
from gloo_ranks import finish, spawn, tiny_run, wait_for_steps
from snugtune.rundir import complete_checkpoints

TIMEOUT_S = 30  # train.collective_timeout_s in these runs: above the ranks' start-up skew on 2 busy cores


def _long_run(tmp_path: Path, **train_fields) -> list:
    """Two ranks of `snugtune train` on a run far longer than the test, no periodic checkpoint."""
    raw = tiny_run(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(48)), tmp_path / "run", max_steps=100_000,
                   grad_accum=1, **train_fields)
    raw["save"] = {"every_steps": 1_000_000}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    ranks = spawn([sys.executable, "-m", "snugtune", "train", str(config), "--quiet"])
    wait_for_steps(tmp_path / "run", ranks, 2)
    return ranks


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step_with_one_checkpoint(tmp_path):
    ranks = _long_run(tmp_path)
    ranks[1].send_signal(signal.SIGTERM)  # to rank 1 only
    results = finish(ranks, 300)
    assert [status for status, _ in results] == [130, 130], results
    kept = complete_checkpoints(tmp_path / "run")
    assert len(kept) == 1, kept
    step = int(kept[0].name.removeprefix("step-"))
    assert all(f"SIGTERM at step {step}:" in stderr for _, stderr in results), results
    assert step >= 2


@pytest.mark.slow
@pytest.mark.parametrize("how, victim", [(signal.SIGKILL, 1), (signal.SIGKILL, 0), (signal.SIGSTOP, 1)],
                         ids=["rank 1 killed", "rank 0 killed", "rank 1 hangs"])
def test_a_process_that_dies_or_hangs_does_not_hold_the_other(tmp_path, how, victim):
    ranks = _long_run(tmp_path, collective_timeout_s=TIMEOUT_S)
    survivor = ranks[1 - victim]
    ranks[victim].send_signal(how)
    hit = time.monotonic()
    try:
        (status, stderr), = finish([survivor], TIMEOUT_S + 120)
    finally:
        ranks[victim].kill()
        ranks[victim].communicate()
    waited = time.monotonic() - hit
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1 and f"process {1 - victim} of 2: another process of this run failed" in errors[0], errors
    assert "train.collective_timeout_s=30 s" in errors[0]
    # a dead process closes its connections: noticed at once; a hung one after the timeout
    assert waited < (15 if how == signal.SIGKILL else TIMEOUT_S + 60), waited
