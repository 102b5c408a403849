"""The local SLURM cluster (scripts/slurm_cluster.sh): required in CI, skipped elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def cluster_problem() -> str | None:
    """Why jobs cannot run on a SLURM cluster from here, or None when they can."""
    if shutil.which("sbatch") is None:
        return "sbatch not found; install SLURM with: sudo scripts/slurm_cluster.sh install"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s; restart: sudo scripts/slurm_cluster.sh restart"
    if out.returncode != 0:
        return f"sinfo failed ({out.stderr.strip()}); start it: sudo scripts/slurm_cluster.sh start"
    states = out.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo: {states or 'none'}); scripts/slurm_cluster.sh status"
    return None


def require_slurm_cluster(who: str = "the SLURM tests") -> None:
    """Fails in CI when the cluster is missing (it must be there); skips elsewhere, saying why."""
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{who} need the local cluster in CI: {problem}")
    pytest.skip(f"no SLURM cluster: {problem}")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    require_slurm_cluster()
