"""End-to-end runs on shape:tiny: the run directory (docs/architecture.md), peft reload, resume, the CLI."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_config
from snugtune.config import Config
from snugtune.data.batches import collate
from snugtune.data.prepare import prepare_data
from snugtune.loss import mean_loss
from snugtune.precision import Precision
from snugtune.engine.train import train
from snugtune.models.load import load_tokenizer

RUN_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "config.yaml", "metrics.jsonl", "summary.json", "loss.png"}
SUMMARY_KEYS = {"train_loss_final", "eval_loss_before", "eval_loss_after", "peak_memory_bytes", "wall_seconds",
                "tokens_trained", "trainable_params", "total_params", "versions", "device"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import alpaca_rows, write_jsonl
    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "alpaca.jsonl", alpaca_rows(48))
    cfg = tiny_config(tmp, data, train={"max_steps": 8, "micro_batch": 4, "grad_accum": 2, "lr": 5e-3},
                      save={"every_steps": 4, "keep": 1})
    return cfg, train(cfg, show_progress=False)


def test_run_directory_is_complete(finished_run):
    cfg, summary = finished_run
    run = cfg.output_dir
    from pathlib import Path
    assert RUN_FILES <= {p.name for p in Path(run).iterdir()}
    assert SUMMARY_KEYS <= set(json.loads((Path(run) / "summary.json").read_text()))
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_bytes"} <= set(steps[0])
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["trainable_params"] < summary["total_params"]
    resolved = Config.model_validate(yaml.safe_load((Path(run) / "config.yaml").read_text()))
    assert cfg.train.grad_checkpointing == "auto" and resolved.train.grad_checkpointing is False  # resolved: CPU
    assert cfg.quant.dense_copy == "auto" and resolved.quant.dense_copy is False
    assert cfg.offload.activations == "auto" and resolved.offload.activations is False  # no 'auto' left
    assert resolved.model_copy(update={"train": cfg.train, "quant": cfg.quant, "offload": cfg.offload}) == cfg
    assert [p.name for p in (Path(run) / "checkpoints").iterdir()] == ["step-8"]  # keep=1 rotated step-4 out


def test_peft_alone_reloads_base_and_adapter_with_the_same_loss(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    cfg, summary = finished_run
    adapter_config = json.loads((__import__("pathlib").Path(cfg.output_dir) / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, cfg.output_dir)
    tokenizer = load_tokenizer(cfg.output_dir)
    data = prepare_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train.seed)
    batches = [collate(data.eval[i:i + cfg.eval.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(data.eval), cfg.eval.batch_size)]
    loss, _ = mean_loss(model, batches, Precision(summary["precision"], "cpu"), torch.device("cpu"))
    assert loss == pytest.approx(summary["eval_loss_after"], abs=1e-5)
    # and the logits agree with a plain forward through transformers
    out = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    assert torch.isfinite(out).all()


def test_rerun_resumes_from_the_checkpoint_and_extends(finished_run, tmp_path):
    cfg, _ = finished_run
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 10})})
    summary = train(longer, show_progress=False)
    assert summary["resumed_from"].endswith("step-8") and summary["steps"] == 10
    from pathlib import Path
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))


def test_cli_train_end_to_end(tmp_path, alpaca_file):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "shape:tiny", "data": {"path": str(alpaca_file)}, "max_seq_len": 64,
                                      "train": {"max_steps": 2}, "device": "cpu"}))
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(config), f"output_dir={tmp_path / 'r'}",
                           "lora.r=4", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss:" in proc.stdout and str(tmp_path / "r") in proc.stdout
    assert "data format: alpaca (rows have 'instruction' and 'output')" in proc.stderr and "rows read 40" in proc.stderr
    assert (tmp_path / "r" / "adapter_model.safetensors").is_file()


def test_missing_data_file_is_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: shape:tiny\ndata: {path: nowhere.jsonl}\ndevice: cpu\n")
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(config), f"output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nowhere.jsonl does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_lora_target_is_exit_2_and_quotes_the_names_intact(tmp_path, alpaca_file):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "shape:tiny", "data": {"path": str(alpaca_file)}, "device": "cpu",
                                      "lora": {"targets": ["foo_proj"]}}))
    proc = subprocess.run([sys.executable, "-m", "snugtune", "train", str(config), f"output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "['foo_proj'] not found in llama" in proc.stderr and "'down_proj']" in proc.stderr


def test_a_resume_on_changed_data_is_refused_unless_accepted_and_then_recorded(tmp_path):
    from conftest import alpaca_rows, write_jsonl
    from snugtune.errors import UserError
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(24))
    cfg = tiny_config(tmp_path, data, train={"max_steps": 2}, save={"every_steps": 1, "keep": 1})
    first = train(cfg, show_progress=False)
    assert first["data_changes"] == [] and len(first["data_digest"]) == 64
    write_jsonl(data, alpaca_rows(24, seed=1))  # same path, other rows
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3})})
    with pytest.raises(UserError, match="the data changed since the checkpoint step-2"):
        train(longer, show_progress=False)
    notices = []
    summary = train(longer, show_progress=False, notify=notices.append, accept_new_data=True)
    assert summary["steps"] == 3 and any("resuming on the new data" in n for n in notices)
    assert [c["step"] for c in summary["data_changes"]] == [2] and summary["data_digest"] != first["data_digest"]
    assert summary["data_changes"][0]["from"] == first["data_digest"]
