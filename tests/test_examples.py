"""Every shipped config validates, names a model the registry knows, and trains two steps on a tiny twin; the
preference demo's pairs are what their script builds, and the demo itself raises held-out preference accuracy."""

import ast
import json
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES_DIR, REPO_ROOT, alpaca_rows, pair_rows, write_jsonl
from snugtune import train
from snugtune.config import load_config
from snugtune.registry import HUB_IDS, shape_config

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def _fixture_data(fmt: str, folder: Path) -> Path:
    qa = alpaca_rows(24)
    if fmt == "alpaca":
        return write_jsonl(folder / "alpaca.jsonl", qa)
    if fmt == "guanaco":
        return write_jsonl(folder / "guanaco.jsonl", [
            {"text": f"### Human: {r['instruction']}### Assistant: {r['output']}"} for r in qa])
    if fmt == "preference":
        return write_jsonl(folder / "pairs.jsonl", pair_rows(24))
    if fmt == "prompt-completion":
        return write_jsonl(folder / "math.jsonl", [{"problem": r["instruction"], "solution": r["output"]} for r in qa])
    if fmt == "text":
        code = folder / "code"
        code.mkdir()
        for i, r in enumerate(qa):
            (code / f"m{i}.py").write_text(f"def f{i}():\n    # {r['instruction']}\n    return {i}\n")
        return code
    raise AssertionError(fmt)


