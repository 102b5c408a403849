"""Where metrics go: metrics.jsonl, W&B and TensorBoard behind one interface (the console and
train.log: console.py).

Only rank 0 builds these (the trainer passes ``enabled=False`` elsewhere), so nothing here asks
which rank it is on. Every tracker writes inside the run folder: ``metrics.jsonl``, ``wandb/``
(offline runs to ``wandb sync`` later) and ``tensorboard/``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from minigpt.config import ConfigError, LoggerConfig

METRICS_FILE = "metrics.jsonl"
WANDB_MODES = ("online", "offline", "disabled")
# WANDB_MODE's older spellings, as wandb itself accepts them.
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


class Tracker(Protocol):
    """One destination for metrics."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def finish(self, status: str) -> None: ...


@dataclass(frozen=True)
class JobInfo:
    """Where a run sits in a sweep: the runs of one multirun share ``group``, each has ``name``."""

    name: str | None = None
    group: str | None = None
    job_type: str = "train"


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


def last_logged_step(path: Path) -> int:
    """The highest step in a metrics file (0 when there is none): what the trackers last saw."""
    return max((e["step"] for e in logged_events(path)), default=0)


def logged_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics file that carry a step; a line cut short by a kill is skipped."""
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("step"), int):
                events.append(event)
    return events


def sample_rows(events: list[dict[str, Any]]) -> list[list[Any]]:
    """The ``[step, text]`` rows of the samples (the text values) among ``events``."""
    return [[e["step"], v] for e in events for v in e.values() if isinstance(v, str)]


def _truncate_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        at = event.get("step", 0) if isinstance(event, dict) else None
        if isinstance(at, int) and at <= step:  # anything else is not one of our events
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class WandbTracker:
    """A Weights & Biases run, written under ``run_dir/wandb`` and never waiting for a login.

    ``run_id`` continues an earlier run (the id a checkpoint carries): W&B resumes it with
    ``resume="allow"``. Steps up to ``skip_through`` are not sent again, because that run already
    holds them: a job killed after logging step 130 and resumed from its step-100 checkpoint logs
    101-130 to metrics.jsonl again but to W&B only from 131 on, so W&B has each step once.
    Text values (generated samples) go into one ``samples`` table that grows at each evaluation.
    """

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        *,
        config: dict[str, Any],
        job: JobInfo,
        run_id: str | None = None,
        skip_through: int = 0,
        samples: list[list[Any]] | None = None,
    ) -> None:
        import wandb  # imported here: it is slow to import and only this tracker needs it

        self._wandb = wandb
        self._skip_through = skip_through
        # A table logged again replaces the last one: a resumed run starts from the rows the run
        # it continues already showed (read back from metrics.jsonl), not from an empty table.
        self._samples: list[list[Any]] = list(samples or [])
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or job.group,
            name=cfg.name or job.name,
            tags=list(cfg.tags) or None,
            job_type=job.job_type,
            config=config,
            dir=str(run_dir),
            mode=_wandb_mode_with_credentials(cfg, wandb),
            id=run_id,
            resume="allow",
        )
        self.run_id: str = self._run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if step <= self._skip_through:
            return
        values = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        texts = [v for v in metrics.values() if isinstance(v, str)]
        if texts:
            self._samples += [[step, text] for text in texts]
            values["samples"] = self._wandb.Table(columns=["step", "text"], data=self._samples)
        self._run.log(values, step=step)

    def finish(self, status: str) -> None:
        # A non-zero exit code is what makes W&B show the run as failed rather than finished; a
        # run stopped by a signal to be requeued is marked preempted, to be resumed under its id.
        if status == "interrupted":
            self._run.mark_preempting()
        self._run.finish(exit_code=0 if status == "completed" else 1)


def wandb_mode(cfg: LoggerConfig, environ: dict[str, str] | None = None) -> str:
    """``logger.mode``, else ``WANDB_MODE``, else offline: no default needs the network."""
    env = os.environ if environ is None else environ
    mode = cfg.mode or env.get("WANDB_MODE") or "offline"
    mode = _WANDB_MODE_ALIASES.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ConfigError(
            f"WANDB_MODE={mode!r} is not allowed; use one of: {', '.join(WANDB_MODES)} "
            "(or set logger.mode)"
        )
    return mode


def _wandb_mode_with_credentials(cfg: LoggerConfig, wandb: Any) -> str:
    """Online only with credentials already in place: wandb would otherwise prompt for a key."""
    mode = wandb_mode(cfg)
    if mode == "online" and not wandb.login(prompt=False, verify=False):
        print(
            "warning: logger.mode=online but no W&B credentials (set WANDB_API_KEY or run "
            "`wandb login`); logging offline instead, upload later with `wandb sync`",
            file=sys.stderr,
            flush=True,
        )
        return "offline"
    return mode


class TensorBoardTracker:
    """Scalars (and samples as text) for TensorBoard, under ``run_dir/tensorboard``."""

    def __init__(self, log_dir: Path, resume_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch ships the writer but not the tensorboard package
            raise ConfigError(
                "logger=tensorboard needs the tensorboard package: "
                "pip install 'minigpt[tensorboard]'"
            ) from err
        # purge_step hides the events that an interrupted attempt wrote after the checkpoint this
        # one resumes from, so TensorBoard shows every step once.
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, str):
                self._writer.add_text(key, f"```\n{value}\n```", step)
            elif isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def finish(self, status: str) -> None:
        self._writer.close()


class MultiTracker:
    """Fans each call out to several trackers; ``run_id`` is the W&B run's id, if there is one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if isinstance(t, WandbTracker)), None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def finish(self, status: str) -> None:
        for tracker in self.trackers:
            tracker.finish(status)


def build_tracker(
    cfg: LoggerConfig,
    run_dir: Path,
    *,
    enabled: bool,
    resume_step: int | None,
    config: dict[str, Any] | None = None,
    job: JobInfo | None = None,
    run_id: str | None = None,
) -> MultiTracker:
    """The trackers ``cfg`` asks for (none on ranks other than 0).

    ``resume_step`` is the checkpoint's step (None: a fresh start, which drops what an earlier
    attempt logged in this folder); ``run_id`` is the W&B run to continue; ``config`` is logged
    with the run.
    """
    if not enabled:
        return MultiTracker([])
    if cfg.wandb:
        wandb_mode(cfg)  # a bad WANDB_MODE stops the run before anything is written
    start = resume_step or 0
    metrics = run_dir / METRICS_FILE
    # What W&B already holds of the run it continues: read before metrics.jsonl is cut back.
    logged = logged_events(metrics) if cfg.jsonl else []
    seen = max([start, *(e["step"] for e in logged)])
    samples = sample_rows(logged) if cfg.wandb and run_id else []
    trackers: list[Tracker] = []
    if cfg.jsonl:
        trackers.append(JsonlTracker(metrics, start))
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard", start))
    if cfg.wandb:
        trackers.append(
            WandbTracker(
                cfg,
                run_dir,
                config=config or {},
                job=job or JobInfo(),
                run_id=run_id,
                skip_through=seen if run_id else 0,
                samples=samples,
            )
        )
    return MultiTracker(trackers)
