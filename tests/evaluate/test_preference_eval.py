"""`snugtune eval`, `report` and `data --show` on preference runs: base vs tuned on held-out pairs (or KTO rows),
the preference columns and curves of the report, prompt / chosen / rejected marked."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import pair_rows, tiny_config, write_jsonl
from snugtune.cli import app
from snugtune.engine.train import train
from snugtune.evaluate.tasks import evaluate_run
from snugtune.errors import UserError


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory) -> dict[str, Path]:
    """A DPO LoRA run and a KTO run on the same pairs, four steps each, and the data file."""
    tmp = tmp_path_factory.mktemp("preference-runs")
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows(40))
    runs = {"data": data}
    for objective in ("dpo", "kto"):
        cfg = tiny_config(tmp, data, objective=objective, output_dir=str(tmp / objective), eval={"every_steps": 2},
                          train={"max_steps": 4, "micro_batch": 4, "lr": 2e-2})
        train(cfg, show_progress=False)
        runs[objective] = Path(cfg.output_dir)
    return runs


def test_eval_scores_held_out_pairs_base_vs_tuned_and_a_kto_runs_rows(preference_runs, tmp_path):
    dpo = evaluate_run(preference_runs["dpo"], ["preference"], device="cpu")["preference"]
    assert dpo["pairs"] == 4 and dpo["data"].endswith("(held-out split)")
    assert dpo["tuned_margin"] > dpo["base_margin"] and dpo["reward_accuracy"] == 1.0
    assert 0.0 <= dpo["base_accuracy"] <= dpo["tuned_accuracy"] <= 1.0
    assert json.loads((preference_runs["dpo"] / "eval.json").read_text())["preference"] == dpo
    kto = evaluate_run(preference_runs["kto"], ["preference"], device="cpu")["preference"]
    gap = lambda model: kto[f"{model}_desirable_logp"] - kto[f"{model}_undesirable_logp"]  # noqa: E731
    assert kto["rows"] == 8 and gap("tuned") > gap("base") and kto["reward_accuracy"] > 0.5
    other = write_jsonl(tmp_path / "other.jsonl", pair_rows(6, seed=9))
    scored = evaluate_run(preference_runs["dpo"], ["preference"], data_file=str(other), device="cpu")["preference"]
    assert scored["pairs"] == 6 and scored["data"] == str(other)


def test_a_preference_runs_default_tasks_and_perplexity_refused_without_supervised_data(preference_runs):
    results = evaluate_run(preference_runs["dpo"], None, limit=1, device="cpu")
    assert set(results) == {"preference", "retention", "generate"}
    generated = results["generate"][0]
    assert generated["prompt"].endswith("<|im_start|>assistant\n") and generated["reference"].startswith("The sum is")
    with pytest.raises(UserError, match=r"trained objective dpo on preference data, which has no perplexity"):
        evaluate_run(preference_runs["dpo"], ["perplexity"], device="cpu")


def test_the_report_gains_preference_columns_and_curves(preference_runs, tmp_path):
    evaluate_run(preference_runs["dpo"], ["preference"], device="cpu")
    result = CliRunner().invoke(app, ["report", str(preference_runs["dpo"]), str(preference_runs["kto"]),
                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    header, _, dpo, kto = markdown.splitlines()[2:6]
    assert "preference accuracy (base → tuned)" in header and "reward margin" in header
    # eval.json's accuracy on held-out pairs where `eval` scored them, else training's held-out rewards
    assert "lora, dpo" in dpo and "(4 pairs) |" in dpo and "lora, kto" in kto and "| - | 0." in kto
    assert "![preference curves](preference_curves.png)" in markdown
    assert (tmp_path / "report" / "preference_curves.png").stat().st_size > 10_000


def test_data_show_marks_the_prompt_and_each_answers_scored_tokens(preference_runs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: shape:tiny\nobjective: dpo\ndata: {{path: {preference_runs['data']}}}\n")
    result = CliRunner().invoke(app, ["data", str(config), "--show", "1"])
    assert result.exit_code == 0, result.output
    assert "data format: preference (rows have 'prompt', 'chosen' and 'rejected'" in result.output
    shown = result.output.split("prompt:\n", 1)[1]
    prompt, answers = shown.split("chosen:\n")
    chosen, rejected = answers.split("rejected:\n")
    assert prompt.rstrip().endswith("<|im_start|>assistant") and "[[" not in prompt
    assert chosen.startswith("[[The sum is") and rejected.startswith("[[I think it is")
    sft = tmp_path / "sft.yaml"
    sft.write_text(f"model: shape:tiny\ndata: {{path: {preference_runs['data']}}}\n")
    refused = CliRunner().invoke(app, ["data", str(sft)])
    assert refused.exit_code == 2 and "holds preference pairs (chosen/rejected), but objective: sft" in refused.output
