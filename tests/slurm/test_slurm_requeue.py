"""Preemption on a real SLURM cluster: signal -> checkpoint -> requeue -> resume -> finish, with
the weights of a run that was never interrupted.

One sweep of four identical jobs (they differ only in how progress is printed), each interrupted
once it trains:
- ``scancel --signal=USR2``: what SLURM sends before a time limit, or on preemption with a user
  signal; rank 0 hands it to submitit, which requeues the job.
- ``scancel --signal=TERM``: SIGTERM with the job still RUNNING (preemption's grace time, an
  admin): submitit ignores SIGTERM, so rank 0 requeues the job through submitit itself.
- ``scontrol requeue``: what preemption in REQUEUE mode does: SIGTERM, and SLURM requeues the job;
  it must come back once, not twice.
- ``scancel``: SIGTERM too, but the job is cancelled: it saves its checkpoint and stays cancelled.
The three requeued jobs must each restart once and end with the same parameters as an
uninterrupted local run over the same micro-batches.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from tests.conftest import last_logged_step, read_metrics, run_entry, text_data_args
from tests.slurm.test_slurm_sweeps import JOB_TIMEOUT_S, _wait_until_gone

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

STEPS = 300  # ~2 s of training per job alone: still a window to signal it in (at step 30)
# train.progress value of a job -> how it is interrupted, and the signal its ranks then get
# The signals go to the job's srun step (``<job>.0``), as SLURM's own --signal does: signalling
# an array task as a whole also reaches it, but while sibling tasks are pending slurmctld answers
# "Job can not be altered now" and scancel retries, and signals again, for minutes.
ACTIONS = {
    "lines": (["scancel", "--signal=USR2"], "USR2"),
    "off": (["scancel", "--signal=TERM"], "TERM"),
    "auto": (["scontrol", "requeue"], "TERM"),
    "bar": (["scancel"], "TERM"),
}
REQUEUED = ("lines", "off", "auto")


def _train_args(corpus: Path, cache: Path, steps: int = STEPS) -> list[str]:
    return [
        "model=tiny",
        *text_data_args(corpus, cache),
        "train.batch_size=4",
        f"train.max_steps={steps}",
        "train.eval_every=500",
        "train.ckpt_every=500",
        "train.eval_steps=2",
        "train.log_every=5",
        "train.device=cpu",
    ]


def test_signalled_jobs_are_requeued_and_end_with_uninterrupted_weights(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    # The reference first: the jobs must not finish before they are signalled.
    expected = _uninterrupted_weights(tmp_path, alphabet_corpus, cache_dir)

    sweep_dir = tmp_path / "multirun"
    t0 = time.monotonic()
    submitted = _submit(
        tmp_path,
        sweep_dir,
        "cluster=slurm_cpu",  # 2 tasks x 1 CPU: DDP over 2 ranks, one thread each
        f"train.progress={','.join(ACTIONS)}",
        *_train_args(alphabet_corpus, cache_dir),
    )
    jobs = {sweep_dir / str(rec["job"]): rec for rec in submitted}
    assert len(jobs) == 4

    deadline = time.monotonic() + JOB_TIMEOUT_S
    pending = dict(jobs)
    while pending:  # interrupt each job once it is training
        for job_dir, rec in list(pending.items()):
            if last_logged_step(job_dir / "metrics.jsonl") >= 30:
                command, _ = ACTIONS[_progress(rec)]
                target = rec["job_id"] + (".0" if "--signal" in command[-1] else "")
                done = subprocess.run(
                    [*command, target], capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 0, (command, rec, done.stderr, time.monotonic() - t0)
                del pending[job_dir]
        assert time.monotonic() < deadline, f"never started training: {sorted(pending)}"
        time.sleep(0.2)

    requeued = {d: rec for d, rec in jobs.items() if _progress(rec) in REQUEUED}
    infos = {job_dir: _wait_for_end(job_dir, deadline) for job_dir in requeued}
    _wait_until_gone(str(submitted[0]["job_id"]).split("_")[0], 60)
    for job_dir, info in infos.items():
        how, sig = ACTIONS[_progress(jobs[job_dir])]
        log = _logs(job_dir, str(jobs[job_dir]["job_id"]))
        assert info.get("status") == "completed", (how, info, log[-2000:])
        assert info["distributed"]["slurm_restart_count"] == 1, how
        assert info["resumed_from"] and info["world_size"] == 2
        assert re.search(rf"stopped by SIG{sig} at step \d+", log), log[-2000:]
        steps = [e["step"] for e in read_metrics(job_dir) if "train/loss" in e]
        assert steps == list(range(5, STEPS + 1, 5)), f"{how}: steps lost or repeated"
        final = checkpoint.load(job_dir / "checkpoints" / "last.pt")["model"]
        assert all(torch.equal(final[k], expected[k]) for k in expected), f"{how}: drifted"
        stopped = re.search(rf"stopped by SIG{sig} at step \d+", log)
        print(  # the evidence, with pytest -s
            f"job {jobs[job_dir]['job_id']} ({' '.join(how)}): {stopped and stopped.group(0)}; "
            f"restart {info['distributed']['slurm_restart_count']}, resumed from "
            f"{info['resumed_from']}, {info['steps']} steps, weights equal to the reference"
        )

    # The cancelled job saved where it stopped and never came back (the queue is empty now).
    (cancelled,) = [d for d, rec in jobs.items() if _progress(rec) not in REQUEUED]
    info = json.loads((cancelled / "run.json").read_text())
    log = _logs(cancelled, str(jobs[cancelled]["job_id"]))
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", log)
    assert stopped, log[-2000:]
    assert info["status"] == "interrupted" and info["distributed"]["slurm_restart_count"] == 0
    saved = checkpoint.load(cancelled / "checkpoints" / "last.pt")
    step = saved["train_state"]["step"]
    assert step == int(stopped.group(1)) >= 30
    assert last_logged_step(cancelled / "metrics.jsonl") <= step < STEPS
    print(f"job {jobs[cancelled]['job_id']} (scancel): {stopped.group(0)}; stayed cancelled")


def _submit(tmp_path: Path, sweep_dir: Path, *overrides: str) -> list[dict]:
    """Submit the sweep of ``overrides`` into ``sweep_dir`` without waiting for its jobs;
    the launcher's record of each job (submitted.json)."""
    result = run_entry(
        "train.py",
        "-m",
        "hydra.launcher.wait=false",
        "hydra.launcher.timeout_min=15",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
        cwd=tmp_path,
        timeout=120,  # returns once submitted, long before the jobs end
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((sweep_dir / "submitted.json").read_text())


def _uninterrupted_weights(
    tmp_path: Path, corpus: Path, cache: Path, steps: int = STEPS
) -> dict[str, torch.Tensor]:
    """The final weights of one process over the jobs' global batch (batch 4 x 2 accumulation
    steps, one thread), run in ``tmp_path/reference``: what 2 DDP ranks of batch 4 end with."""
    ref_dir = tmp_path / "reference"
    ref = run_entry(
        "train.py",
        *_train_args(corpus, cache, steps),
        "train.grad_accum=2",
        f"hydra.run.dir={ref_dir}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        timeout=JOB_TIMEOUT_S,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    return checkpoint.load(ref_dir / "checkpoints" / "last.pt")["model"]


def _progress(rec: dict) -> str:
    (value,) = [o.split("=", 1)[1] for o in rec["overrides"] if o.startswith("train.progress=")]
    return value


def _logs(job_dir: Path, job_id: str) -> str:
    """The job's train.log and submitit's stdout/stderr files for it."""
    submitit = sorted(
        p
        for p in (job_dir.parent / ".submitit").rglob("*")
        if p.suffix in (".out", ".err") and job_id in p.name
    )
    files = [job_dir / "train.log", *submitit]
    return "\n".join(p.read_text(errors="replace") for p in files if p.is_file())


def _wait_for_end(job_dir: Path, deadline: float) -> dict:
    """run.json once it says completed or failed (it says interrupted between the signal and the
    restart), or whatever it says at the deadline."""
    info: dict = {}
    while time.monotonic() < deadline:
        run_json = job_dir / "run.json"
        if run_json.exists():
            info = json.loads(run_json.read_text())
            if info["status"] in ("completed", "failed"):
                break
        time.sleep(1)
    return info
