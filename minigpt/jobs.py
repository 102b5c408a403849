"""What the run folders of a sweep say: one :class:`Job` per folder, however far it got.

Reads every job's ``run.json`` and ``metrics.jsonl`` (job folders ``0``, ``1``, ...; or one run
folder), the SLURM launcher's ``submitted.json`` and the queue, and the values each job was given
of the swept keys. :mod:`minigpt.report` writes the table, :mod:`minigpt.plots` draws.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import filter_overrides
from omegaconf import OmegaConf

from minigpt import runfolder, runlock, tracking
from minigpt.distributed import squeue
from minigpt.runfolder import RUN_FILE
from minigpt.tracking import METRICS_FILE

SUBMITTED_FILE = "submitted.json"  # written by the SLURM launcher when it does not wait


class ReportError(ValueError):
    """The folder holds nothing to report on (printed as one line)."""


@dataclass
class Job:
    """What one job folder says about its run, however far it got."""

    label: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)  # run.json, {} before it exists
    events: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    overrides: list[str] = field(default_factory=list)  # without hydra.* ones
    shown: list[str] = field(default_factory=list)  # those that set it apart from the others
    job_id: str | None = None  # the SLURM job, when the launcher recorded it
    lost: str | None = None  # why a job that left the SLURM queue unfinished ended, as known

    @property
    def status(self) -> str:
        """completed / failed / running as run.json says; running once metrics exist, or pending.

        A SLURM job that is no longer queued but never wrote completed or failed (it crashed
        before run.json, or was killed outright: out of memory, time limit) is failed. A run
        that says running but whose process no longer holds the run folder was killed outright:
        dead (its last checkpoint resumes it).
        """
        if self.lost is not None:
            return "failed"
        status = str(self.info.get("status") or ("running" if self.events else "pending"))
        if status == "running" and runlock.holder_of(self.path) is None:
            return "dead"
        return status

    @property
    def steps(self) -> int:
        """Steps done: a running job's run.json still holds the step it started from."""
        logged = max((e["step"] for e in self.events), default=0)
        return max(int(self.info.get("steps") or 0), logged)

    @property
    def max_steps(self) -> int | None:
        train = self.info.get("config", {}).get("train")
        steps = train.get("max_steps") if isinstance(train, dict) else None
        return steps if isinstance(steps, int) else None

    @property
    def params(self) -> int | None:
        return self.info.get("params")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and finite values of ``key`` over the run."""
        pairs = [(e["step"], e[key]) for e in self.events if _finite(e.get(key))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    @property
    def best_val_loss(self) -> float | None:
        _, values = self.series("val/loss")
        best = self.info.get("best_val_loss")
        return min([*values, *([best] if _finite(best) else [])], default=None)

    @property
    def final_val_loss(self) -> float | None:
        """The last val loss of a completed run; None before the run has ended well."""
        if self.status != "completed":
            return None
        final = self.info.get("final_val_loss")
        return final if _finite(final) else (self.series("val/loss")[1] or [None])[-1]

    @property
    def tokens_per_sec(self) -> float | None:
        """Median throughput over the logged windows: robust to the slow first one."""
        _, values = self.series("tokens_per_sec")
        return statistics.median(values) if values else None

    @property
    def tokens_per_step(self) -> float | None:
        if self.info.get("steps") and self.info.get("tokens_seen"):
            return self.info["tokens_seen"] / self.info["steps"]
        seen = [(e["step"], e["tokens_seen"]) for e in self.events if e.get("tokens_seen")]
        return seen[-1][1] / seen[-1][0] if seen and seen[-1][0] else None

    @property
    def wall_time_s(self) -> float | None:
        return self.info.get("wall_time_s")

    @property
    def legend(self) -> str:
        suffix = "" if self.status == "completed" else f" ({self.status})"
        return f"{self.label}: {' '.join(self.shown) or '(defaults)'}{suffix}"


# ---------------------------------------------------------------- reading
def load_jobs(path: Path) -> list[Job]:
    """The jobs under a multirun folder (subfolders 0, 1, ...) or the one run that ``path`` is."""
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    if _is_run(path):
        job = _load_job(path, path.name, [])
        job.shown = job.overrides
        return [job]
    submitted = _submitted(path)
    numbers = {int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()}
    numbers |= set(submitted)
    if not numbers:
        raise ReportError(
            f"{path} holds no run: expected {RUN_FILE} or {METRICS_FILE}, or job folders 0, 1, ..."
        )
    jobs = []
    for n in sorted(numbers):
        overrides, job_id = submitted.get(n, ([], None))
        jobs.append(_load_job(path / str(n), str(n), overrides))
        jobs[-1].job_id = job_id
    _mark_lost(path, jobs)
    common = set(common_overrides(jobs))
    for job in jobs:
        job.shown = [o for o in job.overrides if o not in common]
    return jobs


def _is_run(path: Path) -> bool:
    return any((path / name).exists() for name in (RUN_FILE, METRICS_FILE, ".hydra"))


# What run.json's keys hold; a value of another type (a hand-edited or foreign file) is ignored.
_RUN_TYPES: dict[str, Any] = {
    "status": str,
    "steps": int,
    "config": dict,
    "params": int,
    "best_val_loss": (int, float),
    "final_val_loss": (int, float),
    "tokens_seen": int,
    "wall_time_s": (int, float),
    "overrides": list,
}


def _typed(info: dict[str, Any]) -> dict[str, Any]:
    def ok(key: str, value: Any) -> bool:
        kind = _RUN_TYPES.get(key)
        return kind is None or (isinstance(value, kind) and not isinstance(value, bool))

    return {k: v for k, v in info.items() if ok(k, v)}


def _load_job(path: Path, label: str, submitted_overrides: list[str]) -> Job:
    info = _typed(runfolder.read_run_json(path))
    overrides = info.get("overrides") or _hydra_overrides(path) or submitted_overrides
    overrides = [str(o) for o in overrides]
    return Job(label, path, info, read_events(path / METRICS_FILE), filter_overrides(overrides))


def read_events(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's events; a line cut short by a kill is skipped, "nan" strings are floats."""
    return [{k: _number(v) for k, v in e.items()} for e in tracking.logged_events(path)]


