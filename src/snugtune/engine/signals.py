"""Stop requests: SIGINT/SIGTERM let the current optimizer step finish, then the loop saves and exits.

A second SIGINT while a stop is pending interrupts at once (the default behaviour).
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequests:
    """Records SIGINT/SIGTERM while installed; `requested` holds the signal's name once one arrived."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # handlers only work there
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
