"""Every command against every broken run folder a user can produce: exit 2 (or 3 / 130) with one line
naming the file, never a traceback; and no command overwrites a folder it did not write."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from snugtune.cli import app


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _drop_key(path: Path, key: str) -> None:
    value = json.loads(path.read_text())
    del value[key]
    path.write_text(json.dumps(value))


def _set_base(run: Path, base: str) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary["base_model_path"] = base
    (run / "summary.json").write_text(json.dumps(summary))


def _interrupted(run: Path) -> None:
    """What a run killed before its end leaves: checkpoints, no summary, no final adapter."""
    for name in ("summary.json", "adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()


# broken run folder -> (what breaks it, the file the message must name)
BROKEN = {
    "no config.yaml": (lambda run: (run / "config.yaml").unlink(), "config.yaml"),
    "config.yaml not YAML": (lambda run: _write(run / "config.yaml", "model: [unclosed\n"), "config.yaml"),
    "config.yaml not a config": (lambda run: _write(run / "config.yaml", "lr: 3\n"), "config.yaml"),
    "interrupted run": (_interrupted, "summary.json"),
    "summary.json not JSON": (lambda run: _write(run / "summary.json", "{\"steps\": "), "summary.json"),
    "summary.json without base_model_path": (lambda run: _drop_key(run / "summary.json", "base_model_path"),
                                             "summary.json"),
    "base model folder gone": (lambda run: _set_base(run, str(run.parent / "deleted-base")), "deleted-base"),
    "adapter truncated": (lambda run: _write(run / "adapter_model.safetensors", "\x08\x00"), "adapter"),
    "adapter config not JSON": (lambda run: _write(run / "adapter_config.json", "{"), "adapter"),
    "no tokenizer": (lambda run: [(run / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
                     "tokenizer"),
    "metrics.jsonl damaged": (lambda run: _write(run / "metrics.jsonl", '{"step": 1}\n{"step": \n'), "metrics.jsonl"),
    "eval.json not JSON": (lambda run: _write(run / "eval.json", "[1, 2"), "eval.json"),
    "not a folder": (lambda run: (shutil.rmtree(run), run.write_text("x")), ""),
    "missing": (lambda run: shutil.rmtree(run), ""),
}

COMMANDS = {
    "eval": lambda run, tmp: ["eval", str(run), "--task", "perplexity", "--device", "cpu"],
    "merge": lambda run, tmp: ["merge", str(run), "--out", str(tmp / "merged"), "--dtype", "fp32"],
    "chat": lambda run, tmp: ["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"],
    "report": lambda run, tmp: ["report", str(run), "--out", str(tmp / "report")],
}

# what each command reads: a broken file it does not read is no error for it
READS = {
    "eval": set(BROKEN) - {"metrics.jsonl damaged"},
    "merge": set(BROKEN) - {"config.yaml not YAML", "config.yaml not a config", "no config.yaml", "no tokenizer",
                            "metrics.jsonl damaged", "eval.json not JSON"},
    "chat": set(BROKEN) - {"metrics.jsonl damaged", "eval.json not JSON"},
    "report": set(BROKEN) - {"base model folder gone", "adapter truncated", "adapter config not JSON", "no tokenizer",
                             "summary.json without base_model_path"},
}


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    return result, result.output  # stdout and stderr together


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("broken", list(BROKEN))
def test_every_command_on_every_broken_run_folder(command, broken, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage, named = BROKEN[broken]
    damage(run)
    result, output = invoke(COMMANDS[command](run, tmp_path))
    assert "Traceback" not in output and not isinstance(result.exception, (ValueError, KeyError, TypeError))
    if broken not in READS[command]:
        assert result.exit_code == 0, output
        return
    assert result.exit_code == 2, output
    lines = [line for line in output.splitlines() if line.strip() and line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], output


# --- no command overwrites what it did not write ------------------------------------------------------------

OUT_COMMANDS = {
    "merge": lambda run, out: ["merge", str(run), "--out", str(out), "--dtype", "fp32"],
    "report": lambda run, out: ["report", str(run), "--out", str(out)],
}


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_out_refuses_a_folder_it_did_not_write_and_every_run_folder(command, finished_run, tmp_path):
    run = tmp_path / "runs" / "run"
    shutil.copytree(finished_run, run)
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = _listing(run)
    for out in (mine, run, run / "merged", run.parent):
        result, output = invoke(OUT_COMMANDS[command](run, out))
        assert result.exit_code == 2 and "Traceback" not in output and str(out) in output, output
    assert (mine / "notes.txt").read_text() == "mine" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert _listing(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-folder", "runs"]  # no staging folder left


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_out_replaces_its_own_earlier_output_and_nothing_else(command, finished_run, tmp_path):
    out = tmp_path / "exported"
    for _ in range(2):
        result, output = invoke(OUT_COMMANDS[command](finished_run, out))
        assert result.exit_code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging or replaced folder left
    (out / "added-by-me.txt").write_text("mine")
    result, output = invoke(OUT_COMMANDS[command](finished_run, out))
    assert result.exit_code == 2 and "added-by-me.txt" in output
    assert (out / "added-by-me.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke(OUT_COMMANDS[command](finished_run, empty))[0].exit_code == 0


def test_train_refuses_a_folder_that_holds_files_and_is_not_a_run(finished_run, tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own file")
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["output_dir"] = str(mine)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result, output = invoke(["train", str(tmp_path / "c.yaml"), "--quiet"])
    assert result.exit_code == 2 and "not a snugtune run" in output and "Traceback" not in output
    assert [p.name for p in mine.iterdir()] == ["config.yaml"] and (mine / "config.yaml").read_text() == "my own file"


# --- trust comes from the command line only -----------------------------------------------------------------

def _run_with_its_own_base(finished_run, tmp_path, trusting: bool) -> tuple[Path, Path]:
    """A copy of the run whose config.yaml turns on remote code and pickle weights, over a copy of its base."""
    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(finished_run, run)
    shutil.copytree(json.loads((run / "summary.json").read_text())["base_model_path"], base)
    summary = json.loads((run / "summary.json").read_text())
    summary["base_model_path"] = str(base)
    (run / "summary.json").write_text(json.dumps(summary))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(trust_remote_code=trusting, allow_pickle_weights=trusting)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, base


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_remote_code_runs_only_when_the_command_line_allows_it(flag, finished_run, tmp_path):
    run, base = _run_with_its_own_base(finished_run, tmp_path, trusting=True)
    ran = tmp_path / "remote-code-ran"
    (base / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n"
                                  "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                  "class EvilConfig(LlamaConfig):\n    pass\n"
                                  "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    model_config = json.loads((base / "config.json").read_text())
    model_config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(model_config))
    result, output = invoke(["eval", str(run), "--task", "perplexity", "--device", "cpu", *flag])
    assert result.exit_code == 0, output
    assert ran.exists() == bool(flag)  # the run folder's config.yaml says true either way


def test_a_run_folder_cannot_turn_on_pickle_weights(finished_run, tmp_path):
    run, base = _run_with_its_own_base(finished_run, tmp_path, trusting=True)
    from safetensors.torch import load_file
    torch_save = __import__("torch").save
    torch_save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    for command in (["eval", str(run), "--task", "perplexity", "--device", "cpu"],
                    ["chat", str(run), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]):
        result, output = invoke(command)
        assert result.exit_code == 2 and "--allow-pickle-weights" in output and "Traceback" not in output, output


# --- interruptions, memory, refusals ------------------------------------------------------------------------

def test_ctrl_c_in_chat_exits_130(finished_run, monkeypatch):
    def interrupted(prompt):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", interrupted)
    result, output = invoke(["chat", str(finished_run), "--device", "cpu"])
    assert result.exit_code == 130 and "Traceback" not in output


# A Ctrl-C that lands while a library imports passes through the exec() dataclasses run; CPython 3.11 then
# ended `python -m snugtune` by SIGINT (returncode -2) although the command had caught it and exited 130.
INTERRUPTED_IN_EXEC = {
    # the train command catches it: its config is read through exec()
    "in a command": """
