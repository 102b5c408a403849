"""Stop signals: recorded, not acted on in the handler; SIGUSR2 goes on to submitit's requeue."""

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


def test_sigusr2_is_only_recorded_then_handed_to_the_requeue_handler(
    requeue_calls: list[int],
) -> None:
    stop = StopSignals().install()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.signum == signal.SIGUSR2 and requeue_calls == []
    stop.hand_over(signal.SIGUSR2)
    assert requeue_calls == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the old handlers are back


def test_sigterm_is_recorded_but_never_requeued_by_us(requeue_calls: list[int]) -> None:
    """SLURM decides after SIGTERM: requeueing here would bring back a job that was cancelled."""
    stop = StopSignals().install()
    os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only records it
    assert stop.signum == signal.SIGTERM
    stop.hand_over(signal.SIGTERM)
    assert requeue_calls == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_wins_over_sigusr2(requeue_calls: list[int]) -> None:
    stop = StopSignals().install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR2)
    stop.uninstall()
    assert stop.signum == signal.SIGTERM


def test_a_refused_requeue_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    def refused(signum: int, frame: object) -> None:
        raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "42"])

    old = signal.signal(signal.SIGUSR2, refused)
    try:
        stop = StopSignals().install()
        stop.hand_over(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert "not requeued" in capsys.readouterr().err
