"""Sweep report: one Markdown table and a few plots from the run folders of a multirun.

``python -m minigpt.report outputs/multirun/DATE/TIME`` reads every job's ``run.json`` and
``metrics.jsonl`` (job folders ``0``, ``1``, ...; or one run folder) and writes ``report.md`` and
PNGs next to them. It reads whatever is there, so it works while a sweep runs, after some jobs
failed, or on one run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import filter_overrides
from omegaconf import OmegaConf

from minigpt import runfolder, runlock
from minigpt.cli import OneLineParser
from minigpt.distributed import squeue
from minigpt.runfolder import RUN_FILE
from minigpt.tracking import METRICS_FILE

SUBMITTED_FILE = "submitted.json"  # written by the SLURM launcher when it does not wait
REPORT_FILE = "report.md"
LOSS_VS_STEP = "loss_vs_step.png"
LOSS_VS_TOKENS = "loss_vs_tokens.png"
VAL_LOSS_VS_PARAMS = "val_loss_vs_params.png"
_STYLE = {
    "completed": "-",
    "running": "--",
    "pending": "--",
    "interrupted": "--",
    "failed": ":",
    "dead": ":",
}


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
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and isinstance(event.get("step"), int):
            events.append({k: _number(v) for k, v in event.items()})
    return events


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


# ---------------------------------------------------------------- the table
COLUMNS = (
    "job",
    "overrides",
    "status",
    "steps",
    "best val loss",
    "final val loss",
    "tokens/s",
    "params",
    "wall time",
)


def table(jobs: list[Job]) -> str:
    """The Markdown table: one row per job."""
    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    for job in jobs:
        steps = f"{job.steps}/{job.max_steps}" if job.max_steps else str(job.steps)
        rows.append(
            (
                job.label,
                " ".join(f"`{o}`" for o in job.shown) or "(defaults)",
                f"**{job.status}**" if job.status == "failed" else job.status,
                steps,
                _fmt_loss(job.best_val_loss),
                _fmt_loss(job.final_val_loss),
                f"{job.tokens_per_sec:,.0f}" if job.tokens_per_sec else "—",
                _fmt_params(job.params),
                _fmt_duration(job.wall_time_s),
            )
        )
    return "\n".join("| " + " | ".join(c.replace("|", r"\|") for c in row) + " |" for row in rows)


def _fmt_loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "—"


def _fmt_params(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- the plots
def plot_losses(jobs: list[Job], out: Path, x: str) -> Path | None:
    """Train and val loss of every job on shared axes, against ``x`` = "step" or "tokens"."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    drawn = [j for j in jobs if j.series("train/loss")[0] or j.series("val/loss")[0]]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True, sharey=True)
    for i, job in enumerate(drawn):
        color = plt.get_cmap("tab10")(i % 10)
        style = _STYLE.get(job.status, "-")
        for ax, key in zip(axes, ("train/loss", "val/loss"), strict=True):
            steps, values = job.series(key)
            xs = _x_values(job, steps, x)
            if xs is None or not values:
                continue
            marker = "o" if key == "val/loss" else None
            ax.plot(xs, values, style, color=color, marker=marker, ms=3, lw=1.5, label=job.legend)
            if job.status == "failed":
                ax.plot(xs[-1], values[-1], "x", color=color, ms=9, mew=2)
    for ax, title in zip(axes, ("train loss", "val loss"), strict=True):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
    _log_y(axes[0])  # the y axis is shared
    axes[0].set_ylabel("loss (nats/token, log scale)")
    _legend_below(fig, axes[0])
    path = out / (LOSS_VS_STEP if x == "step" else LOSS_VS_TOKENS)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _log_y(ax: Any) -> None:
    """A log loss axis with a few ticks labelled as plain numbers (2.5, 3, 4 rather than 2.5e0).

    Call it after plotting: the ticks are chosen within the data's range.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ticks: list[float] = []
    for mantissas in ((1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 3), (1,)):
        ticks = [
            m * 10.0**e
            for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in mantissas
            if low <= m * 10.0**e <= high
        ]
        if len(ticks) <= 8:
            break
    if len(ticks) < 3:  # a narrow range, within one step of the ladder: evenly spaced instead
        ticks = [t for t in MaxNLocator(5).tick_values(low, high) if low <= t <= high]
    ax.set_yticks(ticks)
    # The fewest decimals that keep every label distinct (2.65, 2.655 and 2.66 need three).
    places = next((d for d in range(7) if len({f"{t:.{d}f}" for t in ticks}) == len(ticks)), 6)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.{places}f}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _x_values(job: Job, steps: list[int], x: str) -> list[float] | None:
    if x == "step":
        return [float(s) for s in steps]
    per_step = job.tokens_per_step
    return [s * per_step for s in steps] if per_step else None


def _legend_below(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ncol = 1 if max(map(len, unique), default=0) > 40 else min(3, len(unique))
    fig.legend(
        unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol
    )
    fig.tight_layout()


def plot_val_loss_vs_params(jobs: list[Job], out: Path) -> Path | None:
    """Final val loss against parameter count, log-log, when the completed jobs differ in size."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, NullFormatter

    points = [(j.params, j.final_val_loss, j) for j in jobs if j.params and j.final_val_loss]
    if len({p for p, _, _ in points}) < 2:
        return None
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(7, 5))
    best: dict[int, float] = {}
    for params, loss, _ in points:
        best[params] = min(loss, best.get(params, math.inf))
    ax.plot(list(best), list(best.values()), "-", color="0.6", lw=1, zorder=1)
    ax.scatter([p for p, _, _ in points], [v for _, v, _ in points], s=40, zorder=2)
    for params, loss, job in points:
        label = " ".join(job.shown) or job.label
        ax.annotate(label, (params, loss), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    _log_y(ax)
    # A tick at each model size: a sweep has a handful, and a decade often holds them all.
    ax.set_xticks(sorted(best), minor=False)
    ax.xaxis.set_major_formatter(EngFormatter(places=1))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("final val loss (log scale)")
    ax.set_title("Final validation loss vs model size (completed jobs)")
    path = out / VAL_LOSS_VS_PARAMS
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the report
def write_report(
    path: Path, out: Path | None = None, force: bool = False
) -> tuple[list[Job], list[Path]]:
    """Write report.md and the plots for the run(s) under ``path`` into ``out`` (default: path);
    returns the jobs read and the files written, report.md first.

    Only report.md and the plot names are ever written, each whole or not at all (drawn in a
    temp folder inside ``out``, then renamed), so a run's own files are never touched; a
    report.md that a minigpt report did not write is replaced only with ``force``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node
    jobs = load_jobs(path)
    out = out or path
    _check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report.", dir=out))
    try:
        drawn = [
            plot_losses(jobs, staging, "step"),
            plot_losses(jobs, staging, "tokens"),
            plot_val_loss_vs_params(jobs, staging),
        ]
        plots = [p for p in drawn if p is not None]
        (staging / REPORT_FILE).write_text(_markdown(path, jobs, plots), encoding="utf-8")
        written = [out / REPORT_FILE, *(out / p.name for p in plots)]
        for final in written:
            os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return jobs, written


def _check_out(out: Path, force: bool) -> None:
    """Refuse a file where the folder should be, and a report.md that is not a minigpt report."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder")
    existing = out / REPORT_FILE
    if existing.exists() and not existing.is_file():
        raise ReportError(f"{existing} is not a regular file; give another --out")
    if force or not existing.is_file():
        return
    with existing.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if not first.startswith("# Report:"):
        raise ReportError(
            f"{existing} was not written by minigpt.report; pass --force to replace it"
        )


