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
    stop.hand_over(signal.SIGUSR2, requeue=False)  # SIGUSR2 always requeues
    assert requeue_calls == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the old handlers are back


@pytest.mark.parametrize("requeue", [False, True], ids=["cancelled", "still_running"])
def test_sigterm_requeues_only_when_told(requeue_calls: list[int], requeue: bool) -> None:
    """The trainer says whether SLURM still runs the job: a scancel'ed one must stay cancelled."""
    stop = StopSignals().install()
    os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only records it
    assert stop.signum == signal.SIGTERM
    stop.hand_over(signal.SIGTERM, requeue=requeue)
    assert requeue_calls == ([signal.SIGUSR2] if requeue else [])
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
        stop.hand_over(signal.SIGUSR2, requeue=True)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert "not requeued" in capsys.readouterr().err


def test_ctrl_c_is_recorded_never_requeues_and_a_second_one_stops_at_once(
    requeue_calls: list[int],
) -> None:
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a pytest-xdist worker
    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, like SIGTERM
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: now
    finally:
        stop.hand_over(signal.SIGINT, requeue=True)
    assert requeue_calls == []  # Ctrl-C never hands the stop to submitit's requeue
    assert signal.getsignal(signal.SIGINT) is before  # handed back as it was
