"""``hydra/sweeper=search``: a Bayesian search (Optuna's TPE, ask/tell) over Hydra's launcher.

Why not hydra-optuna-sweeper: its newest release (1.3.0) still requires ``optuna<3``, whose
SQLite storage fails under SQLAlchemy 2 (``AssertionError`` in ``get_current_version``) unless
SQLAlchemy < 2 and alembic < 1.14 are pinned as well; it also counts ``n_trials`` per command
rather than per study (a restarted search would start over) and a failed job ends its sweep.

How it runs: every batch of ``n_jobs`` trials is asked from the study, handed to the launcher
(Hydra's basic one here, one SLURM job each with ``cluster=slurm*``), and each job's return
value (``train.py``: the final val loss) is told back; a job that failed, or returned something
that is not a finite number, is a failed trial and the search goes on. Trial ``n`` runs in job
folder ``<sweep dir>/n``. The study lives in ``<sweep dir>/study.db`` (SQLite), so the same
command with the same ``hydra.sweep.dir`` continues it: ``n_trials`` is the number of finished
trials (completed or failed) the study should hold, and trials a stopped search left running are
run again first, in their own folders, where the run resumes from its checkpoint.

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module outside
``sys.modules``, where dataclasses cannot resolve string annotations.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

STUDY_FILE = "study.db"
RESULTS_FILE = "search_results.yaml"
SPACE_ATTR = "search_space"


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.minigpt_search.sweeper.SearchSweeper"
    n_trials: int = 20  # finished trials (completed or failed) the study should hold
    n_jobs: int = 2  # trials per launcher batch: SLURM jobs at a time
    direction: str = "minimize"  # of the jobs' return value (train.py: final val loss)
    seed: Optional[int] = 0  # noqa: UP045 - OmegaConf reads typing.Optional; null: unseeded
    storage: Optional[str] = None  # noqa: UP045 - null: sqlite:///<sweep dir>/study.db
    study_name: str = "search"
    params: dict[str, str] = field(default_factory=dict)


class SearchSweeper(Sweeper):
    """Ask a batch, launch it, tell its results; until the study holds ``n_trials``."""

    def __init__(self, **params: Any) -> None:
        self.n_trials = int(params["n_trials"])
        self.n_jobs = int(params["n_jobs"])
        self.direction = str(params["direction"])
        self.seed = params["seed"]
        self.storage = params["storage"]
        self.study_name = str(params["study_name"])
        self.params = dict(params["params"] or {})
        self.config: Optional[DictConfig] = None  # noqa: UP045
        self.launcher: Any = None
        self.hydra_context: Optional[HydraContext] = None  # noqa: UP045
        self._left_running: list[int] = []  # trial numbers a stopped search left running

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        """Run the search; returns the jobs' results (those of this command)."""
        try:
            import optuna
        except ImportError:
            raise HydraException(
                "hydra/sweeper=search needs optuna, on the machine that runs the search only: "
                "pip install 'optuna>=4.0' (or minigpt's extra: pip install -e '.[search]')"
            ) from None
        from hydra_plugins.minigpt_search import space as spaces

        assert self.config is not None
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened
        self._check_settings()
        space = spaces.parse([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        if self.config.hydra.launcher.get("dry_run"):
            return self._dry_run(space, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweeper does
        study = self._study(space, sweep_dir)
        returns: list[JobReturn] = []
        while batch := self._next_batch(study, space):
            returns += self._run(study, space, batch)
        self._finish(study, sweep_dir)
        return returns

    # ------------------------------------------------------------------ the study
    def _check_settings(self) -> None:
        assert self.config is not None
        if self.n_trials < 1 or self.n_jobs < 1:
            raise HydraException(
                f"hydra.sweeper.n_trials={self.n_trials} and hydra.sweeper.n_jobs={self.n_jobs} "
                "must both be at least 1"
            )
        if self.direction not in ("minimize", "maximize"):
            raise HydraException(
                f"hydra.sweeper.direction={self.direction}: give minimize or maximize"
            )
        if self.config.hydra.launcher.get("wait") is False:
            raise HydraException(
                "a search reads every job's result before it asks the next trials: "
                "drop hydra.launcher.wait=false"
            )

    def _storage(self, sweep_dir: Path) -> str:
        return self.storage or f"sqlite:///{sweep_dir / STUDY_FILE}"

    def _study(self, space: Any, sweep_dir: Path) -> Any:
        """The study of this sweep folder: made, or loaded as it was left."""
        import optuna

        storage = self._storage(sweep_dir)
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            direction=self.direction,
            load_if_exists=True,
        )
        stored = study.user_attrs.get(SPACE_ATTR)
        if stored is not None and stored != space.as_json():
            raise HydraException(
                f"the study '{self.study_name}' in {storage} searched another space "
                f"({', '.join(sorted(stored))}); give the search another hydra.sweep.dir, "
                "or hydra.sweeper.study_name"
            )
        if study.direction.name.lower() != self.direction:
            raise HydraException(
                f"the study '{self.study_name}' in {storage} was made to "
                f"{study.direction.name.lower()}, not to {self.direction}"
            )
        study.set_user_attr(SPACE_ATTR, space.as_json())
        # Seeded from where the study stands: a resumed search must not redraw its first trials.
        seed = None if self.seed is None else int(self.seed) + len(study.trials)
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        self._left_running = [t.number for t in _trials(study, "RUNNING")]
        self._say_start(study, space, storage)
        return study

    def _say_start(self, study: Any, space: Any, storage: str) -> None:
        from hydra_plugins.minigpt_search.space import describe

        done = len(_trials(study, "COMPLETE", "FAIL"))
        todo = max(0, self.n_trials - done)
        print(
            f"search: study '{self.study_name}' ({storage}) holds {done} of "
            f"{self.n_trials} trials; {todo} to run, {self.n_jobs} at a time, TPE sampler",
            flush=True,
        )
        for key, distribution in space.distributions.items():
            print(f"  {key}: {describe(distribution)}", flush=True)
        if self._left_running:
            print(f"  rerun first (a stopped search left them running): {self._left_running}")

    def _next_batch(self, study: Any, space: Any) -> list[Any]:
        """Trials to run next: those a stopped search left running, then new ones."""
        import optuna

        todo = min(self.n_jobs, self.n_trials - len(_trials(study, "COMPLETE", "FAIL")))
        batch = []
        while self._left_running and len(batch) < todo:
            left = study.trials[self._left_running.pop(0)]
            trial = optuna.trial.Trial(study, left._trial_id)
            if set(space.distributions) <= set(left.params):
                batch.append(trial)
            else:  # stopped before all its values were drawn: nothing to rerun
                trial.set_user_attr("error", "left running without all its parameters")
                study.tell(trial, state=_fail_state())
        while len(batch) < todo:
            batch.append(study.ask(space.distributions))
        return batch

    # ------------------------------------------------------------------ one batch
    def _run(self, study: Any, space: Any, batch: list[Any]) -> list[JobReturn]:
        """Launch a batch, in runs of consecutive trial numbers (trial n runs as job n)."""
        returns: list[JobReturn] = []
        runs: list[list[Any]] = []
        for trial in sorted(batch, key=lambda t: t.number):
            if runs and runs[-1][-1].number + 1 == trial.number:
                runs[-1].append(trial)
            else:
                runs.append([trial])
        for run in runs:
            overrides = [space.overrides(trial.params) for trial in run]
            try:
                self.validate_batch_is_legal(overrides)
            except Exception:
                for trial in run:  # the command line is wrong: no rerun of these on a restart
                    study.tell(trial, state=_fail_state())
                raise
            try:
                results = list(self.launcher.launch(overrides, initial_job_idx=run[0].number))
            except Exception as err:  # a job that left no result (killed, lost): the batch fails
                results = [_failed(o, err) for o in overrides]
            for trial, result in zip(run, results, strict=True):
                self._tell(study, trial, result)
            returns += results
        return returns

    def _tell(self, study: Any, trial: Any, result: JobReturn) -> None:
        value, error = _objective(result)
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        if value is None:
            trial.set_user_attr("error", error)
            study.tell(trial, state=_fail_state())
            print(f"trial {trial.number} failed: {error} ({params})", flush=True)
        else:
            study.tell(trial, value)
            print(f"trial {trial.number}: {value:.4f} ({params})", flush=True)

    def _finish(self, study: Any, sweep_dir: Path) -> None:
        """The best trial, printed and written beside the study; a search with none fails."""
        completed, failed = _trials(study, "COMPLETE"), _trials(study, "FAIL")
        if not completed:
            first = failed[0].user_attrs.get("error", "no error recorded") if failed else "none"
            raise HydraException(
                f"no trial of the search completed ({len(failed)} failed; the first: {first})"
            )
        best = study.best_trial
        results = {
            "study": self.study_name,
            "storage": self._storage(sweep_dir),
            "direction": self.direction,
            "completed": len(completed),
            "failed": [t.number for t in failed],
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": dict(best.params),
            "best_job_dir": str(sweep_dir / str(best.number)),
        }
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        print(
            f"search done: {len(completed)} completed, {len(failed)} failed; best: trial "
            f"{best.number}, {best.value:.4f} ({params}); {sweep_dir / RESULTS_FILE}",
            flush=True,
        )

    # ------------------------------------------------------------------ dry run
    def _dry_run(self, space: Any, sweep_dir: Path) -> list[JobReturn]:
        """The search space and the first batch, through the launcher's own dry run."""
        import optuna

        from hydra_plugins.minigpt_search.space import describe

        study_file = sweep_dir / STUDY_FILE
        done = 0
        if self.storage is None and study_file.exists():
            study = optuna.load_study(study_name=self.study_name, storage=self._storage(sweep_dir))
            done = len(_trials(study, "COMPLETE", "FAIL"))
        todo = max(0, self.n_trials - done)
        print(
            f"search (dry run): {todo} trial(s) to run ({done} of {self.n_trials} done), "
            f"{self.n_jobs} job(s) at a time: {math.ceil(todo / self.n_jobs)} batch(es) of "
            f"TPE trials; study {self._storage(sweep_dir)}"
        )
        for key, distribution in space.distributions.items():
            print(f"  {key}: {describe(distribution)}")
        if todo == 0:
            return []
        sample = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=self.seed))
        first = [sample.ask(space.distributions) for _ in range(min(self.n_jobs, todo))]
        print("the first batch, with sampled values:")
        return list(
            self.launcher.launch([space.overrides(t.params) for t in first], initial_job_idx=done)
        )


def _trials(study: Any, *states: str) -> list[Any]:
    import optuna

    wanted = tuple(getattr(optuna.trial.TrialState, s) for s in states)
    return study.get_trials(deepcopy=False, states=wanted)


def _fail_state() -> Any:
    import optuna

    return optuna.trial.TrialState.FAIL


def _objective(result: JobReturn) -> tuple[Optional[float], str]:  # noqa: UP045
    """A job's value, or why it is none: a failed job, or a return that is no finite number."""
    if result.status != JobStatus.COMPLETED:
        error = result._return_value  # the job's exception (JobFailed: its error line)
        lines = str(error).strip().splitlines()
        return None, lines[-1] if lines else type(error).__name__
    try:
        value = float(result.return_value)
    except (TypeError, ValueError):
        return None, f"the job returned {result.return_value!r}, not a number"
    if not math.isfinite(value):
        return None, f"the job returned {value}"
    return value, ""


def _failed(overrides: list[str], err: Exception) -> JobReturn:
    return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=err)


ConfigStore.instance().store(
    group="hydra/sweeper", name="search", node=SearchSweeperConf, provider="minigpt"
)
