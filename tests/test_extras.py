"""extras.py: a feature whose optional extra is missing stops at once with exit 2 and the install command."""

import json
import re
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from conftest import REPO_ROOT, tiny_config
from snugtune.cli import app
from snugtune.extras import EXTRAS, missing_modules


def test_the_table_holds_every_extra_of_pyproject_and_make_test_installs_them_all():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(declared) - {"dev"}  # dev (pytest) backs no feature
    installed_by_make_test = re.search(r"-e '\.\[([^\]]+)\]'", (REPO_ROOT / "Makefile").read_text()).group(1)
    assert set(installed_by_make_test.split(",")) == set(declared)


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_an_installed_extra_is_not_missing(extra):
    for module in EXTRAS[extra].modules:
        pytest.importorskip(module)
    assert missing_modules(extra) == []


def _config_file(tmp_path, alpaca_file, **sections):
    config = tiny_config(tmp_path, alpaca_file, **sections)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    return path


def _fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"base_model_path": str(tmp_path)}))
    return run


# feature: (the module made unimportable, the command, the one error line it must print)
MISSING = {
    "log.wandb": ("wandb", lambda tmp, data: ["train", str(_config_file(tmp, data, log={"wandb": True}))],
                  "log.wandb needs the wandb extra (wandb not installed): pip install 'snugtune[wandb]'"),
    "log.mlflow": ("mlflow", lambda tmp, data: ["train", str(_config_file(tmp, data, log={"mlflow": True}))],
                   "log.mlflow needs the mlflow extra (mlflow not installed): pip install 'snugtune[mlflow]'"),
    "log.mlflow's sqlite store": (
        "sqlalchemy", lambda tmp, data: ["train", str(_config_file(tmp, data, log={"mlflow": True}))],
        "log.mlflow needs the mlflow extra (sqlalchemy not installed): pip install 'snugtune[mlflow]'"),
    "merge --gguf-type q4_k_m": (
        "llama_cpp", lambda tmp, data: ["merge", str(_fake_run(tmp)), "--out", str(tmp / "out"), "--gguf",
                                        "--gguf-type", "q4_k_m"],
        "--gguf-type q4_k_m needs the gguf-quant extra (llama_cpp not installed): pip install "
        "'snugtune[gguf-quant]' (builds llama.cpp from source: several minutes)"),
    "merge --gguf-type q6_k": (
        "llama_cpp", lambda tmp, data: ["merge", str(_fake_run(tmp)), "--out", str(tmp / "out"), "--gguf",
                                        "--gguf-type", "q6_k", "--dtype", "fp16"],
        "--gguf-type q6_k needs the gguf-quant extra (llama_cpp not installed): pip install "
        "'snugtune[gguf-quant]' (builds llama.cpp from source: several minutes)"),
}


def _refuse_to_start(*args, **kwargs):
    raise AssertionError("the long work started before the missing extra was found")


@pytest.mark.parametrize("feature", list(MISSING))
def test_a_missing_extra_stops_before_any_work_with_the_install_command(feature, tmp_path, alpaca_file,
                                                                         monkeypatch):
    module, command, message = MISSING[feature]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as when it is not installed
    monkeypatch.setattr("snugtune.engine.train.train", _refuse_to_start)
    monkeypatch.setattr("snugtune.export.targets.merge_run", _refuse_to_start)
    args = command(tmp_path, alpaca_file)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [f"error: {message}"]
    # nothing written: no run folder, no --out folder, no staging folder
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == files
