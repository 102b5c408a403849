"""Sweeps submitted to a real SLURM cluster through hydra-submitit-launcher, 2 DDP ranks per job.

Needs the local cluster of scripts/slurm_cluster.sh (CI starts it). Every wait is bounded:
a job that never ends fails the test at its timeout instead of hanging CI.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from tests.conftest import ROOT, read_metrics, run_command, run_entry, text_data_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

JOB_TIMEOUT_S = 420


def _data_args(corpus: Path, cache: Path, sweep_dir: Path) -> list[str]:
    return [
        *text_data_args(corpus, cache),
        f"hydra.sweep.dir={sweep_dir}",
        "train.batch_size=4",
        "train.max_steps=12",
        "train.eval_every=6",
        "train.eval_steps=2",
        "train.log_every=3",
        "train.device=cpu",
        "optimizer.warmup_steps=2",
    ]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _assert_ddp_job_completed(job_dir: Path, steps: int = 12) -> dict:
    info = json.loads((job_dir / "run.json").read_text())
    assert info["status"] == "completed", info
    assert info["world_size"] == 2 and info["global_batch"] == 8
    dist = info["distributed"]
    assert dist["launcher"] == "slurm" and dist["backend"] == "gloo"
    assert dist["slurm_job_id"] and dist["master_addr"] and dist["ranks_per_node"] == 2
    assert (job_dir / "checkpoints" / "last.pt").is_file()
    assert (job_dir / "checkpoints" / "best.pt").is_file()
    events = read_metrics(job_dir)
    assert [e["step"] for e in events if "val/loss" in e] == [6, 12]
    assert info["steps"] == steps
    return info


def _two_task_sweep(tmp_path: Path, corpus: Path, cache: Path, *points: str) -> list[Path]:
    """A sweep over ``points`` on the upstream launcher, each job 2 tasks x 1 CPU; its job
    folders once every job has ended."""
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        *points,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=15",
        *_data_args(corpus, cache, sweep_dir),
        cwd=tmp_path,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return _job_dirs(sweep_dir)


def test_model_sweep_runs_one_ddp_job_per_point(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    jobs = _two_task_sweep(tmp_path, alphabet_corpus, cache_dir, "model=tiny,mini")
    assert [p.name for p in jobs] == ["0", "1"]
    infos = [_assert_ddp_job_completed(job) for job in jobs]
    assert [i["config"]["model"]["name"] for i in infos] == ["tiny", "mini"]
    assert infos[0]["params"] < infos[1]["params"]
    assert infos[0]["distributed"]["slurm_job_id"] != infos[1]["distributed"]["slurm_job_id"]


def test_fsdp_and_ddp_jobs_over_two_tasks_end_with_the_same_weights(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """One job per train.parallel, each over 2 SLURM tasks: the sharded one trains the same
    global batch to the same weights (float32 rounding apart, see tests/unit/test_parallel.py)."""
    points = ("model=tiny", "train.parallel=ddp,fsdp")
    jobs = _two_task_sweep(tmp_path, alphabet_corpus, cache_dir, *points)
    infos = [_assert_ddp_job_completed(job) for job in jobs]
    assert [i["config"]["train"]["parallel"] for i in infos] == ["ddp", "fsdp"]
    ddp, fsdp = (checkpoint.load(j / "checkpoints" / "last.pt")["model"] for j in jobs)
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=0, atol=1e-5, msg=key)


def test_named_sweep_with_the_cpu_cluster_preset(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        "+sweep=lr",
        "cluster=slurm_cpu",
        "model=tiny",
        "optimizer.lr=1e-3,3e-3",  # the command line narrows the sweep's own values
        "hydra.launcher.timeout_min=15",
        *_data_args(alphabet_corpus, cache_dir, sweep_dir),
        cwd=tmp_path,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    infos = [_assert_ddp_job_completed(job) for job in _job_dirs(sweep_dir)]
    assert [i["config"]["optimizer"]["lr"] for i in infos] == [1e-3, 3e-3]
    assert all(i["config"]["cluster"]["name"] == "slurm_cpu" for i in infos)
    assert (sweep_dir / "multirun.yaml").is_file()


def test_submit_and_return_then_collect_from_the_folder(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        "cluster=slurm_cpu",
        "model=tiny",
        "train.seed=1,2",
        "hydra.launcher.wait=false",
        "hydra.launcher.timeout_min=15",
        *_data_args(alphabet_corpus, cache_dir, sweep_dir),
        cwd=tmp_path,
        timeout=120,  # returns once submitted, long before the jobs end
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    job_ids = re.findall(r"job (\d+(?:_\d+)?):", result.stdout)
    assert len(job_ids) == 2, result.stdout
    assert str(sweep_dir) in result.stdout
    recorded = json.loads((sweep_dir / "submitted.json").read_text())
    assert [r["job_id"] for r in recorded] == job_ids
    _wait_until_gone(job_ids[0].split("_")[0], JOB_TIMEOUT_S)
    for job in _job_dirs(sweep_dir):
        _assert_ddp_job_completed(job)


def _sweep_over_paths(tmp_path: Path, cache: Path, paths: str, *extra: str):  # noqa: ANN202
    """A sweep of tiny 2-rank jobs on SLURM over ``data.paths`` values (some of them missing),
    into ``tmp_path/multirun``; returns once the launcher does."""
    args = _data_args(tmp_path, cache, tmp_path / "multirun")
    args = [a for a in args if not a.startswith("data.paths=")]
    return run_entry(
        "train.py",
        "-m",
        "cluster=slurm_cpu",
        "model=tiny",
        f"data.paths={paths}",
        *extra,
        *args,
        cwd=tmp_path,
        timeout=JOB_TIMEOUT_S,
    )


def test_a_waited_for_sweep_with_a_failing_job_returns_its_error(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """The launcher waits for results; a job that only exited would leave none, and without
    accounting (no sacct) the launcher would wait for ever. The failure is the job's result."""
    sweep_dir = tmp_path / "multirun"
    result = _sweep_over_paths(
        tmp_path, cache_dir, f"[{alphabet_corpus}/*.txt],[{tmp_path}/missing/*.txt]"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a job of the sweep failed (data.paths entry"), last
    _assert_ddp_job_completed(sweep_dir / "0")


def test_report_marks_a_job_that_died_before_run_json_as_failed_with_its_error(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """Without this the report would show such a job as pending for ever."""
    sweep_dir = tmp_path / "multirun"
    result = _sweep_over_paths(
        tmp_path, cache_dir, f"[{tmp_path}/missing/*.txt]", "hydra.launcher.wait=false"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (record,) = json.loads((sweep_dir / "submitted.json").read_text())
    _wait_until_gone(str(record["job_id"]).split("_")[0], JOB_TIMEOUT_S)
    assert not (sweep_dir / "0" / "run.json").exists()
    made = run_command([sys.executable, "-m", "minigpt.report", str(sweep_dir)], cwd=ROOT)
    assert made.returncode == 0, made.stderr[-2000:]
    markdown = (sweep_dir / "report.md").read_text()
    assert "| 0 | " in markdown and "**failed**" in markdown
    assert f"left the queue unfinished: error: data.paths entry '{tmp_path}/missing" in markdown


def _wait_until_gone(array_id: str, timeout_s: float) -> None:
    """Poll squeue (no accounting here, so no sacct) until the job array has left the queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", array_id, "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and not out.stdout.strip():
            return
        if out.returncode != 0 and "Invalid job id" in out.stderr:
            return
        time.sleep(2)
    subprocess.run(["scancel", array_id], check=False)
    pytest.fail(f"SLURM job {array_id} still queued or running after {timeout_s} s")
