"""Bayesian search (``hydra/sweeper=search``, Optuna TPE) on Hydra's basic launcher, tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.minigpt_search import space as spaces
from minigpt import report
from tests.conftest import ROOT, Result, run_entry, text_data_args

LR_SPACE = "tag(log, interval(1e-4, 1e-2))"


def _search(tmp_path: Path, corpus: Path, cache: Path, *overrides: str) -> Result:
    """``train.py -m +sweep=search_lr`` of tiny 4-step runs into ``tmp_path/search``."""
    return run_entry(
        "train.py",
        "-m",
        "+sweep=search_lr",
        "model=tiny",
        *text_data_args(corpus, cache),
        "train.device=cpu",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.eval_steps=2",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweep.dir={tmp_path / 'search'}",
        *overrides,
        cwd=tmp_path,
    )


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="search_lr", storage=f"sqlite:///{sweep_dir}/study.db")


def _run_json(job_dir: Path) -> dict:
    return json.loads((job_dir / "run.json").read_text())


def test_hydra_sweep_syntax_becomes_the_search_space() -> None:
    space = spaces.parse(
        [
            f"optimizer.lr={LR_SPACE}",
            "optimizer.warmup_steps=range(0, 120, 20)",
            "optimizer.weight_decay=interval(0.0, 0.2)",
            "model.n_head=2,4",
            "model=tiny",
            "optimizer.weight_decay=interval(0.0, 0.1)",  # a later value of a key wins
        ]
    )
    assert space.distributions == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "optimizer.warmup_steps": IntDistribution(0, 100, step=20),  # range's stop excluded
        "optimizer.weight_decay": FloatDistribution(0.0, 0.1),
        "model.n_head": CategoricalDistribution(["2", "4"]),
    }
    assert space.fixed == ["model=tiny"]
    params = {"optimizer.lr": 0.002, "optimizer.warmup_steps": 40}
    params |= {"optimizer.weight_decay": 0.05, "model.n_head": "4"}
    assert space.overrides(params) == [
        "model=tiny",
        "optimizer.lr=0.002",
        "optimizer.warmup_steps=40",
        "model.n_head=4",
        "optimizer.weight_decay=0.05",  # where the key was given last
    ]


def test_a_log_scale_on_choices_is_refused_in_one_line() -> None:
    with pytest.raises(Exception, match=r"optimizer.lr=.*log scale needs an interval"):
        spaces.parse(["optimizer.lr=tag(log, choice(1e-3, 1e-2))"])


@pytest.mark.slow
def test_search_runs_its_trials_and_keeps_them_in_the_study(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    sweep_dir = tmp_path / "search"
    result = _search(tmp_path, alphabet_corpus, cache_dir, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for trial in trials:  # trial n ran in job folder n, with its own values, and returned its loss
        info = _run_json(sweep_dir / str(trial.number))
        assert info["status"] == "completed"
        assert info["config"]["optimizer"]["lr"] == trial.params["optimizer.lr"]
        assert info["config"]["optimizer"]["warmup_steps"] == trial.params["optimizer.warmup_steps"]
        assert trial.value == pytest.approx(info["final_val_loss"])
        assert 1e-4 <= trial.params["optimizer.lr"] <= 1e-2
    best = min(trials, key=lambda t: t.value)
    assert f"best: trial {best.number}, {best.value:.4f}" in result.stdout
    assert "search_results.yaml" in result.stdout and (sweep_dir / "search_results.yaml").exists()


@pytest.mark.slow
def test_a_restarted_search_continues_where_it_stopped(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """n_trials counts the study's finished trials: 2, then 4 in all (not 2 + 4); a trial the
    stopped search left running is run again first, in its own folder."""
    sweep_dir = tmp_path / "search"
    first = _search(tmp_path, alphabet_corpus, cache_dir, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    # What a search stopped mid-batch leaves: a trial asked, its values drawn, never told.
    study = _study(sweep_dir)
    left = study.ask(spaces.parse(["+sweep=search_lr", *_search_lr_params()]).distributions)
    assert left.number == 2
    again = _search(tmp_path, alphabet_corpus, cache_dir, "hydra.sweeper.n_trials=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds 2 of 4 trials; 2 to run" in again.stdout
    assert "rerun first (a stopped search left them running): [2]" in again.stdout
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    rerun = _run_json(sweep_dir / "2")["config"]["optimizer"]
    assert rerun["lr"] == left.params["optimizer.lr"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]


def _search_lr_params() -> list[str]:
    params = OmegaConf.load(ROOT / "sweeps" / "search_lr.yaml").hydra.sweeper.params
    return [f"{key}={value}" for key, value in params.items()]


@pytest.mark.slow
def test_a_failed_trial_is_recorded_as_failed_and_the_search_goes_on(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """tiny's width 64 has no 3 heads: those trials are refused at start-up; the others run.
    With the sampler's seed 0, 4 trials draw both values."""
    sweep_dir = tmp_path / "search"
    result = _search(
        tmp_path, alphabet_corpus, cache_dir, "hydra.sweeper.n_trials=4", "model.n_head=2,3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(sweep_dir).trials
    failed = [t for t in trials if t.params["model.n_head"] == "3"]
    assert failed and len(failed) < 4
    for trial in trials:
        if trial in failed:
            assert trial.state == TrialState.FAIL
            assert "model.n_head=3 must divide model.d_model=64" in trial.user_attrs["error"]
            assert f"trial {trial.number} failed: model.n_head=3 must divide" in result.stdout
        else:
            assert trial.state == TrialState.COMPLETE
            assert _run_json(sweep_dir / str(trial.number))["status"] == "completed"
    assert f"{4 - len(failed)} completed, {len(failed)} failed" in result.stdout
    # The report reads the search: best trial first, the refused ones last with their error.
    report.write_report(sweep_dir)
    markdown = (sweep_dir / "report.md").read_text()
    rows = [line for line in markdown.split("## Jobs")[0].splitlines() if line.startswith("| ")]
    best = min((t for t in trials if t not in failed), key=lambda t: t.value)
    assert rows[2].startswith(f"| {best.number} | {best.value:.4f} | ")
    assert all("**failed**: model.n_head=3 must divide" in r for r in rows[-len(failed) :])
    assert f"optimizer.lr={best.params['optimizer.lr']!r}" in markdown.split("~~~bash")[1]


def test_dry_run_shows_the_search_space_and_jobs_and_makes_nothing(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "search"
    result = run_entry(
        "train.py",
        "-m",
        "+sweep=search_lr",
        "cluster=slurm_cpu",
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.n_jobs=4",
        "hydra.launcher.dry_run=true",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "12 trial(s) to run (0 of 12 done), 4 job(s) at a time: 3 batch(es)" in out
    assert "optimizer.lr: log-uniform float in [0.0001, 0.01]" in out
    assert "optimizer.warmup_steps: int in [0, 100], step 20" in out
    assert "optimizer.weight_decay: float in [0, 0.2]" in out
    assert "dry run: 4 job(s) would be submitted" in out and "tasks_per_node=2" in out
    assert not sweep_dir.exists()  # no study, no job folders


class _Job:
    """A submitit job as the SLURM launcher waits on it: a result, or the error of none."""

    def __init__(self, result: object) -> None:
        self.result = result

    def results(self) -> list[object]:
        if isinstance(self.result, Exception):
            raise self.result
        return [self.result]


def test_a_slurm_job_that_left_no_result_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job killed or lost (submitit raises on its result) must not take the results of the
    batch's other jobs with it: the search tells every trial of a batch."""
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.minigpt_slurm.launcher import MinigptSlurmLauncher

    done = JobReturn(overrides=["a=1"], status=JobStatus.COMPLETED, _return_value=2.5)
    lost = RuntimeError("Job 12_1 (task: 0) with path ... has not produced any output")
    launcher = MinigptSlurmLauncher.__new__(MinigptSlurmLauncher)
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": "unused"}}})
    monkeypatch.setattr(launcher, "_submit", lambda overrides, idx: [_Job(done), _Job(lost)])
    first, second = launcher._submit_and_wait([["a=1"], ["a=2"]], initial_job_idx=0)
    assert first.return_value == 2.5
    assert second.status == JobStatus.FAILED and second.overrides == ["a=2"]
    with pytest.raises(RuntimeError, match="has not produced any output"):
        _ = second.return_value


@pytest.mark.slow
def test_a_search_whose_every_trial_failed_ends_with_one_error_line(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    result = _search(
        tmp_path, alphabet_corpus, cache_dir, "hydra.sweeper.n_trials=2", "model.n_head=3"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no trial of the search completed (2 failed; the first: "), last
    assert [t.state for t in _study(tmp_path / "search").trials] == [TrialState.FAIL] * 2
