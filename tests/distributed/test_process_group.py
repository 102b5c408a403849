"""Two real gloo processes on localhost, launched the ways users launch them.

One launch is real ``torchrun``; the other fabricates what ``srun -n 2`` exports (no SLURM
here). The same worker runs ``detect`` -> ``setup`` -> collectives -> ``teardown`` end to end.
Every wait is bounded: the process group times out after 15 s and the test kills the workers
after 30 s, so a broken rendezvous fails instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
KILL_AFTER_S = 30
LAUNCHER_VARS = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
}

WORKER = """
import json, os, sys
import torch
from minigpt import distributed

default_threads = torch.get_num_threads()
dist = distributed.setup(device="cpu", timeout_s=15)
try:
    mean = distributed.all_reduce_mean(torch.tensor([dist.rank + 1.0, 10.0 * dist.rank]), dist)
    total = distributed.all_reduce_sum(torch.tensor([dist.rank + 1.0]), dist)
    peak = distributed.all_reduce_max(torch.tensor([float(dist.rank)]), dist)
    chosen = {"run_dir": "/runs/chosen-by-rank-0"} if dist.is_main else {"run_dir": "wrong"}
    shared = distributed.broadcast_object(chosen, dist)
    distributed.barrier(dist)
    result = {
        "dist": dist.describe() | {"rank": dist.rank, "local_rank": dist.local_rank},
        "mean": mean.tolist(), "sum": total.tolist(), "max": peak.tolist(), "shared": shared,
        "threads": torch.get_num_threads(), "default_threads": default_threads,
        "cores": len(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS"),
    }
finally:
    distributed.teardown(dist)
    distributed.teardown(dist)
result["initialized_after_teardown"] = torch.distributed.is_initialized()
with open(f"{sys.argv[1]}/rank{dist.rank}.json", "w") as f:
    json.dump(result, f)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """This shell's environment without any launcher's variables, plus the repo on the path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_VARS and not key.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _srun_env(rank: int, port: int) -> dict[str, str]:
    """What `srun -n 2` exports on one node; MASTER_PORT overrides the job-derived port."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(WORLD),
        "SLURM_STEP_NUM_TASKS": str(WORLD),
        "SLURM_STEP_TASKS_PER_NODE": str(WORLD),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_STEP_NODELIST": "localhost",
        "MASTER_PORT": str(port),
    }


def _run_all(commands: list[tuple[list[str], dict[str, str]]]) -> None:
    """Start every process, wait with one shared deadline, kill all on timeout or failure."""
    procs = [
        subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for cmd, env in commands
    ]
    deadline = time.monotonic() + KILL_AFTER_S
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers still running after {KILL_AFTER_S} s: the rendezvous hung")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out


def _launch_with_fabricated_env(tmp_path: Path, make_env) -> None:
    script, port = tmp_path / "worker.py", _free_port()
    script.write_text(WORKER)
    cmd = [sys.executable, str(script), str(tmp_path)]
    _run_all([(cmd, _clean_env() | make_env(rank, port)) for rank in range(WORLD)])


def _launch_with_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, f"--nproc-per-node={WORLD}", str(script), str(tmp_path)]
    _run_all([(cmd, _clean_env())])


LAUNCHES = {
    "srun-variables": lambda tmp_path: _launch_with_fabricated_env(tmp_path, _srun_env),
    "torchrun-cli": _launch_with_torchrun,
}
LAUNCHER_NAME = {"srun-variables": "slurm", "torchrun-cli": "torchrun"}


def _expected_threads(launch: str, result: dict) -> int:
    """torchrun exports OMP_NUM_THREADS=1 for several ranks, and a user's choice is kept; under
    srun the node's two ranks split the cores, capped by torch's own default (physical cores)."""
    if launch == "torchrun-cli":
        assert result["omp"] == "1"
        return 1
    assert result["omp"] is None
    return max(1, min(result["default_threads"], result["cores"] // WORLD))


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_two_gloo_ranks_agree_on_collectives_and_shared_objects(
    launch: str, tmp_path: Path
) -> None:
    LAUNCHES[launch](tmp_path)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        assert result["dist"]["rank"] == rank and result["dist"]["local_rank"] == rank
        assert result["dist"]["launcher"] == LAUNCHER_NAME[launch]
        assert result["dist"]["world_size"] == WORLD and result["dist"]["ranks_per_node"] == WORLD
        assert (result["dist"]["backend"], result["dist"]["device"]) == ("gloo", "cpu")
        assert result["mean"] == [1.5, 5.0]  # mean of [1, 0] and [2, 10]
        assert result["sum"] == [3.0] and result["max"] == [1.0]
        assert result["shared"] == {"run_dir": "/runs/chosen-by-rank-0"}
        assert result["threads"] == _expected_threads(launch, result)
        assert result["initialized_after_teardown"] is False
