"""Preemption on a real SLURM cluster: SIGUSR2 -> checkpoint -> requeue -> resume -> finish."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import last_logged_step, read_metrics, run_entry, text_data_args
from tests.slurm.test_slurm_sweeps import JOB_TIMEOUT_S, _wait_until_gone

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

STEPS = 600


def test_preempted_job_is_requeued_and_resumes_where_it_stopped(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        "cluster=slurm_cpu",
        "model=tiny",
        "hydra.launcher.wait=false",
        "hydra.launcher.timeout_min=15",
        *text_data_args(alphabet_corpus, cache_dir),
        f"hydra.sweep.dir={sweep_dir}",
        "train.batch_size=4",
        f"train.max_steps={STEPS}",
        "train.eval_every=200",
        "train.ckpt_every=200",
        "train.eval_steps=2",
        "train.log_every=5",
        "train.device=cpu",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (job_id,) = re.findall(r"job (\d+(?:_\d+)?):", result.stdout)
    job_dir = sweep_dir / "0"

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while last_logged_step(job_dir / "metrics.jsonl") < 30:
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.2)
    # What SLURM sends before a time limit (--signal=USR2@...) or on preemption, to every task.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    info: dict = {}
    while time.monotonic() < deadline:
        run_json = job_dir / "run.json"
        if run_json.exists():
            info = json.loads(run_json.read_text())
            if info["status"] == "completed":
                break
        time.sleep(1)
    _wait_until_gone(job_id.split("_")[0], 60)
    assert info.get("status") == "completed", info
    assert info["distributed"]["slurm_restart_count"] >= 1
    assert info["resumed_from"] and info["world_size"] == 2
    stopped = [
        line for line in (job_dir / "train.log").read_text().splitlines() if "stopped by" in line
    ] or ["(see .submitit logs)"]
    steps = [e["step"] for e in read_metrics(job_dir) if "train/loss" in e]
    assert steps == list(range(5, STEPS + 1, 5)), f"steps lost or repeated; {stopped}"