def _markdown(path: Path, jobs: list[Job], plots: list[Path]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [
        f"# Report: {path}",
        "",
        f"{len(jobs)} job(s): {summary}. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        table(jobs),
        "",
    ]
    common = common_overrides(jobs)
    if common:
        lines += ["Every job also had: " + " ".join(f"`{o}`" for o in common), ""]
    for job in jobs:
        if job.lost is not None:
            lines += [f"Job {job.label} (SLURM {job.job_id}) left the queue unfinished: {job.lost}"]
            lines += [""]
    lines += [
        "Steps are done/planned; final val loss is given for completed jobs only; tokens/s is "
        "the median over the logged windows; wall time adds up every attempt of a resumed job.",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})\n" for p in plots]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minigpt.report PATH [--out DIR] [--force]``."""
    parser = OneLineParser(prog="python -m minigpt.report", description=__doc__)
    parser.add_argument(
        "path", type=Path, help="a multirun folder (jobs 0, 1, ...) or a run folder"
    )
    parser.add_argument("--out", type=Path, help="where to write the report (default: PATH)")
    parser.add_argument(
        "--force", action="store_true", help="replace a report.md that minigpt did not write"
    )
    args = parser.parse_args(argv)
    try:
        jobs, written = write_report(args.path, args.out, force=args.force)
    except ModuleNotFoundError as err:
        print(f"error: the report needs {err.name}: pip install 'minigpt[report]'", file=sys.stderr)
        return 2
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only folder, a full disk, a folder named like a plot
        where = err.filename or args.out or args.path
        print(f"error: cannot write the report to {where}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(table(jobs))
    print(f"\nwrote {written[0]}" + "".join(f"\n      {p}" for p in written[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
