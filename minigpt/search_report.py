"""The sweep report's section for a Bayesian search (``hydra/sweeper=search``).

A search leaves its trials in job folders ``0``, ``1``, ... like any sweep, its space in
``multirun.yaml`` (``hydra.sweeper.params`` and the command line's sweeps) and its study in
``study.db``. The trials are read from the job folders; the study is read with the standard
library's sqlite3 only for what no folder holds (a trial refused before its folder was made, the
error line of a failed one), so the report needs no optuna.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from minigpt import plots
from minigpt.jobs import Job

RESULTS_FILE = "search_results.yaml"  # hydra_plugins/minigpt_search/sweeper.py writes them
STUDY_FILE = "study.db"
MULTIRUN_FILE = "multirun.yaml"
SWEEPER = "minigpt_search"  # in hydra.sweeper._target_
_STATES = {"COMPLETE": "completed", "FAIL": "failed", "RUNNING": "running", "WAITING": "pending"}


@dataclass
class Trial:
    """One trial: its searched values (as override text), objective and outcome."""

    number: int
    values: dict[str, str] = field(default_factory=dict)
    loss: float | None = None  # the objective: the final val loss
    status: str = "pending"
    error: str = ""


@dataclass
class Search:
    """What a search folder holds: the space (key -> log scale) and the trials."""

    space: dict[str, bool]
    trials: list[Trial]
    best_overrides: list[str]  # the best trial's whole command line, as its job got it
    maximize: bool = False

    @property
    def best(self) -> Trial | None:
        done = [t for t in self.trials if t.loss is not None]
        pick = max if self.maximize else min
        return pick(done, key=lambda t: t.loss or 0.0) if done else None


# ---------------------------------------------------------------- reading
def load_search(path: Path, jobs: list[Job]) -> Search | None:
    """The search of a sweep folder, or None when the folder is not one."""
    sweeper = _sweeper(path)
    if sweeper is None and not (path / RESULTS_FILE).exists():
        return None
    sweeper = sweeper or {}
    space = _space(sweeper) or _space_from_results(path)
    study = _read_study(_study_file(path, sweeper), str(sweeper.get("study_name", "search")))
    by_label = {j.label: j for j in jobs if j.label.isdigit()}
    numbers = sorted({int(n) for n in by_label} | set(study))
    trials = [_trial(n, by_label.get(str(n)), study.get(n), space) for n in numbers]
    search = Search(space, trials, [], maximize=sweeper.get("direction") == "maximize")
    best = search.best
    if best is not None:
        job = by_label.get(str(best.number))
        given = job.overrides if job is not None else []
        search.best_overrides = given or [f"{k}={v}" for k, v in best.values.items()]
    return search


def _sweeper(path: Path) -> dict[str, Any] | None:
    """``hydra.sweeper`` of multirun.yaml, with the command line's overrides, when it is ours."""
    try:
        saved = OmegaConf.load(path / MULTIRUN_FILE)
        sweeper = OmegaConf.to_container(saved.hydra.sweeper, resolve=False)
        task = OmegaConf.to_container(saved.hydra.overrides.task, resolve=False)
    except Exception:  # no multirun.yaml, or not Hydra's: not a search we can read this way
        return None
    if not isinstance(sweeper, dict) or SWEEPER not in str(sweeper.get("_target_", "")):
        return None
    sweeper["task"] = [str(o) for o in task] if isinstance(task, list) else []
    return sweeper


def _space(sweeper: dict[str, Any]) -> dict[str, bool]:
    """The searched keys, each with whether its scale is log: the sweeper's own reading of
    ``hydra.sweeper.params`` then the command line (later keys win, sweeps are searched)."""
    from hydra_plugins.minigpt_search import space

    params = sweeper.get("params") or {}
    lines = [*(f"{k}={v}" for k, v in params.items()), *sweeper.get("task", [])]
    try:
        sweeps, _ = space.resolve(lines)
    except Exception:  # a space Hydra no longer reads: the trials' values alone
        return {}
    return {key: space.is_log(override) for key, override in sweeps.items()}


def _space_from_results(path: Path) -> dict[str, bool]:
    try:
        best = OmegaConf.load(path / RESULTS_FILE).get("best_params") or {}
    except Exception:
        return {}
    return {str(key): False for key in best}


def _study_file(path: Path, sweeper: dict[str, Any]) -> Path | None:
    storage = sweeper.get("storage")
    if not storage:
        return path / STUDY_FILE
    return Path(storage.removeprefix("sqlite:///")) if storage.startswith("sqlite:///") else None


