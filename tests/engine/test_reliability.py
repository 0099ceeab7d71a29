"""Crash safety, exact resume, clean failures and numeric guards (docs/reliability.md lists each guarantee)."""

import errno
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import alpaca_rows, tiny_config, write_jsonl
from snugtune.engine import checkpoint as checkpoint_module
from snugtune import objectives as objectives_module
from snugtune.engine.checkpoint import complete_checkpoints
from snugtune.engine.train import train
from snugtune.errors import CheckpointWriteError, TrainingDiverged, UserError

COMPARED = ("step", "epoch", "loss", "lr", "grad_norm", "skipped_steps")  # timing fields differ run to run


def _config_file(tmp_path: Path, name: str, steps: int, every: int) -> Path:
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(64))
    raw = {"model": "shape:tiny", "data": {"path": str(data), "eval_fraction": 0.1}, "max_seq_len": 96,
           "method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear"},
           "train": {"max_steps": steps, "micro_batch": 2, "grad_accum": 2, "lr": 5e-3, "seed": 3},
           "save": {"every_steps": every, "keep": 5}, "output_dir": str(tmp_path / name), "device": "cpu"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "snugtune", "train", *map(str, args), "--quiet"],
                          capture_output=True, text=True, **kwargs)


def _metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# The driver trains in a subprocess and SIGKILLs itself at a chosen moment: after the 2nd checkpoint is
# complete, or half-way through writing the 3rd (weights written, no COMPLETE marker yet).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import snugtune.engine.checkpoint as ck
    import snugtune.engine.train as tr
    from snugtune.config import load_config
    mode = sys.argv[2]
    saves = {"n": 0}
    real_save, real_file = ck.save_checkpoint, ck.save_file
    def save_then_maybe_die(*args, **kwargs):
        saves["n"] += 1
        out = real_save(*args, **kwargs)
        if mode == "after-second" and saves["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    def write_then_maybe_die(tensors, path):
        real_file(tensors, path)
        if mode == "mid-third" and saves["n"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    tr.save_checkpoint, ck.save_file = save_then_maybe_die, write_then_maybe_die
    tr.train(load_config(sys.argv[1]), show_progress=False)
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The 12-step run that every killed and resumed run is compared with (trained once for all of them)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert _cli(_config_file(root, "straight", steps=12, every=3)).returncode == 0
    return root / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after-second", "mid-third"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, mode, uninterrupted):
    killed = _config_file(tmp_path, "killed", steps=12, every=3)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), mode], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "killed"
    assert [p.name for p in complete_checkpoints(run)] == ["step-3", "step-6"]
    if mode == "mid-third":  # the half-written third checkpoint is there but must be passed over
        assert list((run / "checkpoints").glob(".tmp-step-9-*"))
    resumed = _cli(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "step-6" in resumed.stderr
    a = load_file(str(uninterrupted / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    rows_a = [{k: r.get(k) for k in COMPARED} for r in _metric_rows(uninterrupted)]
    rows_b = [{k: r.get(k) for k in COMPARED} for r in _metric_rows(run)]
    assert rows_a == rows_b


def test_sigint_finishes_the_step_saves_and_exits_130(tmp_path):
    config = _config_file(tmp_path, "run", steps=5000, every=1000)
    proc = subprocess.Popen([sys.executable, "-m", "snugtune", "train", str(config), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    saved = complete_checkpoints(tmp_path / "run")
    assert len(saved) == 1
    position = json.loads((saved[0] / "position.json").read_text())
    assert position["step"] == max(r["step"] for r in _metric_rows(tmp_path / "run"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_swallowed_while_loading_still_stops_the_run_before_its_first_step(tmp_path, alpaca_file,
                                                                                    monkeypatch, signum):
    # a library that catches every exception (a bare except, a finalizer) while the model loads
    import os
    from snugtune.engine import train as train_module
    from snugtune.errors import TrainingInterrupted
    real_plan_run = train_module.plan_run

    def plan_run_in_a_library_that_swallows_it(*args, **kwargs):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs here
        except BaseException:
            pass
        return real_plan_run(*args, **kwargs)
    monkeypatch.setattr(train_module, "plan_run", plan_run_in_a_library_that_swallows_it)
    cfg = tiny_config(tmp_path, alpaca_file, train={"max_steps": 50})
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(TrainingInterrupted, match="at step 0"):
        train(cfg, show_progress=False)
    assert not [r for r in _metric_rows(tmp_path / "run") if "loss" in r]  # no step trained
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # put back


def test_a_truncated_checkpoint_is_skipped_on_resume(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, train={"max_steps": 4}, save={"every_steps": 2, "keep": 3})
    train(cfg, show_progress=False)
    broken = tmp_path / "run" / "checkpoints" / "step-9"
    broken.mkdir()
    (broken / "trainable.safetensors").write_bytes(b"\x00" * 10)  # cut off mid-write, no COMPLETE marker
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6})})
    notices = []
    summary = train(longer, show_progress=False, notify=notices.append)
    assert summary["resumed_from"].endswith("step-4") and summary["steps"] == 6
    assert any("resuming from" in n for n in notices)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, alpaca_file, monkeypatch):
    cfg = tiny_config(tmp_path, alpaca_file, train={"max_steps": 6}, save={"every_steps": 2, "keep": 1})
    calls = {"n": 0}
    real = checkpoint_module.save_file

    def fill_disk_on_second(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)
    monkeypatch.setattr(checkpoint_module, "save_file", fill_disk_on_second)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device; the previous checkpoint step-2 is intact"):
        train(cfg, show_progress=False)
    kept = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-2"]
    assert load_file(str(kept[0] / "trainable.safetensors"))
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_unwritable_output_dir_is_a_clear_error(tmp_path, alpaca_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tiny_config(tmp_path, alpaca_file, output_dir=str(blocker))
    with pytest.raises(UserError, match="exists and is not a plain folder"):
        train(cfg, show_progress=False)


def _inject_inf(monkeypatch, bad_calls):
    """Make the loss of the given training micro-batches (1-based; evaluation not counted) infinite."""
    real = objectives_module.token_loss_sum
    calls = {"n": 0}

    def loss_with_inf(model, batch, **kwargs):
        calls["n"] += torch.is_grad_enabled()
        loss, n = real(model, batch, **kwargs)
        return (loss * float("inf") if calls["n"] in bad_calls else loss), n
    monkeypatch.setattr(objectives_module, "token_loss_sum", loss_with_inf)


def test_fp16_scaler_skips_non_finite_steps_and_counts_them(tmp_path, alpaca_file, monkeypatch):
    cfg = tiny_config(tmp_path, alpaca_file, train={"max_steps": 5, "precision": "fp16"})
    _inject_inf(monkeypatch, bad_calls={2, 3})  # steps 2 and 3 blow up
    summary = train(cfg, show_progress=False)
    assert summary["precision"] == "fp16" and summary["skipped_steps"] == 2 and summary["steps"] == 5
    rows = [r for r in _metric_rows(tmp_path / "run") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 2]
    weights = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, alpaca_file,
                                                                                       monkeypatch):
    cfg = tiny_config(tmp_path, alpaca_file, train={"max_steps": 20, "precision": "fp16", "max_nonfinite_steps": 3},
                      save={"every_steps": 2, "keep": 2})
    _inject_inf(monkeypatch, bad_calls=set(range(3, 100)))  # from step 3 on
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .* last good checkpoint .*step-2"):
        train(cfg, show_progress=False)
    weights = load_file(str(complete_checkpoints(tmp_path / "run")[-1] / "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_refuses_a_changed_config_but_allows_harmless_changes(tmp_path, alpaca_file):
    cfg = tiny_config(tmp_path, alpaca_file, train={"max_steps": 2})
    train(cfg, show_progress=False)
    changed = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 8}),
                                     "train": cfg.train.model_copy(update={"lr": 1e-3})})
    with pytest.raises(UserError, match=r"differs .* in lora.r, train.lr; .* --fresh"):
        train(changed, show_progress=False)
    harmless = cfg.model_copy(update={"save": cfg.save.model_copy(update={"every_steps": 7})})
    assert train(harmless, show_progress=False)["steps"] == 2


