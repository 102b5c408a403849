"""Who am I in the job, and the process group that follows from it.

This is the only module that reads launcher environment variables (torchrun's and SLURM's), so
the same ``train.py`` runs as one process, under ``torchrun``, or under ``srun`` / submitit with
no code change. :func:`detect` turns the environment into a frozen :class:`Dist` value without
side effects; :func:`setup` picks the device, sizes the CPU thread pool and joins the process
group; the collective helpers below are no-ops for a single process, so callers never branch.

Detection rules, first match wins:

1. **torchrun** when ``RANK`` or ``WORLD_SIZE`` is set. It wins over SLURM because torchrun
   started inside an allocation owns the processes it spawned.
2. **SLURM** when this process is a task of an ``srun`` step: ``SLURM_STEP_ID`` (or
   ``SLURM_STEPID``) names a normal step, or, without a step id, ``SLURM_STEP_NUM_TASKS`` is set.
   The batch script itself (plain ``python train.py`` inside ``sbatch``), the extern step and
   salloc's interactive step also carry ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``, but only one
   process exists there; treating them as rank 0 of N would wait for peers that never come.
   Rank 0 runs on the first host of the step's node list; the port is
   ``PORT_BASE + (SLURM_JOB_ID + SLURM_STEP_ID) % PORT_SPAN``, so every task derives the same
   one without talking. ``MASTER_ADDR`` / ``MASTER_PORT``, when set, override both.
3. **single** process otherwise. ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT`` are still recorded.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

PORT_BASE = 20000
# Ports stay in [20000, 31999], below Linux's ephemeral range (32768+) so the rendezvous port
# cannot collide with a port the kernel handed to some outgoing connection on the master node.
PORT_SPAN = 12000
# Step ids at or above this are SLURM's pseudo steps (batch, extern, interactive, pending).
_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
_PSEUDO_STEP_NAMES = frozenset({"batch", "extern", "interactive"})
_MAX_HOSTS = 1_000_000
_TASKS_ITEM = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DIGITS = re.compile(r"[0-9]+")
_HOST = re.compile(r"(?:[^\[\],\s]|\[[^\[\]]*\])+")  # a name, brackets included
_HOSTLIST = re.compile(rf"{_HOST.pattern}(?:(?:\s*,\s*|\s+){_HOST.pattern})*")


class LaunchError(ValueError):
    """The launcher's variables or the device cannot make a job (printed as one line)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; passed around instead of global distributed state."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0
    cpus_per_task: int | None = None
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether collectives have peers to talk to."""
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for run.json, so a run records how it was launched."""
        return {
            "launcher": self.launcher,
            "world_size": self.world_size,
            "num_nodes": self.num_nodes,
            "ranks_per_node": self.local_world_size,
            "backend": self.backend,
            "device": self.device,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "slurm_job_id": self.slurm_job_id,
            "slurm_restart_count": self.slurm_restart_count,
        }


# --- SLURM list formats -------------------------------------------------------------------------


def parse_hostlist(spec: str) -> list[str]:
    """Expand a SLURM host list (``"gpu[01-03,7],cpu5"``) so rank 0's host can be named.

    Zero padding follows the lower bound (``[08-10]`` -> 08, 09, 10), several bracket groups in
    one name expand as a cartesian product (``n[1-2]-ib[3-4]``), and commas or whitespace outside
    brackets separate names. Anything else raises ValueError.
    """
    text = spec.strip()
    if not _HOSTLIST.fullmatch(text):
        raise ValueError(
            f"host list {spec!r} is malformed: expected names like gpu01 or gpu[01-03,7] "
            "separated by commas, with balanced and unnested brackets"
        )
    hosts: list[str] = []
    for name in _HOST.findall(text):
        hosts.extend(_expand_name(name, spec))
        if len(hosts) > _MAX_HOSTS:
            raise ValueError(f"host list {spec!r} expands to more than {_MAX_HOSTS} hosts")
    return hosts


def _expand_name(item: str, spec: str) -> list[str]:
    """Expand one name with zero or more bracket groups into its hosts."""
    parts = re.split(r"\[([^\]]*)\]", item)  # literal, group, literal, group, ..., literal
    literals, groups = parts[0::2], parts[1::2]
    choices = [_expand_group(group, spec) for group in groups]
    hosts = []
    for picked in itertools.product(*choices):
        pieces = [literals[0]]
        for number, literal in zip(picked, literals[1:], strict=True):
            pieces += [number, literal]
        hosts.append("".join(pieces))
    return hosts


