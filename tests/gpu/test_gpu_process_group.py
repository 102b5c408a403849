"""A single-GPU NCCL process group (gloo in the dry run), joined through minigpt.distributed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.gpu.suite import ON_GPU, SUITE_MARKS

pytestmark = SUITE_MARKS


def test_single_gpu_nccl_process_group_runs_collectives_and_ddp(
    process_group: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Rank 0 of 1 as torchrun starts it: the group binds cuda:LOCAL_RANK, every collective the
    trainer uses runs over NCCL, DDP over it trains exactly like the bare model (one rank's
    all-reduce is the identity), and teardown leaves no group behind."""
    done, out = process_group
    assert done.returncode == 0, done.stderr[-4000:]
    facts = json.loads(out.read_text())
    assert facts["launcher"] == "torchrun" and facts["world_size"] == 1
    if ON_GPU:
        assert facts["backend"] == "nccl"
        assert facts["device"] == "cuda:0" and facts["current_device"] == 0
        assert facts["bound_device"] in ("cuda:0", "absent"), facts  # absent: torch < 2.3
    else:
        assert facts["backend"] == "gloo" and facts["device"] == "cpu"
    assert facts["sum"] == [1.5, 2.0] and facts["mean"] == [3.0] and facts["max"] == [-1.0]
    assert facts["broadcast"] == {"run_dir": "/runs/a"}
    assert facts["gathered"] == [{"rank": 0}]
    assert facts["ddp_matches_plain"] is True
    assert facts["initialized_after_teardown"] is False


def test_fsdp_on_a_one_rank_mesh_computes_in_bf16_keeps_fp32_and_round_trips_its_shards(
    process_group: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """train.parallel=fsdp's CUDA path (a job of one GPU does not shard; the script forces
    it): weights gathered and computed in bf16, fp32 master weights and gradients (DTensors),
    a finite clipped norm, and DCP shards that load back bit-identical over NCCL and
    consolidate on the host."""
    done, out = process_group
    assert done.returncode == 0, done.stderr[-4000:]
    fsdp = json.loads(out.read_text())["fsdp"]
    assert fsdp["sharded"] and fsdp["dtensor"]
    assert fsdp["params"] == ["DTensor torch.float32"] and fsdp["grads"] == ["torch.float32"]
    assert fsdp["compute"] == ["torch.bfloat16" if ON_GPU else "torch.float32"]
    assert fsdp["grad_norm_finite"] and fsdp["reloaded_equal"] and fsdp["consolidated_equal"]
