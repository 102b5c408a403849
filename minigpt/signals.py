"""Stop requests from the scheduler: SIGUSR2 (time limit or preemption) and SIGTERM.

A signal handler runs between two Python bytecodes, possibly in the middle of a backward pass or
a collective, so it only records the request. The trainer looks at it at step boundaries, where
all ranks agree to stop together, save a checkpoint, and then hand the stop over to whoever
handled SIGUSR2 before (submitit's handler checkpoints the job function and requeues the job).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised by the trainer once the checkpoint of an interrupted run is safely written."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")


class StopSignals:
    """Records SIGUSR2/SIGTERM while installed; remembers the handlers it replaced."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        """Take over the stop signals (main thread only: elsewhere nothing is installed)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # SIGTERM wins over SIGUSR2: it means the scheduler is about to kill the job.
        self.signum = max(self.signum or 0, signum)

    def hand_over(self, signum: int, requeue: bool) -> None:
        """Give the stop to the SIGUSR2 handler that was there before us (if a Python one) when
        the job should come back: always after SIGUSR2, after SIGTERM when ``requeue`` says so.

        Under submitit that handler is its SignalHandler: the task of rank 0 pickles the job
        function again and runs ``scontrol requeue`` (then exits); its own SIGTERM handler only
        logs. The caller decides for SIGTERM because it also comes from ``scancel``, whose job
        must stay cancelled.
        """
        previous = self._previous.get(signal.SIGUSR2)
        self.uninstall()
        if signum == signal.SIGTERM and not requeue:
            return
        if callable(previous):
            handler: Callable[[int, FrameType | None], Any] = previous
            try:
                handler(signal.SIGUSR2, None)
            except subprocess.CalledProcessError as err:  # e.g. the job was cancelled meanwhile
                print(f"not requeued: {err}", file=sys.stderr, flush=True)
