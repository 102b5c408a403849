"""Where metrics go: metrics.jsonl and trackers behind one interface, plus the console.

Only rank 0 builds these (the trainer passes ``enabled=False`` elsewhere), so nothing here asks
which rank it is on.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from minigpt.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"


class Tracker(Protocol):
    """One destination for metrics."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def finish(self, status: str) -> None: ...


class JsonlTracker:
    """Appends one JSON object per event to ``metrics.jsonl``.

    On resume, events logged after the checkpoint's step are dropped first, so that the file holds
    every step exactly once however often the run was interrupted.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        self._file = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self, status: str) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class MultiTracker:
    """Fans each call out to several trackers."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def finish(self, status: str) -> None:
        for tracker in self.trackers:
            tracker.finish(status)


def build_tracker(
    cfg: LoggerConfig, run_dir: Path, *, enabled: bool, resume_step: int | None
) -> MultiTracker:
    """The trackers ``cfg`` asks for (none on ranks other than 0)."""
    trackers: list[Tracker] = []
    if enabled and cfg.jsonl:
        trackers.append(JsonlTracker(run_dir / METRICS_FILE, resume_step))
    if enabled and (cfg.wandb or cfg.tensorboard):
        raise NotImplementedError("logger=wandb/tensorboard arrive with the monitoring issue")
    return MultiTracker(trackers)


class Console:
    """Rank 0's terminal output: a progress bar on a terminal, plain log lines otherwise.

    SLURM log files are not terminals, so they get readable lines instead of bar redraws.
    """

    def __init__(self, mode: str, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._start = time.perf_counter()
        self._total = total
        self._initial = initial

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Report progress after optimizer step ``step`` (1-based count of steps done)."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(_short(metrics), refresh=True)
        elif self.mode == "lines" and metrics:
            print(
                f"step {step}/{self._total} | {_line(metrics)} | eta {self._eta(step)}", flush=True
            )

    def print(self, message: str) -> None:
        """A line that must not tear the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.mode != "off":
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

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
