"""Stop signals: recorded, not acted on in the handler; handed to submitit's requeue handler."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from minigpt.signals import StopSignals


@pytest.fixture
def requeue_calls():  # noqa: ANN201
    """A stand-in for submitit's SIGUSR2 handler, installed as the previous handler."""
    calls: list[int] = []
    old_usr2 = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    old_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield calls
    signal.signal(signal.SIGUSR2, old_usr2)
    signal.signal(signal.SIGTERM, old_term)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_is_only_recorded_then_handed_to_the_requeue_handler(
    requeue_calls: list[int], sig: int
) -> None:
    stop = StopSignals().install()
    os.kill(os.getpid(), sig)  # the process survives SIGTERM: the handler only records it
    assert stop.signum == sig and requeue_calls == []
    stop.hand_over()
    assert requeue_calls == [signal.SIGUSR2]  # SIGTERM requeues like a preemption
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the old handlers are back


def test_sigterm_wins_over_sigusr2(requeue_calls: list[int]) -> None:
    stop = StopSignals().install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR2)
    stop.uninstall()
    assert stop.signum == signal.SIGTERM


def test_a_refused_requeue_after_scancel_just_ends(capsys: pytest.CaptureFixture[str]) -> None:
    def refused(signum: int, frame: object) -> None:
        raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "42"])

    old = signal.signal(signal.SIGUSR2, refused)
    try:
        stop = StopSignals().install()
        stop.hand_over()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert "not requeued" in capsys.readouterr().err
