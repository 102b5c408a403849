"""Shared fixtures: tiny corpora in tmp_path and entry points run as users run them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SUITE = ROOT / "tests" / "gpu"
ALPHABET_LINE = "abcdefghijklmnopqrstuvwxyz\n"


@dataclass
class Result:
    """A finished entry-point process."""

    returncode: int
    stdout: str
    stderr: str


# Variables of an enclosing launcher (a CI job inside SLURM, say) that must not leak into the
# processes a test starts: each test decides how its processes are launched.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment, offline, without SLURM or torchrun variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in LAUNCHER_VARS
    }
    return {
        **_worker_threads(),
        **env,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def _worker_threads() -> dict[str, str]:
    """Under pytest-xdist, the processes a test starts get their worker's share of the cores
    (OMP_NUM_THREADS, which minigpt honours): two workers each starting a torch process with every
    core's thread would oversubscribe the machine, and OpenMP's spinning threads then crawl."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return {}
    from minigpt.distributed import usable_cores

    return {"OMP_NUM_THREADS": str(max(1, usable_cores() // workers))}


def run_entry(
    script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> Result:
    """Run ``python <script> args...`` from the repository, offline, as a user would."""
    return run_command([sys.executable, str(ROOT / script), *args], cwd, env, timeout)


def run_torchrun(
    nproc: int, script: str | Path, *args: str, cwd: Path, timeout: float = 300
) -> Result:
    """Run ``torchrun --nproc_per_node N script args...`` on localhost with a free port."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    launcher += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return run_command([*launcher, str(ROOT / script), *args], cwd, None, timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> Result:
    """Run ``argv`` with a clean, offline environment; a hang fails at ``timeout``."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


class _Payload:
    """Unpickled, it would run ``touch <marker>``: what a malicious checkpoint could hide."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def save_payload_checkpoint(path: Path, marker: Path, key: str) -> None:
    """A file shaped like a minigpt checkpoint whose ``key`` runs a command if unpickled."""
    import torch

    torch.save({"format": "minigpt", "version": 1, key: _Payload(marker)}, path)


def read_metrics(run_dir: Path) -> list[dict]:
    """The events of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def alphabet_corpus(tmp_path: Path) -> Path:
    """20 small files of the alphabet, one per line: trivially learnable, easy to recognise."""
    return write_alphabet_corpus(tmp_path / "corpus")


def write_alphabet_corpus(folder: Path) -> Path:
    """The files of ``alphabet_corpus`` in a new ``folder`` (for fixtures of a wider scope)."""
    folder.mkdir()
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(ALPHABET_LINE * 40)
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def last_logged_step(metrics: Path) -> int:
    """The step of the last complete event of a metrics.jsonl being written (-1: none yet)."""
    steps = [-1]
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                continue  # the line being written right now
    return max(steps)


def text_data_args(corpus: Path, cache: Path) -> list[str]:
    """The overrides that train on the text files of ``corpus`` with its own token cache."""
    paths = f"data.paths=[{corpus}/*.txt]"
    return ["data=text", paths, f"data.cache_dir={cache}", "data.num_proc=1"]


def tiny_train_args(corpus: Path, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """The overrides of a few-second training run on ``corpus``."""
    return [
        "model=tiny",
        *text_data_args(corpus, cache),
        f"hydra.run.dir={run_dir}",
        "train.batch_size=8",
        "train.eval_steps=4",
        "train.log_every=5",
        "train.device=cpu",
        "optimizer.warmup_steps=10",
        *extra,
    ]


@pytest.fixture(scope="session", autouse=True)
def _share_of_the_cores() -> None:
    """Torch in a pytest-xdist worker uses the same share of the cores as the processes its tests
    start (see clean_env), so results computed here and there use the same thread count."""
    threads = _worker_threads().get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/gpu is collected only when asked for: by its path (``pytest tests/gpu``, one of its
    files or tests) or by ``-m gpu``. CI and ``make test`` have no GPU, and there a test must
    never skip silently, so they do not see the GPU suite at all."""
    inside = collection_path == GPU_SUITE or GPU_SUITE in collection_path.parents
    if inside and not _gpu_suite_asked_for(config):
        return True
    return None


def _gpu_suite_asked_for(config: pytest.Config) -> bool:
    # -m gpu, -m "gpu and not slow", -m "slow or gpu"; not -m "not gpu".
    if re.search(r"(?<!not )\bgpu\b", config.option.markexpr or ""):
        return True
    start = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (start / arg.split("::")[0]).resolve()
        if path == GPU_SUITE or GPU_SUITE in path.parents:
            return True
    return False


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``-n 2 --dist loadgroup``, as ``make test`` runs), a file's tests share
    one worker, so its module fixtures are built once; the files of tests/slurm share one too,
    because the local test cluster has few CPUs (jobs queue) and their waits would otherwise
    overlap. xdist 3.8's own ``loadgroup`` reads groups from nodeids it renames, which pytest 9
    no longer uses: every test was its own group, and module fixtures were built on both workers
    (measured: the two-rank spawns of test_parallel and the SLURM jobs of the multi-node test,
    twice each)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "tests/slurm" if path.startswith("tests/slurm/") else path

    return ByFile(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest groups first (the SLURM jobs, then the README's commands): handed out last,
    one of them would run alone at the end while the other worker idles."""
    items.sort(key=lambda item: _start_rank(item))


def _start_rank(item: pytest.Item) -> int:
    """Also: a test that needs the spawned two-rank run goes after the other tests. The mutation
    run (make mutation) orders a mutant's tests by their recorded call time, which misses a
    module fixture's set-up, and stops at the first failure: in front, the 10-20 s spawn was paid
    by every mutant of the trainer, including those a one-rank test kills in a second."""
    if item.get_closest_marker("slurm"):
        return 0
    if item.nodeid.startswith("tests/docs/"):
        return 1
    return 3 if "two_rank_runs" in getattr(item, "fixturenames", ()) else 2


def kill_when(
    argv: list[str], cwd: Path, ready: Callable[[], bool], env: dict[str, str] | None = None
) -> None:
    """Start ``argv`` and SIGKILL it and every process under it (torchrun's ranks included) once
    ``ready()``: no handler runs, nothing is saved on the way out.

    torchrun starts each rank in a session of its own, so killing torchrun's process group
    leaves the ranks running: they went on training in the folder while the test resumed it.
    """
    proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(env), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.02)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, from /proc (children first found, grandchildren after)."""
    parents = {}
    for proc_stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(proc_stat.read_text().rsplit(")", 1)[1].split()[1])
            parents[int(proc_stat.parent.name)] = ppid
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
