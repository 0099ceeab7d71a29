import subprocess
import sys

import pytest

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


PREFERENCE_CONFIGS = [  # (objective and preference section, the one-line error; None: valid)
    ({}, None),
    ({"objective": "sft", "preference": {}}, None),
    ({"objective": "sft", "preference": {"beta": 0.1, "desirable_weight": 1.0}}, None),  # defaults, spelled out
    ({"objective": "dpo"}, "objective: dpo is coming (issue 38)"),
    ({"objective": "kto", "preference": {"beta": 0.2, "desirable_weight": 1.33}}, "objective: kto is coming"),
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
        assert config_from_dict(raw, "c.yaml").objective == "sft"
        return
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, "c.yaml")
    assert error in str(caught.value) and str(caught.value).startswith("c.yaml: ")


def test_a_resolved_config_with_every_preference_field_spelled_out_loads_again():
    import yaml
    from snugtune.config import config_to_yaml
    config = config_from_dict({"data": {"path": "x"}})
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config