def test_examples_exist_for_the_five_recipes_and_the_quickstart():
    names = {p.stem for p in EXAMPLES}
    assert {"codellama-7b_lora-8bit_t4", "phi-2_qlora_t4", "mistral-7b_qlora_t4", "llama2-7b_qlora_t4",
            "deepseek-r1-distill-qwen-1.5b_lora-8bit_t4", "stable-code-3b_qlora_rtx3080",
            "tinyllama-1.1b_qlora_t4", "smollm2-135m_lora_cpu", "tinyllama-1.1b_qlora-dpo_t4",
            "llama3-8b_qlora-orpo_t4", "smollm2-135m_lora-dpo_cpu"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_config_is_valid_documented_and_named_for_its_model_method_card(path):
    cfg = load_config(path)
    header = path.read_text().splitlines()[0:8]
    assert any(line.startswith("# Run:") for line in header), "config header must show the run command"
    model_part, method, card = path.stem.split("_")  # <model>_<method>[-<objective>]_<card>
    assert method == (cfg.method if cfg.objective == "sft" else f"{cfg.method}-{cfg.objective}")
    if cfg.model in HUB_IDS:
        assert HUB_IDS[cfg.model] in model_part
        shape_config(HUB_IDS[cfg.model])  # the registry knows its shape, so plan/bench work offline


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "cpu" not in p.stem], ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_a_tiny_model_of_its_family(path, tmp_path):
    cfg = load_config(path)
    data = _fixture_data(cfg.data.format, tmp_path)
    overrides = [f"model=shape:tiny-{HUB_IDS[cfg.model]}", f"data.path={data}", "train.max_steps=2",
                 "train.rows_per_step=4", f"output_dir={tmp_path / 'run'}", "device=cpu",
                 "train.precision=auto", "max_seq_len=128", "eval.max_batches=1"]
    if cfg.train.optimizer == "paged_adamw_8bit":
        overrides.append("train.optimizer=adamw_8bit")  # paging needs a GPU
    if cfg.lora.last_layers:
        overrides.append("lora.last_layers=1")
    summary = train(path, overrides, show_progress=False)
    assert summary["steps"] == 2 and summary["method"] == cfg.method and summary["objective"] == cfg.objective
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def pairs_script(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import build_preference_pairs
    yield build_preference_pairs
    sys.modules.pop("build_preference_pairs")


def test_the_shipped_pairs_are_what_the_script_builds_from_the_bundled_functions(pairs_script):
    functions, pairs = _jsonl(pairs_script.SOURCE), _jsonl(pairs_script.OUT)
    assert pairs_script.build_pairs(functions) == pairs and len(pairs) > 0.9 * len(functions)
    tasks = {pairs_script.short_prompt(f["instruction"]): f["output"] for f in functions}
    for pair in pairs:  # the real function for its task, and a wrong one under the same def line that still parses
        assert tasks[pair["prompt"]] == pair["chosen"] != pair["rejected"]
        header = pairs_script.split_function(pair["chosen"])[0]
        assert pair["rejected"].startswith(header + "\n")
        ast.parse(pair["rejected"])


WRONG_ANSWERS = [  # (function, the rejected answer the script makes of it, or None: no pair)
    ("def f(a):\n    b = a + 1\n    return b", "def f(a):\n    b = a + 1"),
    ("def f(a):\n    b = a\n    # why\n\n    return b", "def f(a):\n    b = a"),  # comments before the line go too
    ("def f(a,\n      b):\n    c = a\n    return c", "def f(a,\n      b):\n    c = a"),  # a def over two lines
    ("def f(a):\n    if a:\n        a = 1\n    return a", "def f(a):\n    if a:\n        a = 1"),
    ("def f(a):\n    a = 1\n    return (a +\n            a) < 2",  # a last statement over two lines stays
     "def f(a):\n    a = 1\n    return (a +\n            a) >= 2"),
    ("def f(a):\n    for x in a:\n        if x < 0:\n            return x",  # one statement: a bug planted
     "def f(a):\n    for x in a:\n        if x >= 0:\n            return x"),
    ("def f(a):\n    a = 1; return a", None),  # one line holds both statements: dropping it leaves no body
    ("def f(a):\n    return g(a)", None),  # one statement, no operator to turn around
    ("def f(a): return a is None", None),  # a one-line function has no body line of its own
]


@pytest.mark.parametrize("function, wrong", WRONG_ANSWERS)
def test_the_wrong_answer_is_the_function_one_line_short_or_with_a_bug_planted(pairs_script, function, wrong):
    row = {"instruction": "Write the Python function `f(a)` from the standard library module `m`.", "output": function}
    pairs = pairs_script.build_pairs([row])
    assert [p["rejected"] for p in pairs] == ([wrong] if wrong else [])
    for pair in pairs:
        ast.parse(pair["rejected"])
        assert pair["prompt"] == row["instruction"] and pair["chosen"] == function


@pytest.mark.parametrize("instruction, prompt", [
    ("Write `f(a)` from `m`. Its docstring says:\n\nFirst line.\nSecond.\n\nMore.",
     "Write `f(a)` from `m`. Its docstring begins:\n\nFirst line.\nSecond."),
    ("Write `f(a)` from `m`. Its docstring says:\n\nOnly one paragraph.",
     "Write `f(a)` from `m`. Its docstring begins:\n\nOnly one paragraph."),
    ("Write `f(a)` from `m`.", "Write `f(a)` from `m`."),
])
def test_the_prompt_keeps_the_task_and_the_docstrings_first_paragraph(pairs_script, instruction, prompt):
    assert pairs_script.short_prompt(instruction) == prompt


@pytest.mark.slow
def test_the_preference_demo_moves_held_out_pairs_toward_the_chosen_answer(tmp_path):
    """The demo as its header runs it: DPO on the embedded SmolLM2 and the shipped pairs, then eval --task preference
    (docs/preference.md records the run: 41 held-out pairs, preference accuracy 34.1% base, 78.0% tuned)."""
    from snugtune.evaluate.tasks import evaluate_run
    summary = train(EXAMPLES_DIR / "smollm2-135m_lora-dpo_cpu.yaml", [f"output_dir={tmp_path / 'run'}"],
                    show_progress=False)
    assert summary["objective"] == "dpo" and summary["reference"] == "adapter"
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1
    result = evaluate_run(tmp_path / "run", ["preference"])["preference"]
    assert result["pairs"] >= 40 and result["reward_accuracy"] > 0.75
    assert result["tuned_accuracy"] >= result["base_accuracy"] + 0.2 and result["tuned_margin"] > result["base_margin"]
