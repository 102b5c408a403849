"""The local SLURM cluster (scripts/slurm_cluster.sh): required in CI, skipped elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

UP_STATES = ("idle", "mixed", "allocated", "completing")


def cluster_problem(nodes: int = 1) -> str | None:
    """Why jobs of ``nodes`` nodes cannot run on a SLURM cluster from here; None when they can."""
    if shutil.which("sbatch") is None:
        return "sbatch not found; install SLURM with: sudo scripts/slurm_cluster.sh install"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s; restart: sudo scripts/slurm_cluster.sh restart"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()}); start it: sudo scripts/slurm_cluster.sh start"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    up = [n for n, s in states.items() if s.rstrip("*~#") in UP_STATES]
    if not up:
        return f"no SLURM node is up (sinfo: {states or 'none'}); scripts/slurm_cluster.sh status"
    if len(up) < nodes:
        return (
            f"{len(up)} SLURM node(s) up, {nodes} needed (sinfo: {states}); start the local "
            f"cluster with that many: sudo SLURM_NODES={nodes} scripts/slurm_cluster.sh restart"
        )
    return None


def require_slurm_cluster(who: str = "the SLURM tests", nodes: int = 1) -> None:
    """Fails in CI when the cluster is missing (it must be there); skips elsewhere, saying why."""
    problem = cluster_problem(nodes)
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{who} need the local cluster in CI: {problem}")
    pytest.skip(f"no SLURM cluster: {problem}")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    require_slurm_cluster()
