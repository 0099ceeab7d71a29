"""`snugtune bench` end to end on CPU: both stacks run on the same checkpoint and rows."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import EXAMPLES_DIR


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One `snugtune bench` of both stacks with --max-context (its stdout, its JSON), which the two tests below
    read: each stack's bench run, then each stack's longest-sequence trials, in one process."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "bench", "--shape", "tiny", "--seq", "128", "--batch",
                           "2", "--steps", "4", "--device", "cpu", "--against", "plain,unsloth", "--max-context",
                           "192", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_runs_snugtune_and_the_plain_recipe_on_the_same_data(bench_run):
    proc, results = bench_run
    assert "| snugtune |" in proc.stdout and "| plain |" in proc.stdout
    assert results["snugtune"]["tokens_per_s_median_step"] > 0 and results["plain"]["tokens_per_s_median_step"] > 0
    # same checkpoint, same rows, same learning rate: the two stacks end at nearly the same loss
    assert abs(results["snugtune"]["loss_last"] - results["plain"]["loss_last"]) < 0.01
    assert "unsloth" in results["unsloth"]["error"]  # not installed here, or no GPU: said, not faked


def test_longest_context_doubles_then_bisects_to_the_granularity():
    from snugtune.bench.compare import longest_context
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


@pytest.mark.slow
def test_bench_max_context_reports_each_stacks_longest_sequence(bench_run):
    proc, results = bench_run
    # on a CPU nothing runs out of memory: both stacks reach the limit (one trial each: 128 tokens, then the
    # doubling passes 192; test_longest_context_doubles_then_bisects... covers the search), on stdlib modules
    assert results["snugtune"]["longest_context_tokens"] == 128 and results["plain"]["longest_context_tokens"] == 128
    assert "| 128 (" in proc.stdout


def test_recipe_bench_keeps_the_recipes_settings_on_the_bench_model_and_rows(tmp_path):
    from pathlib import Path

    from snugtune.bench.compare import recipe_config
    from snugtune.config import config_from_dict
    recipe = EXAMPLES_DIR / "tinyllama-1.1b_qlora_t4.yaml"
    raw = recipe_config(recipe, "tinyllama-1.1b", 30, "cuda", ("lora.dropout=0",))
    config = config_from_dict(raw)
    assert config.model == "shape:tinyllama-1.1b" and config.train.max_steps == 30
    assert (config.train.micro_batch, config.train.grad_accum) == (4, 1)  # micro_batch auto: the rows of a step
    assert (config.train.optimizer, config.train.scheduler, config.max_seq_len) == ("paged_adamw_8bit", "cosine", 512)
    assert config.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"] and config.lora.dropout == 0
    assert config.budget == "t4" and "stdlib_functions" in str(config.data.path)


@pytest.mark.parametrize("recipe, objective", [("llama3-8b_qlora-orpo_t4.yaml", "orpo"),
                                                ("tinyllama-1.1b_qlora-dpo_t4.yaml", "dpo")])
def test_a_preference_recipe_benches_on_pairs_with_its_own_objective(tmp_path, recipe, objective):
    # the bench's rows are SFT samples, which a preference objective refuses: its recipe trains the bench's pairs
    from snugtune.bench.compare import long_pairs, recipe_config
    from snugtune.config import config_from_dict
    pairs = long_pairs(tmp_path, 64, count=3)
    config = config_from_dict(recipe_config(EXAMPLES_DIR / recipe, "tiny", 4, "cpu", (), pairs))
    assert (config.objective, config.data.format, config.data.path) == (objective, "preference", str(pairs))
    assert config.budget == "t4" and config.train.max_steps == 4


def test_a_supervised_recipe_benches_its_own_objective_whatever_objective_the_bench_was_given(tmp_path, monkeypatch):
    from snugtune.bench import compare
    seen = []
    monkeypatch.setattr(compare, "run_stack", lambda stack, config, work: seen.append(config) or {"error": "stub"})
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", lambda name: None)
    results = compare.run_bench("tiny", recipe=EXAMPLES_DIR / "tinyllama-1.1b_qlora_t4.yaml", device="cpu",
                                against=(), objective="dpo")
    assert results["setting"]["objective"] == "sft" and "objective" not in seen[0]
    assert "stdlib_functions" in seen[0]["data"]["path"]


@pytest.mark.parametrize("text, says", [(None, "not found"), ("- a list\n", "mapping"), ("objective: [1\n", "YAML"),
                                        ("objective: kto\n", "kto recipe is not benched"),
                                        ("objective: dpo\nmax_seq_len: long\n", "max_seq_len"),
                                        ("objective: dpo\nmax_seq_len: 1000000000\n", "8 to 262,144 tokens"),
                                        ("train: {lr: fast}\n", "train.lr"), ("train: [1]\n", "train must be a mapping"),
                                        ("objective: simpo\n", "objective"), ("budget: foo\n", "budget: 'foo'")])
def test_a_recipe_the_bench_cannot_run_is_refused_naming_the_file(tmp_path, text, says, monkeypatch):
    from snugtune.bench.compare import run_bench
    from snugtune.errors import ConfigError
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", _nothing_built)
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    with pytest.raises(ConfigError, match=f"recipe.yaml.*{says}"):
        run_bench("tiny", recipe=recipe, device="cpu", against=())


def _nothing_built(name):
    raise AssertionError("a checkpoint was built for settings the bench refuses")


@pytest.mark.parametrize("args, says", [
    (["--seq", "0"], "max_seq_len: Input should be greater than or equal to 8"),
    (["--seq", "300000"], "max_seq_len must be 8 to 262,144 tokens"),
    (["--objective", "dpo", "--seq", "1000000000"], "max_seq_len must be 8 to 262,144 tokens"),
    (["--steps", "0"], "train.max_steps"), (["--batch", "0"], "train.micro_batch"),
    (["--max-context", "3"], "--max-context must be 8 to"), (["--cap", "0"], "--cap must be a number of GiB above 0"),
    (["--cap", "nan"], "--cap must be"), (["--set", "train.lr=abc"], "train.lr"),
    (["--set", "nonsense=1"], "unknown key 'nonsense'"), (["--cap", "inf"], "budget: 'infGiB'"),
    (["--set", "budget=20000GiB"], "budget: '20000GiB'"),
    (["--set", "objective=kto"], "--set objective=kto: the bench's objective is --objective (sft)"),
    (["--recipe", str(EXAMPLES_DIR / "tinyllama-1.1b_qlora_t4.yaml"), "--set", "objective=kto"], "kto recipe"),
    (["--recipe", str(EXAMPLES_DIR / "tinyllama-1.1b_qlora_t4.yaml"), "--cap", "10"], "--cap: a recipe's budget"),
    (["--emulate", "t4", "--cap", "10"], "--emulate plans for the card's memory"),
    (["--recipe", str(EXAMPLES_DIR / "tinyllama-1.1b_qlora_t4.yaml"), "--max-context", "4096"], "--max-context")])
def test_bench_settings_a_run_cannot_have_exit_2_before_anything_is_built(args, says, monkeypatch, capsys):
    from snugtune.cli import app
    from typer.testing import CliRunner
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", _nothing_built)
    result = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--device", "cpu", "--against", "", *args])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output


def test_unsloth_rows_are_the_runs_tokens_in_order_at_one_length(tmp_path):
    from snugtune.bench.unsloth_stack import fixed_length_rows
    from snugtune.data.batches import epoch_rows
    from snugtune.data.tokenize import TokenizedSample
    samples = [TokenizedSample(input_ids=list(range(100 * i, 100 * i + 7 + i)), labels=[0] * (7 + i))
               for i in range(6)]
    ids = fixed_length_rows(samples, 16, 3, seed=0)
    stream = [t for row in epoch_rows(samples, 0, 0, 16) for s in row for t in s.input_ids]
    assert ids.shape == (3, 16)
    assert ids.flatten().tolist() == (stream * 2)[:48]


@pytest.mark.parametrize("scheduler,warmup", [("cosine", 0.1), ("linear", 2), ("constant", 0.0)])
def test_the_plain_and_unsloth_stacks_follow_the_recipes_learning_rate_schedule(scheduler, warmup):
    # a recipe's cosine decay lowers snugtune's loss curve's slope; the peers must decay alike to compare losses
    from snugtune.bench.plain import learning_rate_schedule
    from snugtune.config import config_from_dict
    from snugtune.engine.optim import lr_factor, warmup_steps
    cfg = config_from_dict({"model": "shape:tiny", "data": {"path": "x.jsonl"}, "train": {
        "max_steps": 20, "lr": 1e-3, "scheduler": scheduler, "warmup": warmup}})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    schedule = learning_rate_schedule(optimizer, cfg)
    warm = warmup_steps(cfg.train, 20)
    for step in range(20):
        # in warmup, transformers' Trainer starts at 0 where snugtune's first step already takes lr/warmup
        want = 1e-3 * (step / warm if step < warm else lr_factor(step, 20, warm, scheduler))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12)
        optimizer.step()
        schedule.step()


def test_emulate_t4_runs_every_stack_as_a_t4_the_users_overrides_last():
    from snugtune.bench.compare import bench_config, emulated, recipe_config
    from snugtune.config import apply_overrides, config_from_dict
    from snugtune.errors import ConfigError
    overrides = emulated("t4", ("lora.r=8", "budget=10GiB"))
    for raw in (apply_overrides(bench_config("tiny", 128, 2, 2, 15.0, "cuda"), list(overrides)),
                recipe_config(EXAMPLES_DIR / "llama2-7b_qlora_t4.yaml", "tiny", 2, "cuda", overrides)):
        config = config_from_dict(raw)
        assert (config.train.precision, config.train.attention_kernels) == ("fp16", "sm75")
        assert config.lora.r == 8 and config.budget == "10GiB"  # what the user adds wins
    assert emulated(None, ("lora.r=8",)) == ("lora.r=8",)
    with pytest.raises(ConfigError, match="emulate"):
        emulated("t5", ())


@pytest.mark.slow
def test_bench_emulating_a_t4_plans_for_it_and_trains_in_fp16_with_its_kernels(tmp_path):
    from snugtune.bench.compare import format_table, run_bench
    results = run_bench(shape="tiny", seq=64, batch=2, steps=2, against=(), device="cpu", emulate="t4")
    snugtune = results["snugtune"]
    assert "error" not in snugtune, snugtune
    assert snugtune["precision"] == "fp16" and snugtune["plan"]["card"] == "Tesla T4 16 GB"
    assert results["setting"]["emulate"] == "t4" and "train.attention_kernels=sm75" in results["setting"]["overrides"]
    assert "planned for Tesla T4 16 GB: predicted" in format_table(results)


@pytest.mark.parametrize("given,objective,stacks", [(None, "sft", ("plain",)), (None, "dpo", ("trl",)),
                                                     ("", "sft", ()), (",", "dpo", ()),
                                                     ("plain, unsloth", "sft", ("plain", "unsloth")),
                                                     ("trl,unsloth", "dpo", ("trl", "unsloth"))])
def test_against_names_the_other_stacks_and_empty_benches_snugtune_alone(monkeypatch, given, objective, stacks):
    from typer.testing import CliRunner
    from snugtune import cli
    from snugtune.bench import compare
    ran = []
    monkeypatch.setattr(compare, "run_stack", lambda stack, config, work: ran.append(stack) or {"error": "stub"})
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", lambda name: None)
    args = ["bench", "--shape", "tiny", "--seq", "64", "--device", "cpu", "--objective", objective]
    result = CliRunner().invoke(cli.app, args + ([] if given is None else ["--against", given]))
    assert result.exit_code == 0, result.output
    assert tuple(ran) == ("snugtune", *stacks)


@pytest.mark.parametrize("args, says", [(["--against", "foo"], "'foo' is not a stack the bench runs under sft"),
                                        (["--against", "trl"], "'trl' is not a stack the bench runs under sft"),
                                        (["--objective", "dpo", "--against", "plain"], "under dpo (trl, unsloth"),
                                        (["--recipe", str(EXAMPLES_DIR / "llama3-8b_qlora-orpo_t4.yaml"),
                                          "--against", "trl"], "under orpo (none")])
def test_a_stack_the_bench_does_not_run_exits_2_before_anything_runs(monkeypatch, args, says):
    from typer.testing import CliRunner
    from snugtune import cli
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", _nothing_built)
    result = CliRunner().invoke(cli.app, ["bench", "--shape", "tiny", "--device", "cpu", *args])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output


def test_json_results_replace_only_an_earlier_benchs_file_and_are_checked_before_the_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from snugtune import cli
    from snugtune.bench import compare
    monkeypatch.setattr(compare, "run_stack", lambda stack, config, work: {"error": "stub"})
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", lambda name: None)
    bench = ["bench", "--shape", "tiny", "--seq", "64", "--device", "cpu", "--against", "", "--json"]
    notes, settings = tmp_path / "notes.json", tmp_path / "settings.json"
    notes.write_text('{"mine": 1}')
    settings.write_text('{"setting": 1}')
    (tmp_path / "link.json").symlink_to(notes)
    for target, says in [(tmp_path, "a folder"), (tmp_path / "missing" / "r.json", "does not exist"),
                         (notes, "not a bench's results"), (settings, "not a bench's results"),
                         (tmp_path / "link.json", "a link")]:
        result = CliRunner().invoke(cli.app, bench + [str(target)])
        assert result.exit_code == 2 and says in result.output
    assert notes.read_text() == '{"mine": 1}' and settings.read_text() == '{"setting": 1}'
    out = tmp_path / "r.json"
    for _ in range(2):  # a new file, then the earlier bench's replaced
        result = CliRunner().invoke(cli.app, bench + [str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["setting"]["seq"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "notes.json", "r.json", "settings.json"]


def test_a_recipe_without_a_length_benches_at_the_configs_default_and_stacks_run_once(monkeypatch, tmp_path):
    from snugtune.bench import compare
    seen = []
    monkeypatch.setattr(compare, "run_stack", lambda stack, config, work: seen.append((stack, config)) or {})
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", lambda name: None)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n")
    results = compare.run_bench("tiny", recipe=recipe, device="cpu", against=("plain", "plain"))
    assert [stack for stack, _ in seen] == ["snugtune", "plain"] and results["setting"]["seq"] == 512
    assert all(config["max_seq_len"] == 512 for _, config in seen)  # every stack reads its length from the config


def test_max_context_trials_train_each_length_whatever_the_overrides_say(monkeypatch):
    from snugtune.bench import compare
    lengths = []
    monkeypatch.setattr(compare, "run_stack", lambda stack, config, work: lengths.append(config["max_seq_len"]) or {})
    monkeypatch.setattr("snugtune.models.resolve.resolve_model", lambda name: None)
    compare.run_bench("tiny", seq=64, steps=2, device="cpu", against=(), max_context=256,
                      overrides=("max_seq_len=64",))
    assert lengths[0] == 64 and 256 in lengths[1:]


@pytest.mark.parametrize("native_bf16", [True, False], ids=["cpu with native bf16", "older cpu"])
def test_on_a_cpu_the_other_stacks_train_at_the_precision_of_snugtunes_run(tmp_path, monkeypatch, native_bf16):
    # precision: auto is bf16 on a CPU that multiplies it natively: a plain or TRL stack left in fp32 beside it
    # compared other arithmetic, not the same run
    import yaml
    from snugtune.bench.compare import bench_config
    from snugtune.bench.plain import stack_precision
    from snugtune.bench.trl_dpo import bench_setup, dpo_arguments
    from snugtune.config import config_from_dict
    from snugtune.precision import resolve_precision
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    raw = bench_config("tiny", 64, 2, 2, None, "cpu")
    cpu, expected = torch.device("cpu"), "bf16" if native_bf16 else "fp32"
    assert resolve_precision(config_from_dict(raw).train.precision, cpu).name == expected  # snugtune's run
    assert stack_precision(config_from_dict(raw), cpu).name == expected  # the plain recipe's
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(sys, "argv", ["trl_dpo", str(path), "--out", str(tmp_path / "trl.json")])
    _, cfg, _, device, dtype = bench_setup("TRL's DPOTrainer")  # TRL's: the model's dtype and Trainer's bf16
    assert device == cpu and dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert dpo_arguments(cfg, tmp_path / "trl-out", device, dtype).bf16 == native_bf16
