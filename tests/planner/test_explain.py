"""planner.explain: the plan as a table that adds up, and refusals that say what fits."""

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLES_DIR, tiny_config
from snugtune.planner.choose import plan_for_budget
from snugtune.planner.explain import refusal
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




def test_the_plan_table_adds_up_to_the_peak_it_reports(tmp_path):
    recipe = EXAMPLES_DIR / "deepseek-r1-distill-qwen-1.5b_lora-8bit_t4.yaml"
    shown = subprocess.run([sys.executable, "-m", "snugtune", "plan", str(recipe), "--gpu", "t4"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    rows = [float(line.split()[-1]) for line in lines[rules[0] + 1: rules[1]]]
    total = float(next(line for line in lines if line.startswith("predicted peak (the sum)")).split()[-1])
    assert abs(sum(rows) - total) <= 0.005 * len(rows)  # each row rounded to 0.01 GiB
    apart = lines.index(next(line for line in lines if line.startswith("not alive at the peak")))
    assert "logits and loss (chunked)" in lines[apart + 1] or "one block" in lines[apart + 1]
    assert "predicted step time:" in shown.stdout and "micro_batch=" in shown.stdout


def test_a_refusal_names_the_longest_length_and_the_card_that_do_fit(tmp_path, alpaca_file):
    # Llama-3.1-8B at 196,608 tokens under 15 GiB: the refusal's numbers must agree with the planner's own search
    cfg = tiny_config(tmp_path, alpaca_file, model="shape:llama3-8b", method="qlora", max_seq_len=196608,
                      lora={"r": 16, "alpha": 32, "dropout": 0.0},
                      train={"micro_batch": 1, "grad_checkpointing": "auto", "optimizer": "adamw_8bit"})
    plan = plan_for_budget(cfg, 15 * GIB, "15 GiB", host_available=64 * GIB, masked=False)
    assert not plan.fits
    text = refusal(plan)
    assert f"predicted peak {plan.peak_bytes / GIB:.2f} GiB" in text and "15.00 GiB budget" in text
    assert "planned to 13.80 GiB keeping 8% in reserve" in text
    seq = int(re.search(r"max_seq_len=(\d+), the longest that fits", text).group(1))
    at = lambda n, gib=15: plan_for_budget(cfg.model_copy(update={"max_seq_len": n}), int(gib * GIB), "",  # noqa: E731
                                           host_available=64 * GIB, masked=False)
    assert 98_304 < seq < 196_608 and at(seq).fits and not at(seq + 64).fits
    card = float(re.search(r"a card with at least ([\d.]+) GiB usable", text).group(1))
    assert at(196_608, card).fits and not at(196_608, card - 0.125).fits
