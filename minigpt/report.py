"""Sweep report: one Markdown table and a few plots from the run folders of a multirun.

``python -m minigpt.report outputs/multirun/DATE/TIME`` reads every job's ``run.json`` and
``metrics.jsonl`` (job folders ``0``, ``1``, ...; or one run folder) and writes ``report.md`` and
PNGs next to them. It reads whatever is there, so it works while a sweep runs, after some jobs
failed, or on one run. :mod:`minigpt.jobs` reads the folders and :mod:`minigpt.plots` draws;
:mod:`minigpt.search_report` adds the section of a Bayesian search (``hydra/sweeper=search``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from minigpt import plots, scaling, search_report
from minigpt.cli import OneLineParser
from minigpt.jobs import (
    Job,
    ReportError,
    common_overrides,
    load_jobs,
    read_events,
    slurm_queue,
    swept_numbers,
)
from minigpt.plots import LOSS_VS_STEP, LOSS_VS_TOKENS, LR_VS_STEP, VAL_LOSS_VS_PARAMS

__all__ = [
    "LOSS_VS_STEP",
    "LOSS_VS_TOKENS",
    "LR_VS_STEP",
    "REPORT_FILE",
    "VAL_LOSS_VS_PARAMS",
    "Job",
    "ReportError",
    "load_jobs",
    "main",
    "read_events",
    "slurm_queue",
    "table",
    "write_report",
]

REPORT_FILE = "report.md"


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
        search = search_report.load_search(path, jobs)
        searched = search_report.draw(search, staging) if search else []
        figures, notes = _draw(jobs, staging, skip=set(search.space) if search else set())
        fitted, section = _scaling(jobs, staging)
        lead = search_report.markdown(search, searched) if search else []
        text = "\n".join([_markdown(path, jobs, figures, notes, lead), *section])
        (staging / REPORT_FILE).write_text(text, encoding="utf-8")
        written = [
            out / REPORT_FILE,
            *(out / p.name for p, _ in searched),
            *(out / p.name for p, _ in figures),
            *(out / p.name for p in fitted),
        ]
        for final in written:
            os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return jobs, written


def _draw(jobs: list[Job], out: Path, skip: set[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Every figure the jobs hold data for, with its title; and why a figure was left out.
    The keys in ``skip`` (a search's) get no loss-vs-value line plot: the search draws its own."""
    notes = []
    per_step = plots.shared_tokens_per_step(jobs)
    drawn = [(plots.plot_losses(jobs, out, "step", per_step), "Loss vs step")]
    if per_step is None:
        drawn.append((plots.plot_losses(jobs, out, "tokens"), "Loss vs tokens seen"))
    elif len(jobs) > 1:
        notes.append(
            f"Loss vs tokens is not drawn: every job sees {per_step:,.0f} tokens per step, so it "
            "would repeat loss vs step (whose top axis counts the tokens)."
        )
    drawn.append((plots.plot_lr(jobs, out), "Learning rate vs step"))
    for key, values in swept_numbers(jobs).items():
        if key in skip:
            continue
        title = f"Final and best val loss vs `{key}`"
        drawn.append((plots.plot_val_loss_vs_swept(jobs, out, key, values), title))
    drawn.append((plots.plot_val_loss_vs_params(jobs, out), "Final val loss vs model size"))
    return [(p, title) for p, title in drawn if p is not None], notes


def _scaling(jobs: list[Job], out: Path) -> tuple[list[Path], list[str]]:
    """The scaling-law section and its figures, for jobs that differ in size (else nothing)."""
    found = scaling.points(jobs)
    if len({p.n for p in found}) < 2:
        return [], []
    result = scaling.analyse(found)
    drawn: dict[str, Path] = {}
    if isinstance(result.by_params, scaling.PowerLaw):
        xs, losses = [p.n for p in found], [p.loss for p in found]
        drawn["N"] = plots.plot_power_law(
            xs, losses, result.by_params, out, plots.SCALING_VS_PARAMS, "non-embedding parameters N"
        )
    if isinstance(result.by_compute, scaling.PowerLaw):
        xs, losses = [b.compute for b in result.frontier], [b.loss_opt for b in result.frontier]
        drawn["C"] = plots.plot_power_law(
            xs,
            losses,
            result.by_compute,
            out,
            plots.SCALING_VS_COMPUTE,
            "training FLOPs C",
            "lowest final val loss at each budget",
        )
    if isinstance(result.isoflop, list):
        drawn["isoflop"] = plots.plot_isoflop(result.isoflop, out)
    names = {key: path.name for key, path in drawn.items()}
    return list(drawn.values()), scaling.markdown(result, names)


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


def _markdown(
    path: Path,
    jobs: list[Job],
    figures: list[tuple[Path, str]],
    notes: list[str],
    lead: list[str],
) -> str:
    """report.md: the summary, ``lead`` (a search's section), the jobs' table and the figures."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [
        f"# Report: {path}",
        "",
        f"{len(jobs)} job(s): {summary}. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        *lead,
        *(["## Jobs", ""] if lead else []),
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
    for note in notes:
        lines += [note, ""]
    for figure, title in figures:
        lines += [f"## {title}", "", f"![{figure.stem}]({figure.name})", ""]
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
