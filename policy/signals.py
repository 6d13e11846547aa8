"""Stop a training loop cleanly on SIGINT (Ctrl-C) or SIGTERM.

The signal only sets a flag; the loop calls `check()` between steps, so the
state it then saves is never half an optimizer step. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal


class Interrupted(Exception):
    """Raised by GracefulStop.check() after SIGINT or SIGTERM."""


class GracefulStop:
    """`with GracefulStop() as stop: ... stop.check()`; old handlers come back on exit."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self) -> None:
        if self.requested:
            raise Interrupted(self.requested)
