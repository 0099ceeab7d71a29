"""The run folder: the one place that knows its files, reads them for evaluation, export and chat, and
writes them for training, each file atomically (temp name, then rename).

RUN/config.yaml        the resolved config            RUN/summary.json   the run's figures
RUN/metrics.jsonl      one row per logged step         RUN/loss.png       training and held-out loss
RUN/checkpoints/step-N one folder per checkpoint (complete when it holds COMPLETE)
RUN/adapter_model.safetensors, adapter_config.json, tokenizer files: the trained result (PEFT format)
RUN/reference_logps.json  a full or freeze preference run's reference log-probabilities (engine.reference)
RUN/.snugtune-run      the mark that this folder is a run (written when training starts in it)
RUN/.lock              held (flock) by the one process training into the folder
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from snugtune.config import safe_yaml, shorten
from snugtune.errors import ConfigError, UserError

CONFIG, SUMMARY, METRICS, EVAL = "config.yaml", "summary.json", "metrics.jsonl", "eval.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG, LOSS_PLOT = "adapter_model.safetensors", "adapter_config.json", "loss.png"
CHECKPOINTS, COMPLETE = "checkpoints", "COMPLETE"
# inside checkpoints/step-N, beside a copy of CONFIG and METRICS as they were at that step
POSITION, TRAINABLE, STATE = "position.json", "trainable.safetensors", "state.pt"
RUN_MARK, LOCK = ".snugtune-run", ".lock"
REFERENCE_LOGPS = "reference_logps.json"
WRITE_TEST = ".write-test-"  # the probe file each process writes to check output_dir is writable
RUN_FILE_MAX_BYTES = 64 << 20  # config.yaml, summary.json, eval.json are a few KiB; larger is not ours
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
        return self._parsed(CONFIG, lambda text: safe_yaml(text, str(self.path / CONFIG)),
                            "not a snugtune run directory")

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
        if path.stat().st_size > RUN_FILE_MAX_BYTES:
            raise UserError(f"{path}: over {RUN_FILE_MAX_BYTES >> 20} MiB, not a file training wrote; {REPAIR[name]}")
        try:
            value = parse(path.read_text(encoding="utf-8"))
        except ConfigError as exc:
            raise UserError(f"{exc}; {REPAIR[name]}") from None
        except (ValueError, UnicodeDecodeError) as exc:
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


def is_run_folder(path: Path) -> bool:
    """A folder snugtune training wrote: it holds the run mark, or (a run from before the mark) the config.yaml
    training writes beside metrics.jsonl, checkpoints/ or summary.json."""
    if (path / RUN_MARK).is_file():
        return True
    if not any((path / name).exists() for name in (METRICS, CHECKPOINTS, SUMMARY)):
        return False
    config = path / CONFIG
    try:
        if not config.is_file() or config.stat().st_size > RUN_FILE_MAX_BYTES:
            return False
        written = safe_yaml(config.read_text(encoding="utf-8"), str(config))
    except (ConfigError, OSError, UnicodeDecodeError):
        return False
    return isinstance(written, dict) and {"model", "data", "method", "train", "output_dir"} <= written.keys()


def _holds_files(path: Path) -> bool:
    """Whether a folder holds anything but the write probes of training processes starting in it."""
    return path.is_dir() and any(not p.name.startswith(WRITE_TEST) for p in path.iterdir())


def _refuse_not_a_folder(run_dir: Path) -> None:
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UserError(f"output_dir: {run_dir} exists and is not a plain folder (a file or a link); choose another")


def prepare_run_folder(run_dir: Path) -> None:
    """Make output_dir ready to train into: refuse a file, a link, or a folder that holds files and is not a
    run (UserError, nothing changed); create it, mark it as a run, check it is writable."""
    _refuse_not_a_folder(run_dir)
    if _holds_files(run_dir) and not is_run_folder(run_dir):
        raise UserError(f"output_dir: {run_dir} holds files and is not a snugtune run; choose a new or empty "
                        f"folder (nothing was changed)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:  # created, never overwritten: O_EXCL does not follow a link planted under the name
            mark = os.open(run_dir / RUN_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(mark, b'{"written_by": "snugtune train"}\n')
            os.close(mark)
        except FileExistsError:
            pass
        probe = run_dir / f"{WRITE_TEST}{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir: cannot write to {run_dir}: {exc.strerror or exc}") from None


@contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.lock (an exclusive flock) while the block runs: a second process asking for it gets a
    UserError at once naming the holder's pid. The kernel releases it when the holder ends, however it ends,
    so a crash leaves no stale lock. The folder must exist (prepare_run_folder)."""
    path = run_dir / LOCK
    try:  # O_NOFOLLOW: a link planted as .lock is refused, not followed and truncated
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UserError(f"output_dir: cannot open {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"pid {holder}" if holder.isdigit() else "a process starting up"
            raise UserError(f"output_dir: {run_dir} is in use by another snugtune process ({who}); wait for it "
                            f"to end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        os.ftruncate(fd, 0)  # released: no pid left to name
    finally:
        os.close(fd)  # closing drops the flock


def set_aside_run(run_dir: Path) -> Path | None:
    """--fresh: rename a run folder to RUN.old-N (never deleted) under its lock, so a run still training is
    never moved; None when there is nothing to set aside. A folder that holds files and is not a run, the
    current folder or one above it, is refused (UserError), nothing moved."""
    _refuse_not_a_folder(run_dir)
    if not _holds_files(run_dir):
        return None
    if not is_run_folder(run_dir):
        raise UserError(f"output_dir: {run_dir} holds files and is not a snugtune run; --fresh sets aside only a "
                        f"run folder: choose a new or empty folder (nothing was moved)")
    folder = run_dir.resolve()
    if folder == Path.cwd().resolve() or folder in Path.cwd().resolve().parents:
        raise UserError(f"output_dir: {run_dir} is the current folder or holds it; --fresh cannot set it aside: "
                        f"run from another folder (nothing was moved)")
    with hold_run_lock(folder):
        n = 1
        while (aside := folder.with_name(f"{folder.name}.old-{n}")).exists() or aside.is_symlink():
            n += 1
        os.rename(folder, aside)
    return aside


class MetricsLog:
    """metrics.jsonl, one line per logged step and each step once, whatever interruptions and resumes came
    before. Opened with the rows a checkpoint kept: they replace whatever the file held (the steps after the
    checkpoint are trained again). A row for a step already logged, such as the held-out loss measured after
    the last step, adds its new fields to that step's line; a new step is appended. With tensorboard=True
    the numeric fields also go to TensorBoard event files in RUN_DIR/tensorboard, and each row also goes to
    `trackers` (W&B, MLflow) when given."""

    def __init__(self, run_dir: Path, rows: list[dict], tensorboard: bool = False, write: bool = True,
                 trackers=None):
        self.path = run_dir / METRICS
        self.rows: list[dict] = []
        self._by_step: dict[int, dict] = {}
        for row in rows:
            self._merge(row)
        self.trackers = trackers
        self._write = write  # False on the other processes of a distributed run: they keep rows only
        self._board = None
        if not write:
            return
        self._rewrite()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._board = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        logged = self._by_step.get(row.get("step"), {})
        row = {k: v for k, v in row.items() if k == "step" or k not in logged}  # what the step's line gains
        appended = self._merge(row)
        if not self._write:
            return
        if appended:
            self._append(self._by_step[row["step"]])
        else:
            self._rewrite()
        if self.trackers is not None:
            self.trackers.log(row)
        if self._board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, row["step"])
            self._board.flush()

    def _merge(self, row: dict) -> bool:
        """Put row in self.rows (in step order, one per step; fields logged before for its step are kept);
        True when it went at the end as a new step."""
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{self.path}: a metrics row without a whole-number step ({str(row)[:80]}); the run's "
                            f"newest checkpoint holds damaged metrics: train again with --fresh")
        if step in self._by_step:
            self._by_step[step].update({k: v for k, v in row.items() if k not in self._by_step[step]})
            return False
        merged = dict(row)
        self._by_step[step] = merged
        if not self.rows or step > self.rows[-1]["step"]:
            self.rows.append(merged)
            return True
        self.rows.insert(bisect.bisect([r["step"] for r in self.rows], step), merged)
        return False

    def _append(self, row: dict) -> None:
        try:  # one write(2) of the whole line: a kill lands before or after it, not inside a line
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(row) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise UserError(f"could not write {self.path}: {exc.strerror or exc}") from None

    def _rewrite(self) -> None:
        try:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        except OSError as exc:
            raise UserError(f"could not write {self.path}: {exc.strerror or exc}") from None

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
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except ValueError:
            raise UserError(f"{path}:{number}: not a JSON line; the file is damaged (delete that line or restore "
                            f"the file from the run's newest checkpoint)") from None
    return rows