@pytest.mark.slow
def test_fresh_moves_the_old_run_aside(tmp_path):
    from snugtune.config import load_config
    config = _config_file(tmp_path, "run", steps=2, every=10)
    train(load_config(config), show_progress=False)  # the old run (in this process: only --fresh needs the CLI)
    again = _cli(config, "--fresh")
    assert again.returncode == 0 and "moved the previous run" in again.stderr
    assert (tmp_path / "run.old-1" / "adapter_model.safetensors").is_file()
    assert "resuming" not in again.stderr


def test_pickle_weights_are_refused_unless_opted_in(tmp_path):
    from snugtune.errors import ConfigError
    from snugtune.models.resolve import resolve_model
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="pickle.*allow_pickle_weights"):
        resolve_model(str(tmp_path))
    assert resolve_model(str(tmp_path), allow_pickle=True).path == tmp_path.resolve()


def test_chat_templates_render_in_a_sandbox():
    from snugtune.models.load import load_tokenizer
    from snugtune.models.resolve import resolve_model
    tokenizer = load_tokenizer(resolve_model("shape:tiny").path)
    tokenizer.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|not safely callable|access to attribute"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_cuda_asked_without_a_gpu_is_exit_2(tmp_path, alpaca_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "shape:tiny", "data": {"path": str(alpaca_file)}, "device": "cuda"}))
    proc = _cli(config, f"output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
