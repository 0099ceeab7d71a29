"""`snugtune bench --objective dpo`: the pairs every stack trains, and the TRL and Unsloth stacks run on CPU (Unsloth
through a stand-in of its two calls) so that the GPU call does not fail on a typo."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import REPO_ROOT
from snugtune.bench.compare import bench_config, long_pairs
from snugtune.config import config_from_dict
from snugtune.data.prepare import prepare_data


def test_bench_pairs_cut_every_sequence_to_the_benched_length(tmp_path, tokenizer):
    config = config_from_dict(bench_config("tiny", 96, 2, 2, None, "cpu", pairs=long_pairs(tmp_path, 96)))
    assert config.objective == "dpo" and config.data.format == "preference"
    data = prepare_data(config.data, tokenizer, config.max_seq_len, 0, objective="dpo")
    for pair in data.train + data.eval:
        assert len(pair.prompt_ids) + len(pair.chosen_ids) == len(pair.prompt_ids) + len(pair.rejected_ids) == 96
        assert len(pair.prompt_ids) < 96  # every sequence scores answer tokens


@pytest.mark.slow
def test_bench_dpo_runs_snugtune_and_trls_dpo_trainer_on_the_same_pairs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "snugtune", "bench", "--objective", "dpo", "--shape", "tiny", "--seq",
                           "64", "--batch", "2", "--steps", "2", "--device", "cpu", "--against", "trl,unsloth",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["setting"]["objective"] == "dpo" and "| trl |" in proc.stdout
    assert results["snugtune"]["tokens_per_s_median_step"] > 0 and results["trl"]["tokens_per_s_median_step"] > 0
    assert results["trl"]["recipe"].startswith("TRL ") and results["trl"]["loss_first"] == pytest.approx(0.6931, abs=1e-3)
    assert "unsloth" in results["unsloth"]["error"]  # not installed here, or no GPU: said, not faked


STAND_IN = textwrap.dedent('''
    """Unsloth's calls the DPO stack makes, standing in on a CPU: they record their arguments and return what
    transformers and peft return, so the stack's own code runs (not Unsloth's kernels)."""
    import json, os
    CALLS = os.environ["UNSLOTH_CALLS"]
    __version__ = "stand-in"

    def _record(name, **kwargs):
        with open(CALLS, "a") as handle:
            handle.write(json.dumps({"call": name, **{k: str(v) for k, v in kwargs.items()}}) + "\\n")

    def PatchDPOTrainer():
        _record("PatchDPOTrainer")

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit):
            from transformers import AutoModelForCausalLM, AutoTokenizer
            _record("from_pretrained", max_seq_length=max_seq_length, load_in_4bit=load_in_4bit)
            return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype), AutoTokenizer.from_pretrained(model_name)

        @staticmethod
        def get_peft_model(model, r, lora_alpha, lora_dropout, target_modules, bias, use_gradient_checkpointing,
                           random_state, max_seq_length):
            from peft import LoraConfig, get_peft_model
            _record("get_peft_model", r=r, use_gradient_checkpointing=use_gradient_checkpointing)
            return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                    target_modules=target_modules, bias=bias, task_type="CAUSAL_LM"))
''')


@pytest.mark.slow
def test_the_unsloth_dpo_stack_makes_unsloths_documented_calls(tmp_path):
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text(STAND_IN)
    config = bench_config("tiny", 64, 2, 2, None, "cpu", pairs=long_pairs(tmp_path, 64))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": f"{tmp_path}:{REPO_ROOT / 'src'}", "UNSLOTH_CALLS": str(tmp_path / "calls.jsonl"),
           "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "snugtune.bench.unsloth_dpo", str(tmp_path / "c.yaml"), "--out",
                           str(tmp_path / "u.json")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c["call"] for c in calls] == ["PatchDPOTrainer", "from_pretrained", "get_peft_model"]
    assert calls[1]["load_in_4bit"] == "True" and calls[2]["use_gradient_checkpointing"] == "unsloth"
    result = json.loads((tmp_path / "u.json").read_text())
    assert result["recipe"].startswith("unsloth stand-in DPO") and result["steps"] == 2
