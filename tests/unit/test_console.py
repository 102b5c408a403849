"""Rank 0's console: progress, the end summary, and train.log, which keeps every line of it."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from minigpt.console import Console, Outcome, RunLog, generate_command, start_line, summary


def test_bar_shows_loss_tokens_per_second_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    console = Console("bar", total=100, initial=0, enabled=True)
    console.step(10, {"train/loss": 2.5, "tokens_per_sec": 12345.0})
    console.step(20, {"train/loss": 2.25, "tokens_per_sec": 12000.0, "val/loss": 2.4})
    console.close()
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "20/100" in bar and "loss=2.25" in bar and "tok/s=12,000" in bar and "val=2.4" in bar
    assert "<" in bar  # tqdm's elapsed<remaining


def test_lines_mode_prints_plain_lines_with_eta(capsys: pytest.CaptureFixture[str]) -> None:
    console = Console("lines", total=100, initial=0, enabled=True)
    console.step(10, {"train/loss": 2.5, "tokens_per_sec": 12345.0})
    out = capsys.readouterr().out
    assert out.startswith("step 10/100 | train/loss 2.5 | tokens_per_sec 12,345 | eta ")
    assert "\r" not in out


def test_log_gets_plain_step_lines_while_the_bar_is_drawn(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "train.log")
    log.open()
    console = Console("bar", total=100, initial=0, enabled=True, log=log)
    console.step(10, {"train/loss": 2.5})
    console.print("a warning")
    console.close()
    log.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0].startswith("step 10/100 | train/loss 2.5 | eta ")
    assert lines[1] == "a warning"
    assert "\r" not in "".join(lines) and "it/s" not in "".join(lines)


def test_log_holds_back_lines_until_the_run_is_ours_then_appends(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_text("the earlier attempt\n")
    log = RunLog(path)
    log.write("said while choosing the checkpoint")
    assert path.read_text() == "the earlier attempt\n"  # a refused run would change nothing
    log.open()
    log.write("start")
    log.close()
    assert path.read_text().splitlines() == [
        "the earlier attempt",
        "said while choosing the checkpoint",
        "start",
    ]


def test_a_log_that_cannot_be_written_does_not_stop_the_run(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "train.log")
    (tmp_path / "train.log").mkdir()  # open() fails
    log.open()
    log.write("a line")  # nothing raised


def test_disabled_console_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = RunLog(tmp_path / "train.log")
    log.open()
    console = Console("lines", total=10, initial=0, enabled=False, log=log)
    console.step(1, {"train/loss": 1.0})
    console.print("hello")
    assert capsys.readouterr().out == "" and (tmp_path / "train.log").read_text() == ""


def test_start_line_names_the_folder_and_what_starts_or_resumes(tmp_path: Path) -> None:
    fresh = start_line(tmp_path, "model=tiny", None, 0, 20)
    assert fresh.startswith(f"run folder {tmp_path}: new run, 20 steps of model=tiny")
    resumed = start_line(tmp_path, "model=tiny", tmp_path / "last.pt", 20, 30)
    assert "resumed from" in resumed and "at step 20, training to step 30" in resumed


def _run_with_checkpoints(root: Path) -> Path:
    run = root / "my run, 1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    return run


def test_completed_summary_says_losses_speed_and_where_to_sample(tmp_path: Path) -> None:
    run = _run_with_checkpoints(tmp_path)
    out = Outcome("completed", 20, 20, run, 12.3, 1.5, 1.25, 10240, tokens_per_sec=830.0, mfu=0.031)
    text = "\n".join(summary(out))
    assert "run complete: step 20/20 in 12.3 s" in text
    assert "1.5000 final, 1.2500 best" in text
    assert "830 tokens/s, MFU 3.1%" in text
    assert "best.pt" in text and "train.log" in text


def test_generate_command_can_be_pasted_into_a_shell_as_printed(tmp_path: Path) -> None:
    ckpt = _run_with_checkpoints(tmp_path) / "checkpoints" / "best.pt"
    argv = shlex.split(generate_command(ckpt))
    assert argv[:2] == ["python", "generate.py"]
    assert argv[2] == f"checkpoint={ckpt}"  # one word, spaces and comma included


@pytest.mark.parametrize("status", ["interrupted", "failed"])
def test_a_stopped_or_failed_run_says_where_its_checkpoint_is_and_how_to_resume(
    tmp_path: Path, status: str
) -> None:
    run = _run_with_checkpoints(tmp_path)
    reason = "stopped by SIGINT at step 7" if status == "interrupted" else "RuntimeError: boom"
    lines = summary(Outcome(status, 7, 20, run, reason=reason))
    assert len(lines) <= 2
    text = " ".join(lines)
    assert reason in text and "last.pt" in text and "run the same command again" in text
