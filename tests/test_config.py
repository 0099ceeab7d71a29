import math
import os
import re
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from snugtune.config import apply_overrides, config_from_dict, load_config
from snugtune.errors import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = _write(tmp_path, "data: {path: x.jsonl}\ntrain: {learning_rate: 1e-4}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'.*did you mean 'train.lr'"):
        load_config(path)


def test_unknown_top_level_key_is_suggested(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'method'"):
        load_config(_write(tmp_path, "data: {path: x.jsonl}\nmethd: lora\n"))


def test_bad_value_names_the_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train.micro_batch: .*greater than or equal to 1.*got 0"):
        load_config(_write(tmp_path, "data: {path: x.jsonl}\ntrain: {micro_batch: 0}\n"))
    with pytest.raises(ConfigError, match=r"method: .*'lora'"):
        load_config(_write(tmp_path, "data: {path: x.jsonl}\nmethod: qlorra\n"))


def test_missing_data_section_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(_write(tmp_path, "model: shape:tiny\n"))


def test_quant_bits_must_agree_with_method():
    with pytest.raises(ConfigError, match="quant.bits=8 does not match method=qlora"):
        config_from_dict({"data": {"path": "x"}, "method": "qlora", "quant": {"bits": 8}})


def test_overrides_parse_like_yaml_and_reach_nested_fields(tmp_path):
    cfg = load_config(_write(tmp_path, "data: {path: d.jsonl}\n"),
                      ["train.lr=1e-4", "lora.r=8", "lora.targets=[q_proj,v_proj]", "train.max_steps=5"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 8 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == 5
    assert cfg.data.path == str((tmp_path / "d.jsonl").resolve())  # relative to the config file
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["train.lr"])


def test_cli_bad_config_is_one_line_exit_2_without_traceback(tmp_path):
    path = _write(tmp_path, "data: {path: x.jsonl}\ntrain: {learning_rate: 1e-4}\n")
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'train.lr'" in lines[0] and str(path) in lines[0]


def test_invalid_yaml_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(_write(tmp_path, "data: {path: x}\ntrain: [1, 2\n"))


def test_micro_batch_auto_splits_rows_per_step_and_the_numbers_must_agree(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, train={"micro_batch": "auto", "rows_per_step": 8})
    assert cfg.train.step_rows == 8
    assert tiny_config(tmp_path, alpaca_file, train={"micro_batch": 2, "grad_accum": 3}).train.step_rows == 6
    with pytest.raises(ConfigError, match="set rows_per_step"):
        tiny_config(tmp_path, alpaca_file, train={"micro_batch": "auto"})
    with pytest.raises(ConfigError, match="rows_per_step=8 is not micro_batch x grad_accum"):
        tiny_config(tmp_path, alpaca_file, train={"micro_batch": 2, "grad_accum": 3, "rows_per_step": 8})
    # a micro-batch given on a recipe's rows per step: accumulation makes up the rows
    split = tiny_config(tmp_path, alpaca_file, train={"micro_batch": 2, "rows_per_step": 8}).train
    assert (split.micro_batch, split.grad_accum, split.step_rows) == (2, 4, 8)
    with pytest.raises(ConfigError, match="rows_per_step=8 is not micro_batch x grad_accum"):
        tiny_config(tmp_path, alpaca_file, train={"micro_batch": 3, "rows_per_step": 8})


# --- every input bounded --------------------------------------------------------------------------------------

# field -> values each refused with a message naming the field (non-finite, out of range, past 64 bits)
OUT_OF_RANGE = {
    "train.lr": [".inf", ".nan", "-1", "0", "1.0e999", "2"],
    "train.warmup": [".inf", "-0.5", "1.0e300"],
    "train.weight_decay": [".inf", "-1", "5"],
    "train.max_grad_norm": [".inf", ".nan", "0"],
    "train.epochs": [".inf", "0", "1.0e300"],
    "train.seed": ["-1", str(2**64), str(10**30)],
    "train.max_steps": ["0", str(2**63), "1.0e300"],
    "train.micro_batch": ["0", str(2**70)],
    "train.grad_accum": ["0", str(2**70)],
    "train.log_every": ["0", str(2**70)],
    "lora.alpha": [".inf", ".nan", "0", "1.0e300"],
    "lora.dropout": [".nan", "1", "-0.1"],
    "lora.r": ["0", str(2**40)],
    "data.eval_fraction": [".nan", "1", "-0.1"],
    "data.max_samples": ["0", str(2**70)],
    "max_seq_len": ["0", str(2**70)],
    "save.every_steps": ["0", str(2**70)],
    "save.keep": ["0", str(2**70)],
    "eval.batch_size": ["0", str(2**70)],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in OUT_OF_RANGE.items() for v in values])
def test_every_number_is_finite_and_in_range_from_the_file_and_from_overrides(tmp_path, field, value):
    section, _, key = field.rpartition(".")
    in_data = f", {key}: {value}" if section == "data" else ""
    setting = {"": f"{key}: {value}\n", "data": ""}.get(section, f"{section}: {{{key}: {value}}}\n")
    text = f"data: {{path: x.jsonl{in_data}}}\n" + setting
    with pytest.raises(ConfigError, match=rf"c.yaml: {re.escape(field)}: "):
        load_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=rf"c.yaml: {re.escape(field)}: "):
        load_config(_write(tmp_path, "data: {path: x.jsonl}\n"), [f"{field}={value}"])


