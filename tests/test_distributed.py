"""Data parallelism on CPU: torchrun + gloo + PyTorch DDP, compared with one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import alpaca_rows, write_jsonl
from snugtune.engine.distributed import DistContext, context_from_env


def _config(tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(48))
    raw = {"model": "shape:tiny", "data": {"path": str(data), "eval_fraction": 0.1}, "max_seq_len": 96,
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all-linear"},
           "train": {"max_steps": 6, "micro_batch": 2, "grad_accum": 2, "lr": 1e-2, "seed": 0},
           "save": {"every_steps": 3}, "device": "cpu"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(*args, processes: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "snugtune", "train", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_two_gloo_processes_train_like_one_at_the_same_effective_batch(tmp_path, checkpointing):
    config = _config(tmp_path)
    ckpt = f"train.grad_checkpointing={checkpointing}"
    _train(config, f"output_dir={tmp_path / 'one'}", ckpt)
    two = _train(config, f"output_dir={tmp_path / 'two'}", "train.grad_accum=1", ckpt, processes=2)
    assert "on 2 processes" in two.stdout
    assert _max_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    one_losses, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one_losses] == [s for s, _ in two_losses]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one_losses, two_losses))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["tokens_trained"] == json.loads((tmp_path / "one" / "summary.json").read_text())["tokens_trained"]


def test_a_checkpoint_from_two_processes_resumes_on_one(tmp_path):
    config = _config(tmp_path)
    _train(config, f"output_dir={tmp_path / 'one'}")
    _train(config, f"output_dir={tmp_path / 'moved'}", "train.grad_accum=1", processes=2)
    import shutil
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "step-6")  # as if stopped after step 3
    resumed = _train(config, f"output_dir={tmp_path / 'moved'}")  # 1 process, micro 2 x accum 2: same rows/step
    assert "resuming from" in resumed.stderr and "step-3" in resumed.stderr
    assert _max_diff(tmp_path / "one", tmp_path / "moved") < 1e-5


@pytest.mark.parametrize("method, precision, tolerance", [("lora", "fp32", 1e-5), ("qlora", "fp32", 1e-5),
                                                          ("qlora", "fp16", 1e-2)])
def test_fsdp_shards_the_base_over_two_processes_and_trains_like_one(tmp_path, method, precision, tolerance):
    # fp16 (T4): loss scaling with a scaler that skips a step on every process or on none; the adapter then
    # differs by fp16 rounding that Adam's normalisation magnifies on near-zero gradients: a gradient whose
    # sign rounds differently moves its weight by up to 2 x lr (1e-2) a step. The loss curves must agree.
    config = _config(tmp_path)
    _train(config, f"output_dir={tmp_path / 'one'}", f"method={method}", f"train.precision={precision}")
    two = _train(config, f"output_dir={tmp_path / 'two'}", f"method={method}", "train.grad_accum=1",
                 "train.data_parallel=fsdp", f"train.precision={precision}", processes=2)
    assert "on 2 processes" in two.stdout
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["data_parallel"] == "fsdp" and two_summary["world_size"] == 2
    # each process holds about half of the frozen base (4-bit packed weights included)
    ratio = two_summary["frozen_weight_bytes_per_process"] / one_summary["frozen_weight_bytes_per_process"]
    assert 0.45 < ratio < 0.6, ratio
    assert _max_diff(tmp_path / "one", tmp_path / "two") < tolerance
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")))
    if method == "lora":  # an FSDP checkpoint resumes in one process, to the same adapter
        import shutil
        shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-6")
        resumed = _train(config, f"output_dir={tmp_path / 'two'}", f"method={method}", f"train.precision={precision}")
        assert "resuming from" in resumed.stderr
        assert _max_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def test_context_comes_from_the_launchers_environment():
    assert context_from_env({}) == DistContext()
    ctx = context_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert ctx.enabled and not ctx.is_main and ctx.world_size == 4
