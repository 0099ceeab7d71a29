"""Stop requests: SIGINT/SIGTERM let the current optimizer step finish, then the loop saves and exits.

A second SIGINT while a stop is pending interrupts at once (the default behaviour), and so does a signal
outside the step loop (while the model and data load, while the run finishes); that one is recorded too, so a
library that swallows the KeyboardInterrupt (a bare except, a finalizer) cannot lose it: the loop then stops
before its first step. Under torchrun a signal may reach one process only; the processes agree once per step,
so all stop after the same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from snugtune.engine.distributed import DistContext, max_across


class StopRequests:
    """Records SIGINT/SIGTERM while installed: `requested` holds the signal's name once one reached this
    process; `agreed` holds it on every process once `agree` has run after any process received one."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.agreed: str | None = None
        self.stepping = False  # inside the step loop: the first signal waits for the step's end

    def agree(self, ctx: DistContext) -> None:
        """Share the stop request with every process (collective: all call it once per optimizer step);
        when several arrived, the highest signal number names the stop everywhere."""
        number = max_across(ctx, signal.Signals[self.requested].value if self.requested else 0)
        self.agreed = signal.Signals(number).name if number else None

    def _handle(self, signum, frame) -> None:
        pending = self.requested is not None
        self.requested = signal.Signals(signum).name
        if not self.stepping or (pending and signum == signal.SIGINT):
            raise KeyboardInterrupt

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