import sys
import snugtune.config
def load_config(*args):
    exec("raise KeyboardInterrupt")
snugtune.config.load_config = load_config
sys.argv = ["snugtune", "train", "config.yaml"]
""",
    # it lands before any command handles it
    "before a command": """
import typer
app = typer.Typer()
@app.command()
def command():
    exec("raise KeyboardInterrupt")
import snugtune.cli
snugtune.cli.app = app
""",
}


@pytest.mark.parametrize("where", list(INTERRUPTED_IN_EXEC))
def test_a_ctrl_c_that_passed_through_exec_still_exits_130(tmp_path, where):
    import subprocess
    import sys
    package = tmp_path / "interrupted_cli"
    package.mkdir()
    (package / "__main__.py").write_text(INTERRUPTED_IN_EXEC[where] + "from snugtune.cli import main\nmain()\n")
    source = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run([sys.executable, "-m", "interrupted_cli"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{source}:{tmp_path}"}, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr


def test_out_of_memory_outside_the_step_loop_exits_3(finished_run, tmp_path, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr("snugtune.evaluate.tasks.mean_loss", out_of_memory)
    result, output = invoke(["eval", str(finished_run), "--task", "perplexity", "--device", "cpu"])
    assert result.exit_code == 3 and "out of memory" in output and "Traceback" not in output
    monkeypatch.setattr("snugtune.objectives.mean_loss", out_of_memory)  # the held-out loss before training
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["output_dir"] = str(tmp_path / "new-run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result, output = invoke(["train", str(tmp_path / "c.yaml"), "--quiet"])
    assert result.exit_code == 3 and "the plan for this config predicts" in output and "Traceback" not in output


def test_humaneval_refuses_where_code_cannot_be_isolated(finished_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `unshare`
    result, output = invoke(["eval", str(finished_run), "--task", "humaneval", "--limit", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "--allow-unisolated-code" in output and "Traceback" not in output


def test_data_with_a_model_folder_without_tokenizer(finished_run, tmp_path):
    base = tmp_path / "model"
    shutil.copytree(json.loads((finished_run / "summary.json").read_text())["base_model_path"], base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["model"] = str(base)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result, output = invoke(["data", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and str(base) in output and "tokenizer" in output and "Traceback" not in output


def test_a_resumed_run_counts_the_time_of_every_invocation(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    first = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(output_dir=str(run))
    config["train"]["max_steps"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result, output = invoke(["train", str(tmp_path / "c.yaml"), "--quiet"])
    assert result.exit_code == 0, output
    second = json.loads((run / "summary.json").read_text())
    assert second["run_wall_seconds"] > second["wall_seconds"]
    assert second["run_wall_seconds"] >= first["run_wall_seconds"]
    assert "over every invocation" in output


# --- paths and error lines as a shell user expects them -----------------------------------------------------

def test_chat_expands_a_tilde_in_the_run_path(finished_run, tmp_path, monkeypatch):
    shutil.copytree(finished_run, tmp_path / "home" / "my-run")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result, output = invoke(["chat", "~/my-run", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == 0, output


def test_an_error_message_is_one_line_however_long(monkeypatch, tmp_path):
    from snugtune.errors import ConfigError

    def huge_error(*args, **kwargs):
        raise ConfigError("first " + "x" * 100_000 + "\nsecond line")
    monkeypatch.setattr("snugtune.config.load_config", huge_error)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and len(lines[0]) < 1100 and "(100,018 characters)" in lines[0]


@pytest.mark.parametrize("args, said", [
    (["plan", "CONFIG", "--gpu", "9" * 400 + "GiB"], "is neither a card"),
    (["plan", "CONFIG", "--gpu", "0GiB"], "above 0"),
    (["plan", "CONFIG", "--gpus", "100000000000"], "--gpus"),
    (["data", "CONFIG", "--show", "-1"], "--show"),
])
def test_odd_numbers_on_the_command_line_are_refused_in_a_line(tmp_path, args, said):
    config = tmp_path / "c.yaml"
    config.write_text("model: shape:tiny\ndata: {path: x.jsonl}\n")
    result = CliRunner().invoke(app, [str(config) if a == "CONFIG" else a for a in args])
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output
    assert len(result.output) < 2000


def test_eval_and_report_expand_a_quoted_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["eval", "~/nowhere", "--task", "perplexity"])
    assert result.exit_code == 2 and str(tmp_path / "nowhere") in result.output
    result = CliRunner().invoke(app, ["report", "~/nowhere", "--out", "~/r"])
    assert result.exit_code == 2 and str(tmp_path / "nowhere") in result.output


class _InterruptedWhileNamed:
    def __set_name__(self, owner, name):
        raise KeyboardInterrupt  # Ctrl-C landing while an import makes a class (CPython 3.11 wraps it)


def test_ctrl_c_while_a_module_makes_its_classes_is_exit_130_not_a_traceback(monkeypatch, tmp_path):
    def loading(*args, **kwargs):
        return type("Report", (), {"notes": _InterruptedWhileNamed()})
    monkeypatch.setattr("snugtune.config.load_config", loading)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.stderr


def test_other_runtime_errors_are_not_taken_for_ctrl_c(monkeypatch, tmp_path):
    def fails(*args, **kwargs):
        try:
            raise ValueError("inner")
        except ValueError as exc:
            raise RuntimeError("outer") from exc
    monkeypatch.setattr("snugtune.config.load_config", fails)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError) and str(result.exception) == "outer"
