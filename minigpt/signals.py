"""Stop requests: SIGUSR2 (time limit or preemption) and SIGTERM from the scheduler, Ctrl-C.

A signal handler runs between two Python bytecodes, possibly in the middle of a backward pass or
a collective, so it only records the request. The trainer looks at it at step boundaries, where
all ranks agree to stop together, save a checkpoint, and then hand the stop over to whoever
handled SIGUSR2 before (submitit's handler checkpoints the job function and requeues the job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised by the trainer once the checkpoint of an interrupted run is safely written."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")


class StopSignals:
    """Records SIGUSR2/SIGTERM/SIGINT while installed; remembers the handlers it replaced.

    Ctrl-C stops like SIGTERM: at the next step boundary, with a checkpoint. A second Ctrl-C
    raises KeyboardInterrupt at once (the last checkpoint written stays intact).
    """

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
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            # os.write: print() from a handler can interrupt another print to the same stream.
            os.write(
                2,
                b"\nCtrl-C: stopping at the next step with a checkpoint "
                b"(Ctrl-C again to stop at once)\n",
            )
        # SIGTERM wins over SIGUSR2 over SIGINT: it means the scheduler is about to kill the job.
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
        if not (signum == signal.SIGUSR2 or (signum == signal.SIGTERM and requeue)):
            return  # Ctrl-C, or a SIGTERM that ends the job
        if callable(previous):
            handler: Callable[[int, FrameType | None], Any] = previous
            try:
                handler(signal.SIGUSR2, None)
            except subprocess.CalledProcessError as err:  # e.g. the job was cancelled meanwhile
                print(f"not requeued: {err}", file=sys.stderr, flush=True)
