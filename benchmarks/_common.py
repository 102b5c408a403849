"""Shared by the benchmark scripts: config composition, machine facts, results file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from minigpt import runtime
from minigpt.config import Config, register_configs, to_object

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results.jsonl"

# The standard configs, runnable by one word.
PRESETS: dict[str, list[str]] = {
    "a": [
        "model=tiny",
        "model.n_layer=4",
        "model.n_head=4",
        "model.d_model=128",
        "model.block_size=64",
        "train.batch_size=12",
        "model.dropout=0",
        "train.dtype=float32",
    ],
    "b": ["model=small", "train.batch_size=16", "model.dropout=0", "train.dtype=float32"],
    "default": [],
}


def compose_config(overrides: list[str]) -> Config:
    """conf/config.yaml composed with ``overrides``, as the typed Config train.py sees."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose(config_name="config", overrides=list(overrides)))


def machine() -> dict[str, Any]:
    """Platform, CPU model and core count."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def git_commit() -> str | None:
    """HEAD of the repository, with ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def append_result(kind: str, record: dict[str, Any], path: Path = RESULTS) -> None:
    """One JSON line with the machine, versions and commit around ``record``."""
    line = {
        "benchmark": kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "versions": runtime.versions(),
        "commit": git_commit(),
        **record,
    }
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
