"""The 2 x T4 recipe (Kaggle's free machine) as shipped, planned by `snugtune plan --gpus 2`: each card's
plan fits a T4's 15 GiB, replicated (DDP) as the recipe's header says, and on the fast path; forcing FSDP
shards the base and still fits."""

import json

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES_DIR
from snugtune.cli import app

RECIPE = EXAMPLES_DIR / "llama3-8b_qlora_2xt4.yaml"
T4_BYTES = 15 * 2**30  # planner/cards.py: a T4 16 GB as torch sees it


def _plan(*args: str):
    result = CliRunner().invoke(app, ["plan", str(RECIPE), *args, "--gpus", "2"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("parallel, shards", [("auto", 1), ("fsdp", 2)])
def test_the_2xt4_recipe_fits_each_t4_on_the_fast_path(parallel, shards):
    plan = json.loads(_plan(f"train.data_parallel={parallel}", "--json"))
    assert plan["fits"] and plan["budget_bytes"] == T4_BYTES and plan["peak_bytes"] < 0.95 * T4_BYTES, plan
    settings = plan["settings"]
    assert settings["shards"] == shards and settings["method"] == "qlora" and settings["offload"] == "none"
    assert settings["compiled_blocks"] and settings["fused_lora"] and not settings["cuda_graphs"]
    assert settings["micro_batch"] * settings["grad_accum"] == 16  # the recipe's rows per step on each card


def test_the_2xt4_plan_says_what_each_card_holds():
    text = _plan()
    assert "per GPU, 2 GPUs: DDP, each GPU a full replica" in text and "budget (Tesla T4 16 GB)" in text
    assert "planner chose train.data_parallel=ddp (config: auto)" in text
