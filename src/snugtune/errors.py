"""Every error a user can meet, and the exit code the CLI gives it.

Each message is one line naming the field, or the file and row, and what to do.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can act on (exit 2). The message is one line saying what is wrong and what to do."""


class ConfigError(UserError):
    """A config or input problem the user can fix. The message names the field, or the file and row."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, unwritable folder); the previous one is intact."""


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class AnotherProcessFailed(UserError):
    """Under torchrun, another process died or stopped answering within train.collective_timeout_s; this one
    stops rather than wait (exit 2). The other process's own output says why."""


class DoesNotFit(Exception):
    """No settings fit the memory budget (exit 3)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM during training; a checkpoint was saved first (exit 130)."""


EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3
EXIT_INTERRUPTED = 130