def _expand_group(group: str, spec: str) -> list[str]:
    """Expand ``"01-03,7"`` into ``["01", "02", "03", "7"]``."""
    numbers: list[str] = []
    for entry in group.split(","):
        entry = entry.strip()
        low, sep, high = entry.partition("-")
        low, high = low.strip(), high.strip() if sep else low.strip()
        if not (_DIGITS.fullmatch(low) and _DIGITS.fullmatch(high)):
            raise ValueError(f"host list {spec!r}: range {entry!r} in [{group}] is not N or N-M")
        if int(high) < int(low):
            raise ValueError(f"host list {spec!r}: range {entry!r} runs backwards")
        if int(high) - int(low) >= _MAX_HOSTS:
            raise ValueError(f"host list {spec!r}: range {entry!r} is too large")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def parse_tasks_per_node(spec: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's ``"2(x3),1"`` into ``[2, 2, 2, 1]``: tasks on each node of the step."""
    counts: list[int] = []
    for item in spec.split(","):
        match = _TASKS_ITEM.fullmatch(item.strip())
        if not match:
            raise ValueError(f"{name}={spec!r} is not of the form '2(x3),1'")
        repeat = int(match.group(2) or 1)
        if repeat < 1:
            raise ValueError(f"{name}={spec!r} repeats a count zero times")
        counts.extend([int(match.group(1))] * repeat)
    return counts


# --- detection ----------------------------------------------------------------------------------


def detect(env: Mapping[str, str] | None = None) -> Dist:
    """Read the launcher's variables (``os.environ`` by default) into a Dist; no side effects.

    See the module docstring for the rules. Missing or malformed values raise ValueError naming
    the variable, so a broken launch fails at startup instead of hanging in the rendezvous.
    """
    env = os.environ if env is None else env
    try:
        if _has(env, "RANK") or _has(env, "WORLD_SIZE"):
            dist = _detect_torchrun(env)
        elif _in_srun_step(env):
            dist = _detect_slurm(env)
        else:
            dist = Dist()
        job_id = env.get("SLURM_JOB_ID", "").strip() or None
        restarts = _int(env, "SLURM_RESTART_COUNT", default=0)
    except LaunchError:
        raise
    except ValueError as err:
        raise LaunchError(f"{err} (launcher environment: torchrun or srun sets it)") from None
    return replace(dist, slurm_job_id=job_id, slurm_restart_count=restarts)


def slurm_job_running(dist: Dist) -> bool:
    """Whether SLURM still has this job RUNNING, asked of ``squeue`` after a SIGTERM.

    ``scancel``, ``scontrol requeue``, a time limit and preemption in REQUEUE mode put the job in
    COMPLETING before they signal it: SLURM has decided what follows. A SIGTERM that finds the
    job RUNNING was sent without ending it (``scancel --signal=TERM``, preemption's grace time),
    so the job must requeue itself.
    """
    if dist.slurm_job_id is None:
        return False
    out = squeue("--format=%T", f"--jobs={dist.slurm_job_id}")
    return out is not None and out.returncode == 0 and out.stdout.split() == ["RUNNING"]


def squeue(*args: str) -> subprocess.CompletedProcess[str] | None:
    """``squeue --noheader ARGS``, or None where there is no squeue or it does not answer."""
    if shutil.which("squeue") is None:
        return None
    try:
        return subprocess.run(
            ["squeue", "--noheader", *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _detect_torchrun(env: Mapping[str, str]) -> Dist:
    """torchrun exports every field directly; GROUP_* describe the nodes."""
    world_size = _int(env, "WORLD_SIZE", minimum=1)
    rank = _rank(env, "RANK", world_size, "WORLD_SIZE")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", minimum=1)
    local_rank = _rank(env, "LOCAL_RANK", local_world_size, "LOCAL_WORLD_SIZE")
    nodes_default = -(-world_size // local_world_size)
    alone = world_size == 1
    return Dist(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=_int(env, "GROUP_RANK", default=rank // local_world_size),
        num_nodes=_int(env, "GROUP_WORLD_SIZE", default=nodes_default, minimum=1),
        master_addr=_str(env, "MASTER_ADDR", default="127.0.0.1" if alone else None),
        master_port=_port(env, "MASTER_PORT", default=Dist.master_port if alone else None),
        launcher="torchrun",
    )


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """True for a task of an srun step; False for the batch script and other pseudo steps."""
    for name in ("SLURM_STEP_ID", "SLURM_STEPID"):
        value = env.get(name, "").strip()
        if value:
            if value.lower() in _PSEUDO_STEP_NAMES:
                return False
            return 0 <= _int(env, name, minimum=None) < _MAX_NORMAL_STEP_ID
    return _has(env, "SLURM_STEP_NUM_TASKS")


def _detect_slurm(env: Mapping[str, str]) -> Dist:
    """Step-level variables first: a step may use fewer tasks or nodes than the allocation."""
    size_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    world_size = _int(env, size_var, minimum=1)
    rank = _rank(env, "SLURM_PROCID", world_size, size_var)
    node_rank = _int(env, "SLURM_NODEID")
    local_world_size = _slurm_local_world_size(env, node_rank, world_size)
    local_rank = _rank(env, "SLURM_LOCALID", local_world_size, "the tasks on this node")
    hosts = _slurm_hosts(env, required=world_size > 1)
    nodes_var = _first(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    cpus = _int(env, "SLURM_CPUS_PER_TASK", default=0, minimum=1) or None
    return Dist(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=_int(env, nodes_var, default=max(1, len(hosts)), minimum=1),
        master_addr=_str(env, "MASTER_ADDR", default=hosts[0] if hosts else "127.0.0.1"),
        master_port=_slurm_port(env, required=world_size > 1),
        launcher="slurm",
        cpus_per_task=cpus,
    )


def _slurm_local_world_size(env: Mapping[str, str], node_rank: int, world_size: int) -> int:
    """Tasks on this node, from the per-node list when there is one (it may be uneven)."""
    if world_size == 1:
        return 1
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if _has(env, name):
            counts = parse_tasks_per_node(env[name], name)
            if node_rank >= len(counts):
                raise ValueError(
                    f"SLURM_NODEID={node_rank} but {name}={env[name]!r} "
                    f"lists only {len(counts)} nodes"
                )
            return counts[node_rank]
    if _has(env, "SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    raise ValueError(
        "SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE and SLURM_NTASKS_PER_NODE "
        "are all unset: cannot tell how many tasks share this node"
    )


def _slurm_hosts(env: Mapping[str, str], required: bool) -> list[str]:
    """The step's hosts in SLURM's order; the first one runs rank 0."""
    names = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    name = _first(env, *names)
    if not _has(env, name):
        if required and not _has(env, "MASTER_ADDR"):
            raise ValueError(
                f"none of {', '.join(names)} is set: cannot tell which host runs rank 0"
            )
        return []
    try:
        return parse_hostlist(env[name])
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _slurm_port(env: Mapping[str, str], required: bool) -> int:
    """MASTER_PORT if set, else a port every task derives alike from the job and step ids."""
    if _has(env, "MASTER_PORT"):
        return _port(env, "MASTER_PORT")
    if not _has(env, "SLURM_JOB_ID"):
        if required:
            raise ValueError(
                "SLURM_JOB_ID is not set and neither is MASTER_PORT: cannot pick a rendezvous port"
            )
        return Dist.master_port
    # The step id keeps two concurrent steps of one job off each other's port.
    step = _int(env, "SLURM_STEP_ID", default=0)
    return PORT_BASE + (_int(env, "SLURM_JOB_ID") + step) % PORT_SPAN


# --- process group ------------------------------------------------------------------------------


def setup(
    device: str = "auto",
    backend: str = "auto",
    timeout_s: int = 300,
    env: Mapping[str, str] | None = None,
) -> Dist:
    """Detect the job, pick this rank's device and threads, and join the process group.

    ``device``: "auto" (cuda when available), "cpu", "cuda" (this rank's GPU) or "cuda:N".
    ``backend``: "auto" (nccl on cuda, gloo on cpu), "nccl" or "gloo"; unused for one process.
    ``timeout_s`` bounds the rendezvous and every collective, so a lost peer ends in an error.
    Calling it again in a process that already joined the group does not join twice.
    """
    env = os.environ if env is None else env
    dist = detect(env)
    device = _resolve_device(device, dist.local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        _set_cpu_threads(dist, env)
    if not dist.is_distributed:
        return replace(dist, device=device, backend=None)
    backend = _resolve_backend(backend, device)
    if not tdist.is_initialized():
        _init_process_group(dist, backend, device, timeout_s)
    return replace(dist, device=device, backend=backend)


def _resolve_device(device: str, local_rank: int) -> str:
    """One GPU per local rank; with one visible GPU each task was already given its own."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or device.startswith("cuda:"):
        return device
    if device != "cuda":
        raise LaunchError(f"device={device!r} must be one of auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count()
    if count == 0:
        raise LaunchError(
            "train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto"
        )
    if count == 1:  # e.g. SLURM --gpus-per-task=1: each task sees only its own GPU
        return "cuda:0"
    if local_rank >= count:
        raise LaunchError(f"local rank {local_rank} has no GPU: only {count} are visible")
    return f"cuda:{local_rank}"


def _resolve_backend(backend: str, device: str) -> str:
    if backend == "auto":
        return "nccl" if device.startswith("cuda") else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} must be one of auto, nccl, gloo")
    return backend


def cpu_threads(dist: Dist, cores: int, default: int) -> int:
    """Intra-op threads for one CPU rank, so the node's ranks do not oversubscribe its cores.

    ``cores`` is this process's CPU affinity. Under srun with ``--cpus-per-task`` the task's
    share is known (and the affinity may already be just that share); otherwise the ranks of
    the node split the affinity. ``default`` (torch's own choice, physical cores) caps the
    result so hyper-threads are not counted as cores.
    """
    if dist.launcher == "slurm" and dist.cpus_per_task:
        share = min(cores, dist.cpus_per_task)
    else:
        share = cores // dist.local_world_size
    return max(1, min(default, share))


def _set_cpu_threads(dist: Dist, env: Mapping[str, str]) -> None:
    """Apply :func:`cpu_threads` unless the user chose with OMP_NUM_THREADS."""
    if _has(env, "OMP_NUM_THREADS"):
        return
    torch.set_num_threads(cpu_threads(dist, usable_cores(), torch.get_num_threads()))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a SLURM or taskset share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def _init_process_group(dist: Dist, backend: str, device: str, timeout_s: int) -> None:
    """Rendezvous over TCP at the master; NCCL is bound to this rank's GPU where torch allows."""
    host = f"[{dist.master_addr}]" if ":" in dist.master_addr else dist.master_addr  # IPv6
    kwargs: dict[str, Any] = {}
    if backend == "nccl" and "device_id" in inspect.signature(tdist.init_process_group).parameters:
        kwargs["device_id"] = torch.device(device)
    tdist.init_process_group(
        backend,
        init_method=f"tcp://{host}:{dist.master_port}",
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


def teardown(dist: Dist) -> None:
    """Leave the process group; safe to call twice or when it was never joined.

    The trainer's reference cycles keep DDP's reducer, which holds the group and gloo's worker
    threads, alive until the interpreter exits; destroyed there, 1 run in 3 of two CPU ranks
    aborted with "terminate called without an active exception". Collecting them first frees
    the reducer while the group still exists (0 aborts in 40 runs).
    """
    if tdist.is_available() and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    """Wait for every rank; a no-op for one process."""
    if dist.is_distributed:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it."""
    if dist.is_distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Average a floating tensor over ranks in place (SUM then divide: gloo has no AVG)."""
    if dist.is_distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(dist.world_size)
    return t


def all_reduce_max(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks, in place."""
    if dist.is_distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def broadcast_object(obj: Any, dist: Dist, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. the run folder rank 0 chose)."""
    if not dist.is_distributed:
        return obj
    payload = [obj if dist.rank == src else None]
    device = torch.device(dist.device) if dist.backend == "nccl" else None
    tdist.broadcast_object_list(payload, src=src, device=device)
    return payload[0]


def gather_objects(obj: Any, dist: Dist) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not dist.is_distributed:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


# --- small readers ------------------------------------------------------------------------------


def _has(env: Mapping[str, str], name: str) -> bool:
    return bool(env.get(name, "").strip())


def _first(env: Mapping[str, str], *names: str) -> str:
    """The first of ``names`` that is set, else the first name (so errors name the main one)."""
    return next((name for name in names if _has(env, name)), names[0])


def _str(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    if _has(env, name):
        return env[name].strip()
    if default is None:
        raise ValueError(f"{name} is not set")
    return default


def _int(
    env: Mapping[str, str], name: str, default: int | None = None, minimum: int | None = 0
) -> int:
    """An integer variable; ``default=None`` makes it required."""
    if not _has(env, name):
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    text = env[name].strip()
    if not _INTEGER.fullmatch(text):  # int() alone also takes "12_345" and non-ASCII digits
        raise ValueError(f"{name}={env[name]!r} is not an integer")
    value = int(text)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _rank(env: Mapping[str, str], name: str, size: int, size_name: str) -> int:
    value = _int(env, name)
    if value >= size:
        raise ValueError(f"{name}={value} must be below {size_name}={size}")
    return value


def _port(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = _int(env, name, default=default, minimum=1)
    if value > 65535:
        raise ValueError(f"{name}={value} is not a TCP port (1-65535)")
    return value
