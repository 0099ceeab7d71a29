"""Checkpoints under RUN_DIR/checkpoints/step-N, written to a temp name and renamed when complete.

A checkpoint holds the trainable weights, optimizer, scheduler, GradScaler, RNG states and the
data position. Only folders with a COMPLETE marker are ever resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from snugtune.errors import CheckpointWriteError
from snugtune.engine.distributed import full_tensor, shard_like
from snugtune.rundir import (CHECKPOINTS, COMPLETE, CONFIG, METRICS, POSITION, REPLACED, STATE, TRAINABLE,
                             complete_checkpoints, read_jsonl, write_failure)


@dataclass
class TrainPosition:
    """Where training stands: optimizer steps done, and the epoch / rows of it already trained on."""
    step: int = 0
    epoch: int = 0
    rows_in_epoch: int = 0
    tokens_trained: int = 0
    skipped_steps: int = 0
    rows_per_step: int = 0   # micro_batch x grad_accum x processes when saved (may be split differently)
    run_seconds: float = 0.0  # training time up to this checkpoint, summed over every invocation
    data_digest: str = ""     # the data's content (data.prepare.PreparedData.content_digest) it trained on
    data_changes: list = field(default_factory=list)  # each resume onto changed data: {step, from, to}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Whole trainable tensors on the CPU (gathered from every process when FSDP shards them)."""
    return {name: full_tensor(p.detach()).contiguous().cpu() for name, p in model.named_parameters()
            if p.requires_grad}


def _flat_pieces(optimizer) -> list[int] | None:
    """Sizes of the tensors an optimizer's one flat parameter holds (optim.flatten_trainable), else None."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return getattr(params[0], "pieces", None) if len(params) == 1 else None


def _split_flat_moments(state: dict, pieces: list[int]) -> dict:
    """torch AdamW's state of one flat parameter as the state of its tensors, one entry per tensor (as FSDP's
    optimizer, which keeps one per tensor, writes and reads it)."""
    entry = state["state"].get(0)
    if entry is None:
        split = {}
    else:
        moments = {k: torch.split(v, pieces) for k, v in entry.items() if torch.is_tensor(v) and v.dim() == 1}
        split = {i: {k: moments[k][i].clone() if k in moments else v.clone() if torch.is_tensor(v) else v
                     for k, v in entry.items()} for i in range(len(pieces))}  # AdamW adds to each step in place
    groups = [{**state["param_groups"][0], "params": list(range(len(pieces)))}]
    return {"state": split, "param_groups": groups}


def _join_moments(state: dict) -> dict:
    """The reverse of _split_flat_moments: per-tensor torch AdamW state as the state of one flat parameter."""
    entries = [state["state"][i] for i in sorted(state["state"])]
    joined = {}
    if entries:
        joined = {0: {k: (torch.cat([e[k].reshape(-1) for e in entries]) if torch.is_tensor(v) and v.dim() > 0 else v)
                      for k, v in entries[0].items()}}
    return {"state": joined, "param_groups": [{**state["param_groups"][0], "params": [0]}]}


def _whole_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with sharded (FSDP) moments gathered and torch AdamW's flat moments split
    per tensor, so any process count and either layout can load it."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
                      for i, entry in state["state"].items()}
    pieces = _flat_pieces(optimizer)
    if pieces and isinstance(optimizer, torch.optim.AdamW):
        state = _split_flat_moments(state, pieces)
    return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # saved where another number of GPUs was visible (2 processes, resumed on 1): restore those both have
        for index, generator_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, index)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, scaler, position: TrainPosition, keep: int,
                    metrics: list[dict], config_yaml: str, write: bool = True) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest `keep` complete ones.

    Every process calls it (sharded tensors are gathered); only the one with write=True writes.
    Raises CheckpointWriteError (the older checkpoints untouched) when the disk is full or unwritable.
    """
    weights, optimizer_state = trainable_state(model), _whole_optimizer_state(optimizer)
    root = run_dir / CHECKPOINTS
    final = root / f"step-{position.step}"
    if not write:
        return final
    tmp = root / f".tmp-step-{position.step}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / TRAINABLE))
        _torch_save({"optimizer": optimizer_state, "optimizer_class": type(optimizer).__name__,
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()},
                    tmp / STATE)
        (tmp / POSITION).write_text(json.dumps(asdict(position)))
        (tmp / METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (tmp / CONFIG).write_text(config_yaml)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        (tmp / COMPLETE).write_text("")  # last: a folder without it is never resumed from
        _put_in_place(tmp, final)
    except (OSError, SafetensorError) as exc:  # disk full, quota, unwritable: the older checkpoints stand
        shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_checkpoints(run_dir)
        previous = f"the previous checkpoint {kept[-1].name} is intact" if kept else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final}: {write_failure(exc)}; {previous}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_dir)[:-keep] + _leftovers(root):
        _remove(old)
    return final


