"""Throughput between log lines, run.json's figures that span every attempt of a run (wall time,
MFU), and its atomic write.

A resumed run adds on to what the attempt before it recorded, so run.json describes the run, not
only its last attempt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from minigpt import distributed, runfolder
from minigpt.distributed import Dist


class WallClock:
    """Wall time over every attempt of a run: a resumed run adds on to what run.json said."""

    def __init__(self, run_dir: Path, resumed: bool) -> None:
        old = runfolder.read_run_json(run_dir) if resumed else {}
        started, before = old.get("started_at"), old.get("wall_time_s")
        self.started_at = started if isinstance(started, str) else _now()
        self.before = float(before) if isinstance(before, (int, float)) else 0.0
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(self.before + time.perf_counter() - self.start, 1)


class Throughput:
    """MFU and tokens/s of the logged windows: their mean over the run, and the last.

    The mean is over log lines (each covers ``train.log_every`` steps), carried on from the
    attempt before via run.json, so a resumed run's figure is the whole run's.
    """

    def __init__(self, run_dir: Path, resumed: bool) -> None:
        old = runfolder.read_run_json(run_dir) if resumed else {}
        self.windows = 0
        self.sums = {"mfu": 0.0, "tokens_per_sec": 0.0}
        self.last: dict[str, float | None] = {"mfu": None, "tokens_per_sec": None}
        mfu = old.get("mfu")
        if isinstance(mfu, dict) and isinstance(mfu.get("windows"), int):
            self.windows = mfu["windows"]
            for key in self.sums:
                mean = (old.get(key) or {}).get("mean")
                self.sums[key] = float(mean) * self.windows if _finite(mean) else 0.0

    def add(self, metrics: dict[str, Any]) -> None:
        """Count one log line's ``mfu`` and ``tokens_per_sec``."""
        if not all(_finite(metrics.get(key)) for key in self.sums):
            return
        self.windows += 1
        for key in self.sums:
            self.sums[key] += float(metrics[key])
            self.last[key] = float(metrics[key])

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.windows if self.windows else None

    def record(self) -> dict[str, Any]:
        """run.json's ``mfu`` and ``tokens_per_sec``: mean, last, and how many windows."""
        return {
            key: {"mean": self.mean(key), "last": self.last[key], "windows": self.windows}
            for key in self.sums
        }


class Window:
    """Loss and throughput since the last log line, read with one host sync per log line."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.steps = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    def flush(self, dist: Dist) -> tuple[float, float, float]:
        mean = distributed.all_reduce_mean(self.loss / max(1, self.steps), dist)
        loss = float(mean)  # the one sync of the window
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = (loss, self.tokens / elapsed, elapsed / max(1, self.steps))
        self.loss = torch.zeros((), device=self.device)
        self.steps = self.tokens = 0
        self.start = time.perf_counter()
        return out


def write_json(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` to ``path`` atomically; non-finite floats become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    clean = {k: finite_or_none(v) for k, v in info.items()}
    try:
        tmp.write_text(json.dumps(clean, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left only when the write failed (a full disk)


def finite_or_none(value: Any) -> Any:
    """``value``, or None for a float that is not finite (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