def _number(value: Any) -> Any:
    # JsonlTracker writes non-finite floats as strings, which JSON has no literal for.
    return float(value) if value in ("nan", "inf", "-inf") else value


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [r for r in data if isinstance(r, dict) and "job" in r] if isinstance(data, list) else []


def _hydra_overrides(path: Path) -> list[str]:
    saved = path / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(saved)] if saved.exists() else []


def _submitted(path: Path) -> dict[int, tuple[list[str], str | None]]:
    """Jobs the SLURM launcher submitted, even those that have not started yet: their overrides
    and SLURM job ids."""
    records = _read_json_list(path / SUBMITTED_FILE)
    return {
        int(r["job"]): (list(r.get("overrides", [])), str(r["job_id"]) if r.get("job_id") else None)
        for r in records
    }


UNFINISHED = ("pending", "running", "interrupted")


def _mark_lost(path: Path, jobs: list[Job]) -> None:
    """Mark the SLURM jobs that left the queue without finishing, with the error they logged."""
    waiting = [j for j in jobs if j.job_id and j.status in UNFINISHED]
    queued = slurm_queue([str(j.job_id) for j in waiting])
    if queued is None:
        return  # no squeue here (the folder was copied off the cluster): statuses as written
    for job in waiting:
        if job.job_id not in queued:
            job.lost = _last_error(path / ".submitit", str(job.job_id)) or "left the queue"


def slurm_queue(job_ids: list[str]) -> set[str] | None:
    """Which of these SLURM jobs (array tasks as ``123_4``) are still queued or running; None
    where ``squeue`` cannot say."""
    if not job_ids:
        return None
    out = squeue("--array", "--format=%i", f"--jobs={','.join(job_ids)}")
    if out is None:
        return None
    if out.returncode != 0:
        return set() if "Invalid job id" in out.stderr else None
    return set(out.stdout.split())


def _last_error(submitit_dir: Path, job_id: str) -> str | None:
    """The last ``error: ...`` or ``SomeError: ...`` line of the job's submitit stderr logs."""
    found = None
    for log in sorted(submitit_dir.glob(f"{job_id}/{job_id}_*_log.err")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            head = line.split(":", 1)[0]
            if line.startswith("error: ") or (head.isidentifier() and head.endswith("Error")):
                found = line.strip()
    return found


def common_overrides(jobs: list[Job]) -> list[str]:
    """The overrides every job of a sweep was given: said once, under the table."""
    known = [j.overrides for j in jobs if j.overrides]
    if len(jobs) < 2 or len(known) < len(jobs):
        return []
    shared = set.intersection(*(set(o) for o in known))
    return [o for o in known[0] if o in shared]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def swept_numbers(jobs: list[Job]) -> dict[str, dict[str, float]]:
    """The swept keys whose values are all numbers (optimizer.lr, train.batch_size, ...): for
    each, the value every job that was given one got, by job label; keys in command-line order.
    A key with one value, or with any value that is not a number (model=tiny), is left out."""
    values: dict[str, dict[str, float | None]] = {}
    for job in jobs:
        for override in job.overrides:
            key, sep, text = override.lstrip("+~").partition("=")
            if sep:
                values.setdefault(key, {})[job.label] = as_number(text)
    return {
        key: {label: v for label, v in given.items() if v is not None}
        for key, given in values.items()
        if None not in given.values() and len(set(given.values())) > 1
    }


def as_number(text: str) -> float | None:
    """A finite number written as text, else None (a choice, nan, inf)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
