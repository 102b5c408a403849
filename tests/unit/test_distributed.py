"""Launcher detection and SLURM list parsing, driven by fabricated environments."""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType

import pytest
import torch

from minigpt import distributed
from minigpt.distributed import PORT_BASE, PORT_SPAN, Dist, detect, parse_hostlist

# ------------------------------------------------------------------------------------------------
# parse_hostlist


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03,7],cpu5", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("n[001-2]", ["n001", "n002"]),
        ("n[1-2]-ib[3-4]", ["n1-ib3", "n1-ib4", "n2-ib3", "n2-ib4"]),
        ("a[1,3],b[2-3],c", ["a1", "a3", "b2", "b3", "c"]),
        ("[1-2]", ["1", "2"]),
        ("  gpu[01 - 02] , cpu5  ", ["gpu01", "gpu02", "cpu5"]),
        ("a b\tc", ["a", "b", "c"]),
        ("host-1.example.org", ["host-1.example.org"]),
        ("localhost", ["localhost"]),
    ],
)
def test_parse_hostlist_expands_slurm_notation(spec: str, hosts: list[str]) -> None:
    assert parse_hostlist(spec) == hosts


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "malformed"),
        ("   ", "malformed"),
        (",gpu1", "malformed"),
        ("gpu1,,gpu2", "malformed"),
        ("gpu1,", "malformed"),
        ("gpu[01-03", "malformed"),
        ("gpu01-03]", "malformed"),
        ("gpu[[1-2]]", "malformed"),
        ("gpu[]", "not N or N-M"),
        ("gpu[a-b]", "not N or N-M"),
        ("gpu[1-]", "not N or N-M"),
        ("gpu[1-2-3]", "not N or N-M"),
        ("gpu[1,,2]", "not N or N-M"),
        ("gpu[5-2]", "runs backwards"),
        ("gpu[0-99999999]", "too large"),
    ],
)
def test_parse_hostlist_rejects_malformed_lists(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_hostlist(spec)


@pytest.mark.parametrize(
    ("spec", "counts"),
    [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3]), (" 2(x2) ", [2, 2])],
)
def test_parse_tasks_per_node_expands_repeats(spec: str, counts: list[int]) -> None:
    assert distributed.parse_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "2(x)", "x2", "2(3)", "2(x0)", "2,,1", "-1"])
def test_parse_tasks_per_node_rejects_malformed_values_naming_the_variable(spec: str) -> None:
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE"):
        distributed.parse_tasks_per_node(spec, "SLURM_STEP_TASKS_PER_NODE")


# ------------------------------------------------------------------------------------------------
# detect: fabricated environments

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29400",
}

# Rank 3 of an `srun` step with 2 tasks on each of 2 nodes, as SLURM exports it.
SRUN = {
    "SLURM_JOB_ID": "12345",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
}

# The batch script's own environment: `python train.py` written straight into an sbatch script.
BATCH = {
    "SLURM_JOB_ID": "12345",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
}

SRUN_PORT = PORT_BASE + 12345 % PORT_SPAN


def test_no_launcher_variables_means_one_process() -> None:
    assert detect({}) == Dist()
    assert detect({}).launcher == "single"


def test_torchrun_variables_are_read_directly() -> None:
    dist = detect(TORCHRUN)
    assert dist == Dist(
        rank=3,
        local_rank=1,
        world_size=8,
        local_world_size=2,
        node_rank=1,
        num_nodes=4,
        master_addr="node0",
        master_port=29400,
        launcher="torchrun",
    )
    assert dist.is_distributed and not dist.is_main


def test_srun_step_on_two_nodes_finds_its_place_and_the_master() -> None:
    dist = detect(SRUN)
    assert dist == Dist(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        node_rank=1,
        num_nodes=2,
        master_addr="gpu01",
        master_port=SRUN_PORT,
        launcher="slurm",
        slurm_job_id="12345",
    )


def test_every_task_of_a_job_derives_the_same_rendezvous() -> None:
    rank0 = {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    first, last = detect(rank0), detect(SRUN)
    assert (first.master_addr, first.master_port) == (last.master_addr, last.master_port)
    assert 20000 <= first.master_port < 32768  # below Linux's ephemeral port range
    other_job = detect({**SRUN, "SLURM_JOB_ID": "12346"})
    assert other_job.master_port != first.master_port


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"MASTER_PORT": "23456"}, "master_port", 23456),
        ({"MASTER_ADDR": "10.0.0.7"}, "master_addr", "10.0.0.7"),
        ({"SLURM_STEP_ID": "1"}, "master_port", SRUN_PORT + 1),
        ({"SLURM_RESTART_COUNT": "2"}, "slurm_restart_count", 2),
        ({"SLURM_CPUS_PER_TASK": "8"}, "cpus_per_task", 8),
        ({"SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_LOCALID": "0"}, "local_world_size", 1),
        ({"SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS_PER_NODE": "2"}, "local_world_size", 2),
        ({"SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "cpu[7-8]"}, "master_addr", "cpu7"),
        ({"SLURM_STEP_NODELIST": "gpu[05-06]"}, "master_addr", "gpu05"),
        ({"SLURM_JOB_NUM_NODES": ""}, "num_nodes", 2),  # counted from the host list
    ],
)
def test_srun_step_details(overrides: dict[str, str], field: str, value: object) -> None:
    assert getattr(detect({**SRUN, **overrides}), field) == value


