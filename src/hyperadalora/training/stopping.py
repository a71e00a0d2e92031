"""How a run stops early: SIGINT / SIGTERM (`StopRequest`, `TrainingInterrupted`), NaN/Inf steps
(`NonFiniteLossError`), a full disk (`DiskFullError`)."""

from __future__ import annotations

import errno
import signal
import sys
import threading
from typing import Optional


class StopRequest:
    """While active, SIGINT / SIGTERM only ask the loop to stop after the current step (``.signum``); a
    second signal aborts at once (KeyboardInterrupt). Only in the main thread (elsewhere: no-op)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without a checkpoint")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and writing a checkpoint "
              f"(send it again to abort without one).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run after a step; ``checkpoint`` holds it (None if none was written)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)  # 130 for SIGINT, 143 for SIGTERM

    def __str__(self):
        return self.args[0]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps with a NaN/Inf loss or gradient."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(RuntimeError):
    """The disk (or quota) filled up while the run wrote its files: it stopped; its checkpoints in place are intact."""
