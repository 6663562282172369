"""SIGTERM and SIGINT recorded for the trainer to act on between steps."""

import contextlib
import signal


class StopRequest:
    """SIGTERM and SIGINT (Ctrl-C) recorded instead of raised, so a run stops where it is
    safe to: between steps (after saving) or between the steps of its start-up."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signal = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGTERM and SIGINT for the duration; the previous handlers come back."""
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