def test_step_size_wins_over_allocation_size() -> None:
    """`srun -n 2` inside a 4-task allocation: the step is the world, not the allocation."""
    env = {**SRUN, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    env |= {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_LOCALID": "0"}
    dist = detect(env)
    assert (dist.world_size, dist.rank, dist.local_world_size) == (2, 1, 1)


def test_single_task_srun_step_is_not_distributed() -> None:
    env = {"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    dist = detect(env | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert dist.launcher == "slurm" and not dist.is_distributed


@pytest.mark.parametrize(
    "step",
    [
        {},  # no step variables at all: the batch script
        {"SLURM_STEP_ID": "4294967291"},  # SLURM_BATCH_SCRIPT
        {"SLURM_STEPID": "4294967292"},  # the extern step
        {"SLURM_STEP_ID": "-5"},  # the batch id printed signed by older slurmstepd
        {"SLURM_STEP_ID": "batch"},
        {"SLURM_STEP_ID": "4294967290", "SLURM_STEP_NUM_TASKS": "1"},  # salloc interactive step
    ],
    ids=["no-step-vars", "batch-id", "extern-id", "signed-batch-id", "batch-name", "interactive"],
)
def test_plain_python_in_a_batch_script_runs_as_one_process(step: dict[str, str]) -> None:
    dist = detect({**BATCH, **step})
    assert (dist.launcher, dist.world_size, dist.rank) == ("single", 1, 0)
    assert dist.slurm_job_id == "12345"


def test_torchrun_inside_a_slurm_allocation_wins() -> None:
    dist = detect({**SRUN, **TORCHRUN, "SLURM_RESTART_COUNT": "1"})
    assert (dist.launcher, dist.world_size, dist.rank) == ("torchrun", 8, 3)
    assert (dist.master_addr, dist.master_port) == ("node0", 29400)
    assert (dist.slurm_job_id, dist.slurm_restart_count) == ("12345", 1)


def test_one_process_torchrun_needs_no_master() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    dist = detect(env)
    assert dist.launcher == "torchrun" and not dist.is_distributed and dist.is_main


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in names}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({**SRUN, "SLURM_PROCID": "abc"}, "SLURM_PROCID"),
        ({**SRUN, "SLURM_PROCID": "4"}, "SLURM_PROCID"),
        ({**SRUN, "SLURM_PROCID": "-1"}, "SLURM_PROCID"),
        (_without(SRUN, "SLURM_PROCID"), "SLURM_PROCID"),
        (_without(SRUN, "SLURM_LOCALID"), "SLURM_LOCALID"),
        ({**SRUN, "SLURM_LOCALID": "2"}, "SLURM_LOCALID"),
        (_without(SRUN, "SLURM_NODEID"), "SLURM_NODEID"),
        ({**SRUN, "SLURM_NODEID": "2"}, "SLURM_NODEID"),
        ({**SRUN, "SLURM_STEP_NUM_TASKS": "four"}, "SLURM_STEP_NUM_TASKS"),
        ({**SRUN, "SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS"),
        ({**SRUN, "SLURM_TASKS_PER_NODE": "2(x"}, "SLURM_TASKS_PER_NODE"),
        (_without(SRUN, "SLURM_TASKS_PER_NODE"), "SLURM_TASKS_PER_NODE"),
        ({**SRUN, "SLURM_JOB_NODELIST": "gpu[01-"}, "SLURM_JOB_NODELIST"),
        (_without(SRUN, "SLURM_JOB_NODELIST"), "SLURM_JOB_NODELIST"),
        (_without(SRUN, "SLURM_JOB_ID"), "SLURM_JOB_ID"),
        ({**SRUN, "SLURM_JOB_ID": "12345_7"}, "SLURM_JOB_ID"),
        ({**SRUN, "SLURM_STEP_ID": "zero"}, "SLURM_STEP_ID"),
        ({**SRUN, "SLURM_RESTART_COUNT": "once"}, "SLURM_RESTART_COUNT"),
        ({**SRUN, "SLURM_CPUS_PER_TASK": "0"}, "SLURM_CPUS_PER_TASK"),
        ({**SRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
        ({**TORCHRUN, "RANK": "3.0"}, "RANK"),
        ({**TORCHRUN, "RANK": "8"}, "RANK"),
        (_without(TORCHRUN, "WORLD_SIZE"), "WORLD_SIZE"),
        (_without(TORCHRUN, "RANK"), "RANK"),
        (_without(TORCHRUN, "LOCAL_RANK"), "LOCAL_RANK"),
        (_without(TORCHRUN, "LOCAL_WORLD_SIZE"), "LOCAL_WORLD_SIZE"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK"),
        (_without(TORCHRUN, "MASTER_ADDR"), "MASTER_ADDR"),
        (_without(TORCHRUN, "MASTER_PORT"), "MASTER_PORT"),
        ({**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT"),
        ({"SLURM_RESTART_COUNT": "x"}, "SLURM_RESTART_COUNT"),
    ],
)
def test_missing_or_malformed_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        detect(env)


def test_detect_reads_without_touching_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = MappingProxyType(dict(SRUN))  # any write would raise
    assert detect(frozen) == detect(dict(SRUN))
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert detect().launcher == "torchrun"  # no argument: os.environ


# ------------------------------------------------------------------------------------------------
# the Dist value and the single-process path


def test_dist_is_a_frozen_value() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Dist().rank = 1  # type: ignore[misc]


def test_describe_is_a_json_ready_summary_of_the_launch() -> None:
    summary = detect({**SRUN, "SLURM_RESTART_COUNT": "2"}).describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["world_size"] == 4 and summary["ranks_per_node"] == 2
    assert summary["launcher"] == "slurm" and summary["slurm_job_id"] == "12345"
    assert summary["slurm_restart_count"] == 2
    assert summary["master_addr"] == "gpu01" and summary["master_port"] == SRUN_PORT
    assert {"backend", "device", "num_nodes"} <= summary.keys()


@pytest.mark.parametrize(
    ("dist", "cores", "default", "threads"),
    [
        (Dist(), 8, 4, 4),  # one process: torch's physical-core default, not hyper-threads
        (Dist(), 4, 16, 4),  # SLURM/taskset affinity smaller than the machine
        (Dist(launcher="torchrun", local_world_size=4), 16, 8, 4),
        (Dist(launcher="torchrun", local_world_size=4), 2, 8, 1),  # never zero
        (Dist(launcher="slurm", local_world_size=4, cpus_per_task=8), 8, 64, 8),  # bound task
        (Dist(launcher="slurm", local_world_size=4, cpus_per_task=8), 64, 64, 8),  # unbound
        (Dist(launcher="slurm", local_world_size=4), 1, 64, 1),  # default 1 cpu per task
    ],
)
def test_cpu_threads_split_the_node_among_its_ranks(
    dist: Dist, cores: int, default: int, threads: int
) -> None:
    assert distributed.cpu_threads(dist, cores, default) == threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_single_process_setup_fills_device_and_joins_no_group() -> None:
    dist = distributed.setup(device="cpu", env={"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4"})
    assert (dist.device, dist.backend, dist.world_size) == ("cpu", None, 1)
    assert dist.slurm_job_id == "9"
    assert not torch.distributed.is_initialized()


@pytest.mark.usefixtures("restore_threads")
def test_setup_respects_a_user_chosen_omp_num_threads() -> None:
    torch.set_num_threads(1)
    env = {**TORCHRUN, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    distributed.setup(device="cpu", env=env | {"LOCAL_WORLD_SIZE": "1"})
    assert torch.get_num_threads() == 1


def test_setup_rejects_an_unknown_device() -> None:
    with pytest.raises(ValueError, match="tpu"):
        distributed.setup(device="tpu", env={})


def test_setup_rejects_an_unknown_backend_before_any_rendezvous() -> None:
    with pytest.raises(ValueError, match="mpi"):
        distributed.setup(device="cpu", backend="mpi", env={**TORCHRUN, "OMP_NUM_THREADS": "1"})


def test_collectives_are_identities_for_one_process() -> None:
    dist = Dist()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(t, dist) is t and t.tolist() == [1.0, 2.0]
    assert distributed.all_reduce_sum(t, dist).tolist() == [1.0, 2.0]
    assert distributed.all_reduce_max(t, dist).tolist() == [1.0, 2.0]
    payload = {"run_dir": "/tmp/x"}
    assert distributed.broadcast_object(payload, dist) is payload
    distributed.barrier(dist)
    distributed.teardown(dist)
    distributed.teardown(dist)  # twice, and never initialised


@pytest.mark.parametrize(
    ("state", "running"), [("RUNNING", True), ("COMPLETING", False), ("", False)]
)
def test_a_sigterm_requeues_only_a_job_slurm_still_runs(
    tmp_path, monkeypatch: pytest.MonkeyPatch, state: str, running: bool
) -> None:
    """squeue's answer decides: COMPLETING after scancel or scontrol requeue, gone after the end."""
    fake = tmp_path / "squeue"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho {state}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert distributed.slurm_job_running(Dist(slurm_job_id="77")) is running
    assert "--jobs=77" in (tmp_path / "args").read_text()
    assert distributed.slurm_job_running(Dist()) is False  # not a SLURM job: never requeue
