"""Jobs of 2 nodes x 1 task on the multi-node cluster of scripts/slurm_cluster.sh (SLURM_NODES=2,
its default): DDP, FSDP, and an FSDP job preempted and requeued (its sharded checkpoint saved
on the way out and resumed from), from one sweep.

Each ends with the weights of one process over the same global batch (batch 4 x 2 accumulated
micro-batches): bit-identical for DDP (rank r's micro-batch is accumulation step r's, and a
gradient halved then summed equals one summed then halved: halving is exact), within float32
rounding for FSDP (atol 1e-5, as over 2 tasks of one node, see test_slurm_sweeps.py; 1.9e-6
measured). The preempted FSDP job ends bit-identical to the uninterrupted one: a resume on the
same two ranks reduces in the same order.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from tests.conftest import last_logged_step, read_metrics, write_alphabet_corpus
from tests.slurm.conftest import require_slurm_cluster
from tests.slurm.test_slurm_requeue import (
    _logs,
    _submit,
    _train_args,
    _uninterrupted_weights,
    _wait_for_end,
)
from tests.slurm.test_slurm_sweeps import JOB_TIMEOUT_S, _wait_until_gone

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

STEPS = 300  # a few seconds of training per job: a window to requeue one (at step 30)
# One job per value; the second fsdp job is the one preempted.
PARALLEL = ("ddp", "fsdp", "fsdp")
PREEMPTED = 2


@pytest.fixture(scope="module")
def two_node_jobs(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sweep's job folders, run.json records and logs once every job ended, and the
    reference's final weights."""
    require_slurm_cluster("the multi-node tests", nodes=2)
    tmp_path = tmp_path_factory.mktemp("multinode")
    corpus, cache = write_alphabet_corpus(tmp_path / "corpus"), tmp_path / "cache"
    expected = _uninterrupted_weights(tmp_path, corpus, cache, STEPS)

    sweep_dir = tmp_path / "multirun"
    submitted = _submit(
        tmp_path,
        sweep_dir,
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        f"train.parallel={','.join(PARALLEL)}",
        *_train_args(corpus, cache, STEPS),
    )
    assert len(submitted) == len(PARALLEL)
    jobs = [sweep_dir / str(rec["job"]) for rec in submitted]

    deadline = time.monotonic() + JOB_TIMEOUT_S
    preempted_id = str(submitted[PREEMPTED]["job_id"])
    while last_logged_step(jobs[PREEMPTED] / "metrics.jsonl") < 30:
        assert time.monotonic() < deadline, "the job to preempt never started training"
        time.sleep(0.2)
    # What preemption in REQUEUE mode does: SIGTERM to every task, and SLURM requeues the job.
    done = subprocess.run(
        ["scontrol", "requeue", preempted_id], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr

    infos = [_wait_for_end(job, deadline) for job in jobs]
    _wait_until_gone(preempted_id.split("_")[0], 60)
    logs = [_logs(job, str(rec["job_id"])) for job, rec in zip(jobs, submitted, strict=True)]
    return {"jobs": jobs, "infos": infos, "logs": logs, "expected": expected}


def _assert_two_node_job(job: Path, info: dict, log: str) -> dict[str, torch.Tensor]:
    """Checks a job ran 2 ranks on 2 of the cluster's nodes; its final weights."""
    assert info.get("status") == "completed", (info, log[-2000:])
    dist = info["distributed"]
    assert info["world_size"] == 2 and dist["launcher"] == "slurm"
    assert dist["num_nodes"] == 2 and dist["ranks_per_node"] == 1, dist
    assert dist["master_addr"] in _cluster_nodes(), dist  # rank 0's node, by its SLURM name
    steps = [e["step"] for e in read_metrics(job) if "train/loss" in e]
    assert steps == list(range(5, STEPS + 1, 5)), "steps lost or repeated"
    return checkpoint.load(job / "checkpoints" / "last.pt")["model"]


def _cluster_nodes() -> list[str]:
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.split()


def test_a_two_node_ddp_job_ends_with_the_weights_of_one_process(two_node_jobs: dict) -> None:
    job, info, log = (two_node_jobs[k][0] for k in ("jobs", "infos", "logs"))
    assert info["config"]["train"]["parallel"] == "ddp"
    final = _assert_two_node_job(job, info, log)
    expected = two_node_jobs["expected"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_a_two_node_fsdp_job_ends_with_the_weights_of_one_process(two_node_jobs: dict) -> None:
    job, info, log = (two_node_jobs[k][1] for k in ("jobs", "infos", "logs"))
    assert info["config"]["train"]["parallel"] == "fsdp"
    final = _assert_two_node_job(job, info, log)
    for key, value in two_node_jobs["expected"].items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-5, msg=key)


def test_a_preempted_two_node_job_is_requeued_and_ends_with_uninterrupted_weights(
    two_node_jobs: dict,
) -> None:
    job, info, log = (two_node_jobs[k][PREEMPTED] for k in ("jobs", "infos", "logs"))
    final = _assert_two_node_job(job, info, log)
    assert info["distributed"]["slurm_restart_count"] == 1 and info["resumed_from"]
    assert re.search(r"stopped by SIGTERM at step \d+", log), log[-2000:]
    assert info["config"]["train"]["parallel"] == "fsdp"
    assert checkpoint.SHARDS in checkpoint.load(job / "checkpoints" / "last.pt", read="meta")
    straight = checkpoint.load(two_node_jobs["jobs"][1] / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], straight[k]) for k in straight), "resume drifted"
