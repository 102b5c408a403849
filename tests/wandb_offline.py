"""Reading offline W&B runs back with wandb's own reader, ``wandb leet inspect``.

wandb 0.31 writes a run's transaction log (``run-<id>.wandb``) from its Go core and reads it back
with the same core; the Python-side reader of older versions is gone. ``--json`` prints one record
per line, ``--summary --json`` the run's state, config and latest values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline runs a minigpt run folder holds, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _inspect(run: Path, *flags: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", str(run), "--json", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def records(run: Path) -> list[dict[str, Any]]:
    """Every record of the run's transaction log."""
    return [json.loads(line) for line in _inspect(run).splitlines() if line.strip()]


def history(run: Path) -> list[dict[str, Any]]:
    """The logged history rows, each with its step."""
    rows = [r["history"] for r in records(run) if r["type"] == "history"]
    return [{**row["item"], "_step": row.get("step", {}).get("num", 0)} for row in rows]


def run_record(run: Path) -> dict[str, Any]:
    """The run record: id, group, name, job type, config."""
    return next(r["run"] for r in records(run) if r["type"] == "run")


def summary(run: Path) -> dict[str, Any]:
    """State (finished/failed), exit code, config and the latest values, as wandb reports them."""
    return json.loads(_inspect(run, "--summary"))