def _read_study(db: Path | None, name: str) -> dict[int, Trial]:
    """The study's trials by number, read-only; {} where there is no SQLite study to read."""
    if db is None or not db.is_file():
        return {}
    trials: dict[int, Trial] = {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            for number, state, value in conn.execute(_TRIALS, (name,)):
                trials[number] = Trial(number, {}, value, _STATES.get(state, str(state).lower()))
            for number, key, value, distribution in conn.execute(_PARAMS, (name,)):
                trials[number].values[key] = _param_text(value, distribution)
            for number, error in conn.execute(_ERRORS, (name,)):
                trials[number].error = str(json.loads(error))
    except (sqlite3.Error, KeyError, ValueError, TypeError, IndexError):
        return {}  # another storage schema: the job folders alone
    return trials


# Optuna's RDB storage schema (optuna 4 and 5), read without optuna.
_OF_STUDY = "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = ?"
_TRIALS = (
    "SELECT t.number, t.state, v.value FROM trials t "
    "LEFT JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0 " + _OF_STUDY
)
_PARAMS = (
    "SELECT t.number, p.param_name, p.param_value, p.distribution_json FROM trial_params p "
    "JOIN trials t ON t.trial_id = p.trial_id " + _OF_STUDY
)
_ERRORS = (
    "SELECT t.number, a.value_json FROM trial_user_attributes a "
    "JOIN trials t ON t.trial_id = a.trial_id " + _OF_STUDY + " AND a.key = 'error'"
)


def _param_text(value: float, distribution: str) -> str:
    """A stored value as override text, as the sweeper wrote it (a choice: its index)."""
    dist = json.loads(distribution)
    if dist["name"] == "CategoricalDistribution":
        return str(dist["attributes"]["choices"][int(value)])
    return str(int(value)) if dist["name"] == "IntDistribution" else repr(float(value))


def _trial(number: int, job: Job | None, stored: Trial | None, space: dict[str, bool]) -> Trial:
    """A trial as its job folder says, and as the study says where the folder cannot."""
    trial = stored or Trial(number)
    if job is not None:
        for override in job.overrides:
            key, sep, text = override.lstrip("+~").partition("=")
            if sep and key in space:
                trial.values[key] = text
        if stored is None:  # no study to read: the folder's outcome is the trial's
            trial.status, trial.loss, trial.error = job.status, job.final_val_loss, job.lost or ""
        elif trial.status in ("running", "pending"):
            trial.status = job.status
    if trial.status != "completed":
        trial.loss = None
    return trial


# ---------------------------------------------------------------- writing
def markdown(search: Search, figures: list[tuple[Path, str]]) -> list[str]:
    """The search section of report.md: the best trial as a command, the trials, the plots."""
    failed = sum(t.status == "failed" for t in search.trials)
    done = sum(t.loss is not None for t in search.trials)
    lines = ["## Search", ""]
    lines += [f"{len(search.trials)} trial(s): {done} completed, {failed} failed.", ""]
    best = search.best
    if best is not None:
        lines += [f"Best: trial {best.number}, final val loss {best.loss:.4f}. To run it again:"]
        lines += ["", "~~~bash", command(search.best_overrides), "~~~", ""]
    lines += [trials_table(search), ""]
    for figure, title in figures:
        lines += [f"### {title}", "", f"![{figure.stem}]({figure.name})", ""]
    return lines


def command(overrides: list[str]) -> str:
    """``python train.py ...`` with every override quoted for the shell."""
    return " ".join(["python train.py", *(shlex.quote(o) for o in overrides)])


def trials_table(search: Search) -> str:
    """Trials best first by final val loss; unfinished ones, then failed ones, last."""
    keys = list(search.space) or sorted({k for t in search.trials for k in t.values})
    sign = -1 if search.maximize else 1
    order = sorted(
        search.trials,
        key=lambda t: (
            0 if t.loss is not None else 2 if t.status == "failed" else 1,
            sign * t.loss if t.loss is not None else t.number,
        ),
    )
    rows = [["trial", "final val loss", *(f"`{k}`" for k in keys), "status"]]
    rows.append(["---"] * len(rows[0]))
    for t in order:
        status = f"**failed**: {t.error}" if t.status == "failed" and t.error else t.status
        status = "**failed**" if status == "failed" else status
        loss = f"{t.loss:.4f}" if t.loss is not None else "—"
        values = [_short(t.values.get(k, "—")) for k in keys]
        rows.append([str(t.number), loss, *values, status])
    return "\n".join("| " + " | ".join(c.replace("|", r"\|") for c in row) + " |" for row in rows)


def _short(text: str) -> str:
    """A float drawn by the sampler (0.0038322168504927897) to four significant digits."""
    try:
        value = float(text)
    except ValueError:
        return text
    return text if value.is_integer() and "." not in text else f"{value:.4g}"


def draw(search: Search, out: Path) -> list[tuple[Path, str]]:
    """The objective over trials, and final val loss against each searched value."""
    done = [t for t in search.trials if t.loss is not None]
    if not done:
        return []
    failed = [t.number for t in search.trials if t.status == "failed"]
    best = search.best.number if search.best else -1
    losses = {t.number: float(t.loss or 0.0) for t in done}
    drawn = [
        (
            plots.plot_search_history(losses, failed, search.maximize, out),
            "Final val loss over trials",
        )
    ]
    for key, log in search.space.items():
        points = [(t.values[key], float(t.loss or 0.0), t.number) for t in done if key in t.values]
        path = plots.plot_search_param(key, points, best, log, out)
        scale = " (log scale, as searched)" if log else ""
        drawn.append((path, f"Final val loss vs `{key}`{scale}"))
    return [(p, title) for p, title in drawn if p is not None]