def write_text_atomic(path: Path, text: str) -> None:
    """path holds the old text or the new, never part of either; a failed write (disk full) leaves no temp file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, as the OS says it ("No space left on device"), or None when exc is no failed write.
    Python's writes raise OSError; safetensors raises SafetensorError naming the OS error number."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, SafetensorError):
        code = re.search(r"os error (\d+)", str(exc))
        return os.strerror(int(code.group(1))) if code else shorten(" ".join(str(exc).splitlines()))
    return None


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def save_model_artifacts(run_dir: Path, model, tokenizer, base_path: Path, uses_lora: bool,
                         trainable: dict | None = None) -> None:
    """The adapter (PEFT format, base_model_name_or_path = the local base folder) or, for freeze/full,
    the whole trained model; plus tokenizer files and chat_template.jinja. Files land by rename.
    `trainable`: the whole trainable tensors by name, when the model's own are sharded (FSDP)."""
    staging = run_dir / f".final-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_artifacts(staging, model, tokenizer, base_path, uses_lora, trainable)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"could not write the trained model into {run_dir}: {write_failure(exc)}; the newest "
                        f"checkpoint is intact: make room and run the same command to finish") from None
    for item in staging.iterdir():
        os.replace(item, run_dir / item.name)
    staging.rmdir()


def _write_artifacts(staging: Path, model, tokenizer, base_path: Path, uses_lora: bool, trainable: dict | None):
    """save_model_artifacts' files, written into the new folder `staging`."""
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
    try:
        fig.savefig(tmp)
        os.replace(tmp, run_dir / LOSS_PLOT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
