"""Evaluation: pass@k, base-vs-tuned scores, in-training eval, TensorBoard, the report."""

import json
from pathlib import Path

import pytest

from conftest import alpaca_rows, tiny_config, write_jsonl
from snugtune.engine.train import train
from snugtune.evaluate.tasks import evaluate_run
from snugtune.evaluate.humaneval import load_problems, pass_at_k, program_for
from snugtune.evaluate.results_table import build_report
from snugtune.evaluate.sandbox import isolation_problem, run_sandboxed

ISOLATE = isolation_problem() is None  # where it cannot, the programs still run with the limits and the hook


# --- HumanEval arithmetic and programs -----------------------------------------------------------------------

def test_pass_at_k_matches_the_unbiased_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - (7 * 6 * 5 * 4 * 3) / (10 * 9 * 8 * 7 * 6))
    assert pass_at_k(5, 4, 2) == 1.0


def test_canonical_solutions_pass_and_wrong_ones_fail_in_both_modes():
    problems = load_problems(3)
    assert len(load_problems()) == 164
    for problem in problems:
        assert run_sandboxed(program_for(problem, problem["canonical_solution"]), isolate=ISOLATE).passed
        assert not run_sandboxed(program_for(problem, "    return None\n"), isolate=ISOLATE).passed
        whole = problem["prompt"] + problem["canonical_solution"]
        chat_answer = program_for(problem, f"Here it is:\n```python\n{whole}```\n", mode="chat")
        assert run_sandboxed(chat_answer, isolate=ISOLATE).passed


# --- base vs tuned, during and after training ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    data = write_jsonl(tmp / "a.jsonl", alpaca_rows(40))
    runs = []
    for name, r in (("r4", 4), ("r8", 8)):
        cfg = tiny_config(tmp, data, output_dir=str(tmp / name), lora={"r": r}, train={"max_steps": 6},
                          eval={"every_steps": 2}, log={"tensorboard": True})
        train(cfg, show_progress=False)
        runs.append(Path(cfg.output_dir))
    return runs


@pytest.mark.slow
def test_eval_scores_base_and_tuned_side_by_side(two_runs):
    run = two_runs[0]
    summary = json.loads((run / "summary.json").read_text())
    results = evaluate_run(run, ["perplexity", "retention", "generate"], limit=2, device="cpu")
    ppl = results["perplexity"]
    assert ppl["tuned_loss"] == pytest.approx(summary["eval_loss_after"], abs=1e-5)
    assert ppl["base_loss"] == pytest.approx(summary["eval_loss_before"], abs=1e-5)
    ret = results["retention"]
    assert ret["samples"] > 10 and ret["kept_percent"] == pytest.approx(
        100 * 2.718281828459045 ** (ret["base_loss"] - ret["tuned_loss"]), rel=1e-6)
    assert len(results["generate"]) == 2 and all(g["prompt"].endswith("assistant\n") for g in results["generate"])
    assert set(json.loads((run / "eval.json").read_text())) == {"perplexity", "retention", "generate"}


@pytest.mark.slow
def test_eval_during_training_and_tensorboard(two_runs):
    rows = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 6]
    events = list((two_runs[0] / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_report_table_matches_the_runs_and_draws_the_curves(two_runs, tmp_path):
    markdown, plot = build_report(two_runs, tmp_path / "report")
    assert plot.is_file() and plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    table = [line for line in markdown.read_text().splitlines() if line.startswith(("| r4", "| r8"))]
    assert len(table) == 2
    for run, line in zip(two_runs, table):
        summary = json.loads((run / "summary.json").read_text())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == run.name and cells[1] == summary["model"]
        assert f"{summary['train_loss_final']:.4f}" in cells and f"r={run.name[1:]}" in cells[5]
        assert f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB" in cells[6]
