"""A crash at any point of a checkpoint save (keep: 1) leaves the last complete checkpoint loadable,
including when the same step is saved again; a full disk at any write of a save is one clear error."""

import errno
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError

import snugtune.engine.checkpoint as checkpoint_module
from snugtune.engine.checkpoint import TrainPosition, complete_checkpoints, load_checkpoint, save_checkpoint
from snugtune.errors import CheckpointWriteError
from snugtune.precision import resolve_precision


class Killed(BaseException):
    """The process died here: this operation and every later one never happen."""


def _training_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, resolve_precision("fp32", torch.device("cpu")).grad_scaler()


def _save(run_dir, step: int, seed: int):
    model, optimizer, scheduler, scaler = _training_state(seed)
    return save_checkpoint(run_dir, model, optimizer, scheduler, scaler, TrainPosition(step=step, tokens_trained=seed),
                           keep=1, metrics=[{"step": step}], config_yaml=f"seed: {seed}\n")


class KillSwitch:
    """Wraps every file-system call a save makes; the k-th call and all after it raise Killed."""

    OPERATIONS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync"),
                  (shutil, "rmtree"), (checkpoint_module, "save_file"), (torch, "save")]

    def __init__(self, monkeypatch, at: int):
        self.calls, self.at, self.dead = 0, at, False
        for module, name in self.OPERATIONS:
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name)))
        real_write = type(checkpoint_module.Path()).write_text
        monkeypatch.setattr(type(checkpoint_module.Path()), "write_text",
                            lambda path, *a, **k: self.wrap(real_write)(path, *a, **k))

    def wrap(self, real):
        def operation(*args, **kwargs):
            self.calls += 1
            if self.dead or self.calls == self.at:
                self.dead = True
                raise Killed()
            return real(*args, **kwargs)
        return operation


def _newest_loads(run_dir) -> int:
    newest = complete_checkpoints(run_dir)[-1]
    model, optimizer, scheduler, scaler = _training_state(99)
    return load_checkpoint(newest, model, optimizer, scheduler, scaler).tokens_trained


@pytest.mark.parametrize("next_save", ["the next step", "the same step again"])
def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint(next_save, tmp_path):
    step, seed = (2, 2) if next_save == "the next step" else (1, 3)
    for at in range(1, 200):
        run_dir = tmp_path / f"run-{at}"
        _save(run_dir, step=1, seed=1)
        with pytest.MonkeyPatch.context() as monkeypatch:
            switch = KillSwitch(monkeypatch, at)
            try:
                _save(run_dir, step=step, seed=seed)
            except Killed:
                pass
        assert _newest_loads(run_dir) in (1, seed), f"killed at operation {at}"
        if not switch.dead:
            break  # the save ran to its end: every point before it was tried
        # the next save after the crash works, cleans up and leaves exactly one checkpoint
        _save(run_dir, step=step, seed=seed)
        assert _newest_loads(run_dir) == seed
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{step}"]
    assert at > 5 and _newest_loads(run_dir) == seed


class DiskFull:
    """From the k-th write call of a save on, the disk is full, each writer failing the way it really does:
    OSError(ENOSPC) from mkdir, fsync and Python's writes; SafetensorError naming os error 28 from safetensors;
    and torch.save, whose file's write raises ENOSPC, raises its own RuntimeError (without the reason)."""

    def __init__(self, monkeypatch, at: int):
        self.calls, self.at = 0, at
        for module, name in ((os, "mkdir"), (os, "fsync")):
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name), self.oserror))
        monkeypatch.setattr(checkpoint_module, "save_file", self.wrap(checkpoint_module.save_file, self.safetensors))
        path_type = type(checkpoint_module.Path())
        monkeypatch.setattr(path_type, "write_text", self.wrap(path_type.write_text, self.oserror))
        monkeypatch.setattr(checkpoint_module, "open", self.wrap(open, self.oserror, files=True), raising=False)

    @staticmethod
    def oserror():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    @staticmethod
    def safetensors():
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def wrap(self, real, error, files: bool = False):
        def operation(*args, **kwargs):
            self.calls += 1
            if self.calls < self.at:
                return real(*args, **kwargs)
            if not files:
                raise error()
            handle = real(*args, **kwargs)  # the file opens; its writes fail
            handle.write = lambda data: (_ for _ in ()).throw(error())
            return handle
        return operation


@pytest.mark.parametrize("earlier", [True, False])
def test_a_full_disk_at_any_write_of_a_save_is_one_clear_error_and_the_previous_checkpoint_stays(earlier, tmp_path):
    for at in range(1, 100):
        run_dir = tmp_path / f"run-{at}"
        if earlier:
            _save(run_dir, step=1, seed=1)
        with pytest.MonkeyPatch.context() as monkeypatch:
            disk = DiskFull(monkeypatch, at)
            try:
                _save(run_dir, step=2, seed=2)
            except CheckpointWriteError as exc:
                previous = "the previous checkpoint step-1 is intact" if earlier else "no earlier checkpoint exists"
                assert str(exc).endswith(f"No space left on device; {previous}"), (at, str(exc))
                assert "\n" not in str(exc)
            if disk.calls < at:
                break  # the save made fewer writes than `at`: every one of them has failed in turn
        assert [p.name for p in complete_checkpoints(run_dir)] == (["step-1"] if earlier else [])
        assert not list((run_dir / "checkpoints").glob(".tmp-*")), f"write {at} left a temp folder"
        if earlier:
            assert _newest_loads(run_dir) == 1
    assert at > 6 and _newest_loads(run_dir) == 2


def _adamw_run(flat: bool):
    """A two-tensor model and torch AdamW over one flat parameter (one process, DDP) or per tensor (FSDP)."""
    from snugtune.engine.optim import flatten_trainable
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([flatten_trainable(params)] if flat else params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, resolve_precision("fp32", torch.device("cpu")).grad_scaler()


def _adamw_step(model, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(2, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def test_a_flat_optimizer_state_resumes_per_tensor_with_each_tensor_its_own_moments_and_step(tmp_path):
    # one process's flat AdamW state, resumed where every tensor has its own (FSDP's layout): moments shaped
    # like their tensor, and a step count each (a shared one would be advanced once per tensor)
    flat = _adamw_run(flat=True)
    for seed in (1, 2):
        _adamw_step(flat[0], flat[1], seed)
    saved = save_checkpoint(tmp_path, *flat, TrainPosition(step=2), keep=1, metrics=[], config_yaml="a: 1\n")
    per_tensor = _adamw_run(flat=False)
    load_checkpoint(saved, *per_tensor)
    model, optimizer = per_tensor[:2]
    for param, entry in optimizer.state.items():
        assert entry["exp_avg"].shape == param.shape and float(entry["step"]) == 2
    assert len({id(entry["step"]) for entry in optimizer.state.values()}) == len(optimizer.state)
    for seed in (3, 4):  # the same updates as the flat run makes
        _adamw_step(flat[0], flat[1], seed)
        _adamw_step(model, optimizer, seed)
    for got, want in zip(model.parameters(), flat[0].parameters()):
        assert torch.allclose(got, want, atol=1e-6), (got, want)
