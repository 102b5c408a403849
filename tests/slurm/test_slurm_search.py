"""A Bayesian search (``hydra/sweeper=search``) whose trials are SLURM jobs of 2 DDP ranks each.

Needs the local cluster of scripts/slurm_cluster.sh (CI starts it); every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, clean_env, last_logged_step, run_entry, text_data_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

JOB_TIMEOUT_S = 420


def _search_args(sweep_dir: Path, corpus: Path, cache: Path, trials: int) -> list[str]:
    """A search of ``trials`` tiny jobs of 2 ranks each, all in one batch."""
    return [
        "-m",
        "+sweep=search_lr",
        "cluster=slurm_cpu",
        "hydra.launcher.timeout_min=15",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={trials}",
        "model=tiny",
        *text_data_args(corpus, cache),
        "train.device=cpu",
        "train.batch_size=4",
        "train.eval_steps=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]


def test_search_on_slurm_tells_each_jobs_val_loss_and_a_failed_job_is_a_failed_trial(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """3 trials, one batch of 3 jobs. With the sampler's seed 1, trial 1 draws 3 heads, which
    tiny's width 64 refuses at start-up: that job's result is a failed trial, not a crash."""
    sweep_dir = tmp_path / "search"
    result = run_entry(
        "train.py",
        *_search_args(sweep_dir, alphabet_corpus, cache_dir, trials=3),
        "hydra.sweeper.seed=1",
        "model.n_head=2,3",
        "train.max_steps=6",
        cwd=tmp_path,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name="search_lr", storage=f"sqlite:///{sweep_dir}/study.db")
    trials = study.trials
    assert len(trials) == 3
    failed = [t for t in trials if t.params["model.n_head"] == "3"]
    assert failed and len(failed) < 3, [t.params for t in trials]
    for trial in trials:
        if trial in failed:
            assert trial.state == TrialState.FAIL
            assert "must divide model.d_model=64" in trial.user_attrs["error"]
            continue
        info = json.loads((sweep_dir / str(trial.number) / "run.json").read_text())
        assert info["status"] == "completed" and info["world_size"] == 2
        assert info["distributed"]["slurm_job_id"]
        assert info["config"]["optimizer"]["lr"] == trial.params["optimizer.lr"]
        assert trial.state == TrialState.COMPLETE
        assert trial.value == pytest.approx(info["final_val_loss"])  # rank 0's return, via SLURM
    assert (sweep_dir / "search_results.yaml").exists()


def test_a_requeued_trial_still_tells_the_search_its_val_loss(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """Trial 0's job gets SIGUSR2 (SLURM's warning before a time limit) once it trains: it
    saves, is requeued, resumes, and the value the study records is the resumed run's final
    val loss, as for trial 1, which ran straight through."""
    sweep_dir = tmp_path / "search"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *_search_args(sweep_dir, alphabet_corpus, cache_dir, trials=2),
        "train.max_steps=600",
        "train.eval_every=300",
        "train.ckpt_every=300",
        "train.log_every=5",
    ]
    search = subprocess.Popen(
        command, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        job_id = _job_id_once_training(sweep_dir / "0", search)
        signalled = subprocess.run(
            ["scancel", "--signal=USR2", f"{job_id}.0"], capture_output=True, text=True, timeout=30
        )
        assert signalled.returncode == 0, signalled.stderr
        output, _ = search.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if search.poll() is None:
            search.kill()
    text = output.decode(errors="replace")
    assert search.returncode == 0, text[-3000:]
    study = optuna.load_study(study_name="search_lr", storage=f"sqlite:///{sweep_dir}/study.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, text[-3000:]
    for trial in study.trials:
        info = json.loads((sweep_dir / str(trial.number) / "run.json").read_text())
        assert info["status"] == "completed" and info["steps"] == 600
        assert trial.value == pytest.approx(info["final_val_loss"])
        restarts = info["distributed"]["slurm_restart_count"]
        assert (restarts, bool(info["resumed_from"])) == (
            (1, True) if trial.number == 0 else (0, False)
        )


def _job_id_once_training(job_dir: Path, search: subprocess.Popen) -> str:
    """The SLURM job id of the trial in ``job_dir`` once it has logged step 30."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and search.poll() is None:
        if last_logged_step(job_dir / "metrics.jsonl") >= 30:
            info = json.loads((job_dir / "run.json").read_text())
            return str(info["distributed"]["slurm_job_id"])
        time.sleep(0.2)
    raise AssertionError(f"trial never trained (search exit {search.poll()})")