@settings(max_examples=150, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True) | st.integers(min_value=-2**80, max_value=2**80),
       seed=st.integers(min_value=-2**80, max_value=2**80))
def test_any_number_either_validates_in_range_or_is_one_config_error(lr, seed):
    try:
        config = config_from_dict({"data": {"path": "x"}, "train": {"lr": lr, "seed": seed}})
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    assert math.isfinite(config.train.lr) and 0 < config.train.lr <= 1 and 0 <= config.train.seed < 2**32


def _billion_laughs() -> str:
    """Nine levels of nine aliases each: ~350 bytes that expand to 9^9 strings."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(8):
        name, previous = chr(ord("b") + level), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\ndata: {path: x.jsonl}\n"


@pytest.mark.parametrize("text, message", [
    (_billion_laughs(), r"aliases expand to 4\d\d,\d\d\d,\d\d\d values \(at most 100,000\)"),
    ("data: &d {path: x.jsonl, more: *d}\n", "a YAML alias refers to itself"),
    ("data: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    ("data: {path: x.jsonl}\n# " + "x" * (1 << 20) + "\n", "over 1 MiB, too large for a config"),
    ("data: {path: x.jsonl}\nmodel: \"\\xff\"\n\xff\n", "not UTF-8"),
])
def test_yaml_bombs_and_oversized_files_fail_fast(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape") if "\xff" not in text else
                     text.encode("latin-1"))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert time.perf_counter() - started < 5


def test_overrides_get_the_same_bounds(tmp_path):
    path = _write(tmp_path, "data: {path: x.jsonl}\n")
    with pytest.raises(ConfigError, match="alias refers to itself"):
        load_config(path, ["train.lr=&a [*a]"])
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path, ["train.lr=" + "[" * 5000])
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path, ["a" + ".a" * 5000 + "=1"])
    with pytest.raises(ConfigError, match="the key has an empty part"):
        load_config(path, ["train..lr=1"])


@pytest.mark.parametrize("where", ["value", "key", "override"])
def test_an_error_line_quotes_only_a_short_prefix_of_a_huge_value(tmp_path, where):
    huge = "x" * 500_000
    text = {"value": f"data: {{path: x.jsonl}}\nmethod: {huge}\n",
            "key": f"data: {{path: x.jsonl}}\ntrain: {{{'y' * 1000}: 1}}\n",
            "override": "data: {path: x.jsonl}\n"}[where]
    overrides = [f"method={huge}"] if where == "override" else []
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text), overrides)
    message = str(caught.value)
    assert len(message) < 1000 and "\n" not in message and "characters)" in message


def test_a_config_path_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)  # opening a FIFO for reading would block until a writer comes
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


@pytest.mark.parametrize("field", ["output_dir", "model", "data.path", "budget"])
@pytest.mark.parametrize("value", ["''", "'   '", '"a\\0b"'])
def test_empty_names_and_paths_are_refused(tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: must not (be empty|contain a NUL)"):
        load_config(_write(tmp_path, "data: {path: x.jsonl}\n"), [f"{field}={value}"])


@pytest.mark.parametrize("value", ["foo", "0GiB", "nanGiB", "infGiB", "1e-12GiB", "20000GiB", "-3GiB", "x" * 60])
def test_a_budget_that_is_neither_a_card_nor_a_size_is_refused_when_the_config_is_read(tmp_path, value):
    with pytest.raises(ConfigError, match="c.yaml: budget: .* is neither a card"):
        load_config(_write(tmp_path, "data: {path: x.jsonl}\n"), [f"budget={value}"])


@pytest.mark.parametrize("value", ["auto", "t4", "H100", "15GiB", "0.5gb", " 10GiB "])
def test_a_card_or_a_size_is_a_budget(tmp_path, value):
    assert load_config(_write(tmp_path, "data: {path: x.jsonl}\n"), [f"budget={value}"]).budget.strip() == \
        value.strip()


def test_a_tilde_means_the_home_folder_in_every_path(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "configs").mkdir(parents=True)
    (home / "data.jsonl").write_text("{}\n")
    (home / "configs" / "c.yaml").write_text("data: {path: ~/data.jsonl}\noutput_dir: ~/runs/x\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("~/configs/c.yaml", [])
    assert cfg.output_dir == str(home / "runs" / "x") and cfg.data.path == str(home / "data.jsonl")
    assert load_config("~/configs/c.yaml", ["output_dir=~/"]).output_dir == str(home) + "/"
    assert config_from_dict({"data": {"path": "x"}, "output_dir": "~/r"}).output_dir == str(home / "r")
    assert not (tmp_path / "~").exists()


PREFERENCE_CONFIGS = [  # (objective and preference section, the one-line error; None: valid)
    ({}, None),
    ({"objective": "sft", "preference": {}}, None),
    ({"objective": "sft", "preference": {"beta": 0.1, "desirable_weight": 1.0}}, None),  # defaults, spelled out
    ({"objective": "dpo"}, None),
    ({"objective": "kto", "preference": {"beta": 0.2, "desirable_weight": 1.33}}, None),
    ({"objective": "orpo", "preference": {"prompt_nll": False}}, None),
    ({"objective": "dpo", "data": {"path": "x", "train_on_prompt": True}}, "data.train_on_prompt applies to "
                                                                            "objective: sft (objective is dpo"),
    ({"rl": "dpo"}, "unknown key 'rl'; did you mean 'objective'?"),
    ({"pref_beta": 0.2}, "unknown key 'pref_beta'; did you mean 'preference.beta'?"),
    ({"objective": "kto", "preference": {"kto_chosen_weight": 2}}, "did you mean 'preference.desirable_weight'?"),
    ({"objective": "sft", "preference": {"beta": 0.2}}, "preference.beta applies to objective: dpo or orpo or kto "
                                                        "(objective is sft)"),
    ({"objective": "dpo", "preference": {"undesirable_weight": 2}}, "preference.undesirable_weight applies to "
                                                                    "objective: kto (objective is dpo)"),
    ({"objective": "kto", "preference": {"loss_type": "ipo"}}, "preference.loss_type applies to objective: dpo"),
    ({"objective": "dpo", "preference": {"prompt_nll": False}}, "preference.prompt_nll applies to objective: orpo"),
    ({"objective": "dpo", "preference": {"label_smoothing": 0.1}}, "set preference.loss_type: robust"),
    ({"objective": "dpo", "preference": {"label_smoothing": 0.5, "loss_type": "robust"}},
     "preference.label_smoothing: Input should be less than 0.5"),
    ({"objective": "dpo", "preference": {"beta": 0}}, "preference.beta: Input should be greater than 0"),
    ({"objective": "dpo", "preference": {"loss_type": "kto_pair"}}, "preference.loss_type: Input should be"),
    ({"objective": "orpo", "preference": {"betta": 0.1}}, "unknown key 'preference.betta'; did you mean "
                                                          "'preference.beta'?"),
    ({"objective": "simpo"}, "objective: Input should be 'sft', 'dpo', 'orpo' or 'kto'"),
]


@pytest.mark.parametrize("fields, error", PREFERENCE_CONFIGS)
def test_objective_and_preference_parameters_are_validated_together(fields, error):
    raw = {"data": {"path": "x"}, **fields}
    if error is None:
        assert config_from_dict(raw, "c.yaml").objective == fields.get("objective", "sft")
        return
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, "c.yaml")
    assert error in str(caught.value) and str(caught.value).startswith("c.yaml: ")


def test_a_resolved_config_with_every_preference_field_spelled_out_loads_again():
    import yaml
    from snugtune.config import config_to_yaml
    config = config_from_dict({"data": {"path": "x"}})
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config
