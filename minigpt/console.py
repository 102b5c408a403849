"""What rank 0 tells the person running it, and ``train.log``, which keeps all of it.

The console gets a start line (where the run is, what is started or resumed), progress (a bar on
a terminal, plain lines otherwise), samples, warnings, and an end summary (how it ended, where
the checkpoints are, the command that samples from them). Every one of those lines is also
appended to ``<run dir>/train.log``, as plain lines even while the bar is drawn: on a cluster the
log file is what people read, and a resumed run adds its lines after the earlier attempt's.
Only rank 0 builds an enabled console (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

LOG_FILE = "train.log"


class RunLog:
    """``train.log``, appended to. Lines said before :meth:`open` wait in memory, so a run that
    is refused (the folder is another run's) writes nothing; a log that cannot be written (a
    full disk) is given up silently: the error that matters is reported by what failed first."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pending: list[str] = []
        self._file: IO[str] | None = None
        self._opened = self._created = False

    def open(self) -> None:
        """Start writing: the lines said so far, then each line as it is said."""
        if self.path is None or self._opened:
            return
        self._opened = True
        self._created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        except OSError:
            self._file = None
        pending, self._pending = self._pending, []
        for line in pending:
            self.write(line)

    def write(self, text: str) -> None:
        """Append ``text`` as one or more lines."""
        if self.path is None:
            return
        if not self._opened:
            self._pending.append(text)
            return
        if self._file is None:
            return
        try:
            self._file.write(text.rstrip("\n") + "\n")
            self._file.flush()
        except OSError:
            self.close()
            if self._created:  # a full disk: leave no empty train.log behind
                with contextlib.suppress(OSError):
                    if self.path.stat().st_size == 0:
                        self.path.unlink()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None


class Console:
    """Rank 0's terminal output: a progress bar on a terminal, plain log lines otherwise.

    SLURM log files are not terminals, so they get readable lines instead of bar redraws; the
    log file always gets the plain lines.
    """

    def __init__(
        self, mode: str, total: int, initial: int, enabled: bool, log: RunLog | None = None
    ) -> None:
        self.enabled = enabled
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.log = log if enabled and log is not None else RunLog(None)
        self._bar = None
        self._postfix: dict[str, str] = {}
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._start = time.perf_counter()
        self._total = total
        self._initial = initial

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Report progress after optimizer step ``step`` (1-based count of steps done)."""
        if not self.enabled or not metrics:
            return
        line = f"step {step}/{self._total} | {_line(metrics)} | eta {self._eta(step)}"
        self.log.write(line)
        if self._bar is not None:
            # The bar's own ETA comes from the steps done since ``initial``; the postfix keeps the
            # last val loss shown between evaluations.
            self._postfix |= _short(metrics)
            self._bar.n = step
            self._bar.set_postfix(self._postfix, refresh=True)
        elif self.mode == "lines":
            print(line, flush=True)

    def print(self, message: str) -> None:
        """A line that must not tear the progress bar (and goes into train.log)."""
        if not self.enabled:
            return
        self.log.write(message)
        if self._bar is not None:
            self._bar.write(message)
        elif self.mode != "off":
            print(message, flush=True)

    def close(self) -> None:
        """End the bar (the log stays open for the summary)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _eta(self, step: int) -> str:
        done = step - self._initial
        if done <= 0:
            return "?"
        remaining = (time.perf_counter() - self._start) / done * (self._total - step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))


def _short(metrics: dict[str, Any]) -> dict[str, str]:
    keys = {"train/loss": "loss", "val/loss": "val", "tokens_per_sec": "tok/s"}
    return {short: _fmt(metrics[k]) for k, short in keys.items() if k in metrics}


def _line(metrics: dict[str, Any]) -> str:
    return " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


# ---------------------------------------------------------------- what is said at the ends
def start_line(
    run_dir: Path, what: str, resumed_from: Path | None, step: int, max_steps: int
) -> str:
    """The first line of an attempt: where the run is, and what starts (``what``: model, device)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    if resumed_from is None:
        return f"run folder {run_dir}: new run, {max_steps} steps of {what} ({when})"
    return (
        f"run folder {run_dir}: resumed from {_shown(resumed_from)} at step {step}, "
        f"training to step {max_steps}, {what} ({when})"
    )


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, for its summary."""

    status: str  # completed | interrupted | failed
    step: int
    max_steps: int
    run_dir: Path
    wall_time_s: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    tokens_seen: int = 0
    tokens_per_sec: float | None = None
    mfu: float | None = None
    reason: str = ""  # what stopped or failed it


def summary(out: Outcome) -> list[str]:
    """The end of the console output: a block for a completed run, a line or two otherwise."""
    folder = out.run_dir / "checkpoints"
    last, best = folder / "last.pt", folder / "best.pt"
    if out.status == "completed":
        chosen = best if best.exists() else last
        speed = f"{out.tokens_per_sec:,.0f} tokens/s" if out.tokens_per_sec else "? tokens/s"
        mfu = f", MFU {out.mfu:.1%}" if out.mfu is not None else ""
        took = _duration(out.wall_time_s)
        return [
            f"--- run complete: step {out.step}/{out.max_steps} in {took} ---",
            f"val loss    {_loss(out.final_val_loss)} final, {_loss(out.best_val_loss)} best",
            f"speed       {speed}{mfu}, {out.tokens_seen:,} tokens trained",
            f"run folder  {_shown(out.run_dir)} (run.json, metrics.jsonl, {LOG_FILE})",
            f"checkpoints {_shown(folder)}: best.pt (lowest val loss), last.pt (step {out.step})",
            f"sample      {generate_command(chosen)}",
        ]
    if out.status == "interrupted":
        return [
            f"{out.reason}: checkpoint saved ({_shown(last)}); run the same command again to resume"
        ]
    then = (
        f"the last checkpoint is {_shown(last)}; once fixed, run the same command again to resume"
        if last.exists()
        else "no checkpoint was saved; once fixed, the same command starts the run over"
    )
    return [f"run failed at step {out.step}/{out.max_steps}: {out.reason}", then]


def generate_command(ckpt: Path) -> str:
    """A shell command that samples from ``ckpt``, quoted so that it can be pasted as it is
    (generate.py itself makes the path literal for Hydra)."""
    return shlex.join([*_python_generate(), f"checkpoint={_shown(ckpt)}"])


def _python_generate() -> list[str]:
    """``python generate.py``, with generate.py found where the train.py that runs us is."""
    script = Path(sys.argv[0] if sys.argv else "").with_name("generate.py")
    return ["python", _shown(script) if script.is_file() else "generate.py"]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it: shorter to read and paste."""
    with contextlib.suppress(ValueError, OSError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "?"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__
