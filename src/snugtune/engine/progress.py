"""Progress display for training: steps, loss, tokens/s, memory and ETA (rich, on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """A rich progress bar over optimizer steps; a no-op when disabled (tests, --quiet)."""

    def __init__(self, total_steps: int, done: int, enabled: bool = True):
        self._progress = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("mem {task.fields[mem]}"), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False)
        self._task = self._progress.add_task("train", total=total_steps, completed=done,
                                             loss="-", tps="-", mem="-")
        self._progress.start()

    def update(self, step: int, loss: float, tokens_per_s: float, memory_bytes: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}",
                                  mem=f"{memory_bytes / 2**30:.2f} GiB")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