class _WriteErrors:
    """The file torch.save writes through, keeping the OSError a write met: torch reports a failed write (a
    full disk) only as RuntimeError("unexpected pos ..."), without the reason."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(value, path: Path) -> None:
    """torch.save, a failed write raised as the OSError it was."""
    with open(path, "wb") as handle:
        writer = _WriteErrors(handle)
        try:
            torch.save(value, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the complete tmp folder to final. A checkpoint of the same step already there is renamed
    to step-N.replaced first and removed only after the new one is in place: at every instant one
    complete copy of the step is on disk under a name complete_checkpoints finds."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(final.name + REPLACED)
    if aside.exists():
        _remove(aside)  # a leftover from a crash, while final (complete) is still there
    os.replace(final, aside)
    os.replace(tmp, final)
    _remove(aside)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder, its COMPLETE marker first: a crash half-way leaves a folder never resumed from."""
    (checkpoint / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def _leftovers(root: Path) -> list[Path]:
    """What crashed saves left (one process writes a run's checkpoints): temp folders, folders whose removal
    was cut short (no marker), and step-N.replaced folders whose step-N is complete again."""
    temps = [p for p in root.glob(".tmp-step-*")]
    unmarked = [p for p in root.glob("step-*") if not (p / COMPLETE).is_file()]
    replaced = [p for p in root.glob(f"step-*{REPLACED}")
                if (p.with_name(p.name.removesuffix(REPLACED)) / COMPLETE).is_file()]
    return temps + unmarked + replaced


def saved_position(path: Path) -> TrainPosition:
    """Where the run stood at this checkpoint."""
    return TrainPosition(**json.loads((path / POSITION).read_text()))


def saved_config(path: Path) -> str:
    """The config (YAML) that trained up to this checkpoint."""
    return (path / CONFIG).read_text()


def checkpoint_metrics(path: Path) -> list[dict]:
    """The metrics.jsonl rows logged up to this checkpoint."""
    return read_jsonl(path / METRICS)


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, notify=lambda message: None) -> TrainPosition:
    """Restore everything save_checkpoint wrote, whatever the process count then and now (sharded
    tensors are laid out as this run's are); returns the position to continue from."""
    weights = load_file(str(path / TRAINABLE))
    params = dict(model.named_parameters())
    for name, tensor in weights.items():
        params[name].data.copy_(shard_like(tensor.to(params[name].dtype), params[name]))
    state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    saved_class = state.get("optimizer_class", type(optimizer).__name__)
    saved = state["optimizer"]
    saved_tensors = sum(len(group["params"]) for group in saved["param_groups"])
    tensors = sum(len(group["params"]) for group in optimizer.param_groups)
    pieces = _flat_pieces(optimizer)
    if pieces and isinstance(optimizer, torch.optim.AdamW) and saved_tensors == len(pieces):
        saved, saved_tensors = _join_moments(saved), 1  # written per tensor (see _whole_optimizer_state)
    if saved_class == type(optimizer).__name__ and saved_tensors == tensors:
        optimizer.load_state_dict(saved)
        for param, entry in optimizer.state.items():  # whole moments, shaped and sharded like their parameter
            for key, value in entry.items():  # (one process splits its flat moments into 1-D pieces)
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = shard_like(value.reshape(param.shape), param)
                elif torch.is_tensor(value):  # a step count: split from one flat state, it may be shared
                    entry[key] = value.clone()
    else:  # e.g. FSDP (torch AdamW, one tensor per matrix) then one GPU (8-bit AdamW over one flat tensor)
        notify(f"the checkpoint's optimizer state ({saved_class}, {saved_tensors} tensors) does not fit this run's "
               f"({type(optimizer).__name__}, {tensors}): its moments start fresh")
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    return saved_position(path)
