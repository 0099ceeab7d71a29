"""The run folder: the one place that knows its files, reads them for evaluation, export and chat, and
writes them for training, each file atomically (temp name, then rename).

RUN/config.yaml        the resolved config            RUN/summary.json   the run's figures
RUN/metrics.jsonl      one row per logged step         RUN/loss.png       training and held-out loss
RUN/checkpoints/step-N one folder per checkpoint (complete when it holds COMPLETE)
RUN/adapter_model.safetensors, adapter_config.json, tokenizer files: the trained result (PEFT format)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from snugtune.errors import UserError

CONFIG, SUMMARY, METRICS, EVAL = "config.yaml", "summary.json", "metrics.jsonl", "eval.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG, LOSS_PLOT = "adapter_model.safetensors", "adapter_config.json", "loss.png"
CHECKPOINTS, COMPLETE = "checkpoints", "COMPLETE"
# inside checkpoints/step-N, beside a copy of CONFIG and METRICS as they were at that step
POSITION, TRAINABLE, STATE = "position.json", "trainable.safetensors", "state.pt"
RUN_SIGNS = (METRICS, CHECKPOINTS, SUMMARY)  # a folder holding any of these is a snugtune run
REPLACED = ".replaced"  # suffix of a checkpoint being replaced by a new save of the same step
# what to do about a damaged file of the run folder
REPAIR = {CONFIG: "restore it from the run's newest checkpoints/step-N/config.yaml, or train again with --fresh",
          SUMMARY: "restore it or train again with --fresh",
          EVAL: "move it aside and run `snugtune eval` again"}


@dataclass(frozen=True)
class RunFolder:
    """A run directory, read by name: every reader of a run goes through here, so a missing or broken file
    is one UserError naming it and what to do."""
    path: Path

    def config_dict(self) -> dict:
        """config.yaml as written by training (validate with config.config_from_dict)."""
        return self._parsed(CONFIG, yaml.safe_load, "not a snugtune run directory")

    def summary(self) -> dict:
        return self._parsed(SUMMARY, json.loads, "training has not finished; run `snugtune train` to finish it")

    def base_model_path(self) -> Path:
        base = self.summary().get("base_model_path")
        if not base:
            raise UserError(f"{self.path / SUMMARY}: no base_model_path; the file is damaged: train again with "
                            f"--fresh, or restore it")
        return Path(base)

    def base_model_folder(self) -> Path:
        """base_model_path, checked to still be a model folder (evaluation, chat and merge read it)."""
        base = self.base_model_path()
        if not (base / "config.json").is_file():
            raise UserError(f"{self.path / SUMMARY}: its base model folder {base} is gone; run `snugtune train` on "
                            f"the run's config to fetch or build it again")
        return base

    def evals(self) -> dict:
        """eval.json ({} before the first `snugtune eval`)."""
        if not (self.path / EVAL).exists():
            return {}
        return self._parsed(EVAL, json.loads, "")

    def metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS)

    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.path)

    def write_config(self, text: str) -> None:
        write_text_atomic(self.path / CONFIG, text)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / SUMMARY, summary)

    def _parsed(self, name: str, parse, missing: str):
        path = self.path / name
        if not path.is_file():
            raise UserError(f"{path}: missing ({missing})")
        try:
            value = parse(path.read_text(encoding="utf-8"))
        except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot be read ({str(exc).splitlines()[0]}); {REPAIR[name]}") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, found {type(value).__name__}; {REPAIR[name]}")
        return value


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix("step-").removesuffix(REPLACED)
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (no marker, temp names) are ignored. A
    step-N.replaced folder stands in for step-N when a crash came between replacing one by the other."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.glob("step-*"), key=lambda p: p.name.endswith(REPLACED)):  # plain names first
        step = _step_of(path)
        if step is not None and step not in found and (path / COMPLETE).is_file():
            found[step] = path
    return [found[step] for step in sorted(found)]


def move_run_aside(run_dir: Path) -> Path | None:
    """Rename an existing run directory to RUN.old-N (never deleted); returns the new name, or None."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    os.replace(run_dir, aside)
    return aside


class MetricsLog:
    """metrics.jsonl, rewritten with the rows kept so far and then appended one line per row; with
    tensorboard=True the numeric fields also go to TensorBoard event files in RUN_DIR/tensorboard, and
    each row also goes to `trackers` (W&B, MLflow) when given."""

    def __init__(self, run_dir: Path, rows: list[dict], tensorboard: bool = False, write: bool = True,
                 trackers=None):
        self.path = run_dir / METRICS
        self.rows = list(rows)
        self.trackers = trackers
        self._write = write  # False on the other processes of a distributed run: they keep rows only
        self._board = None
        if not write:
            return
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._board = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self._write:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)
        if self._board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, row["step"])
            self._board.flush()

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        if self._board is not None:
            self._board.close()


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl); [] when it does not exist. A malformed line is a
    UserError naming the file and line."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path}:{number}: not a JSON line; the file is damaged (delete that line or restore "
                            f"the file from the run's newest checkpoint)") from None
    return rows


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def save_model_artifacts(run_dir: Path, model, tokenizer, base_path: Path, uses_lora: bool,
                         trainable: dict | None = None) -> None:
    """The adapter (PEFT format, base_model_name_or_path = the local base folder) or, for freeze/full,
    the whole trained model; plus tokenizer files and chat_template.jinja. Files land by rename.
    `trainable`: the whole trainable tensors by name, when the model's own are sharded (FSDP)."""
    staging = run_dir / f".final-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if uses_lora:
        model.save_pretrained(staging, safe_serialization=True,
                              **({"state_dict": trainable} if trainable is not None else {}))
        config_path = staging / ADAPTER_CONFIG
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = str(base_path)
        config_path.write_text(json.dumps(adapter_config, indent=2))
        (staging / "README.md").unlink(missing_ok=True)  # peft's empty model card
    else:
        # trained masters are fp32; stored as they are, so the folder reproduces the trained model exactly
        model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if not (staging / "chat_template.jinja").exists() and getattr(tokenizer, "chat_template", None):
        (staging / "chat_template.jinja").write_text(tokenizer.chat_template)
    for item in staging.iterdir():
        os.replace(item, run_dir / item.name)
    staging.rmdir()


def plot_losses(run_dir: Path, metrics: list[dict]) -> None:
    """loss.png: training loss per optimizer step (and held-out loss where logged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.4)
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / f".loss.png.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, run_dir / LOSS_PLOT)
