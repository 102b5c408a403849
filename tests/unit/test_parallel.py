"""``train.parallel=fsdp`` against ``ddp`` on two CPU ranks (gloo, spawned processes): the same
global batch gives the same training, each rank holds half the state, checkpoints are the
single-process format, and a sharded run stopped at a step resumes on one or two ranks."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from minigpt import checkpoint, distributed
from minigpt.config import ConfigError, TrainConfig
from minigpt.distributed import Dist
from minigpt.model import GPT, GPTConfig
from minigpt.signals import StopRequested
from tests.conftest import read_metrics
from tests.unit.trainer_setup import (
    build_trainer,
    credit_rank_calls,
    signal_in_step,
    tiny_config,
    two_ranks,
    with_train,
    write_corpus,
)

# Measured on torch 2.13 (CPU, float32, these runs): the losses and evaluations of fsdp and ddp
# were bit-identical, the gradient norms differed by up to 1.2e-7 and, after 4 AdamW steps at
# lr 1e-2, the weights by up to 1.4e-6 (2 of 29 tensors bit-identical): FSDP reduce-scatters
# flat shards, DDP all-reduces buckets, and the norm is summed shard by shard, so float32
# rounding differs. A resume on the same two ranks was bit-identical, on one rank within 2.7e-7.
TOL = {"rtol": 0, "atol": 1e-5}


def _config(root: Path, parallel: str, **train: Any) -> Any:
    """Two blocks (so two sharded units besides the root), dropout on, 2 ranks x 2 micro-steps
    of 2 sequences, evaluations over 3 batches (uneven over 2 ranks) with a sample each."""
    cfg = tiny_config(
        root,
        model={"n_layer": 2, "dropout": 0.1},
        batch_size=2,
        grad_accum=2,
        max_steps=4,
        eval_every=2,
        eval_steps=3,
        ckpt_every=2,
        keep_last=4,
        parallel=parallel,
    )
    return with_train(cfg, **train)


class _NanOnRank0(torch.nn.Module):
    """The sharded model, whose loss is NaN on rank 0 alone during one step."""

    def __init__(self, inner: torch.nn.Module, trainer: Any, step: int) -> None:
        super().__init__()
        self.inner, self.trainer, self.step = inner, trainer, step

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        logits, loss = self.inner(x, y)
        if self.trainer.dist.rank == 0 and self.trainer.state.step == self.step:
            loss = loss * math.nan
        return logits, loss


def _gathered(model: Any) -> list[bool]:
    """For each block: are its weights gathered whole now (plain tensors, not shards)?"""
    return [not any(isinstance(p, DTensor) for p in b.parameters()) for b in model.transformer.h]


def _on_two_ranks(root: Path, dist: Dist) -> dict[str, Any]:
    """Each rank's side (a spawned process): a ddp run, an fsdp run, and an fsdp run stopped
    by a signal after step 2, then resumed on the same two ranks."""
    out: dict[str, Any] = {}
    for parallel in ("ddp", "fsdp"):
        trainer = build_trainer(_config(root, parallel), root / parallel, dist)
        trainer.fit()
        out[parallel] = trainer.parallel.local_numel(trainer.optimizer)
    recompute = replace(
        _config(root, "fsdp"), model=replace(_config(root, "fsdp").model, grad_checkpointing=True)
    )
    build_trainer(recompute, root / "fsdp_recompute", dist).fit()
    stopped = build_trainer(_config(root, "fsdp"), root / "stopped", dist)
    signal_in_step(stopped, 2)
    try:
        stopped.fit()
    except StopRequested as request:
        out["stopped"] = str(request)
    probe = build_trainer(_config(root, "fsdp"), root / "probe", dist)
    x, y = probe.sampler.batch(0, dist.rank, dist.world_size, 0, 2)
    probe.model(x, y)  # a training forward, no backward yet
    out["gathered"] = [_gathered(probe.model)]
    probe.parallel.reshard()
    out["gathered"].append(_gathered(probe.model))
    nan = build_trainer(_config(root, "fsdp", max_steps=3), root / "fsdp_nan", dist)
    nan.step_model = _NanOnRank0(nan.step_model, nan, step=1)
    nan.fit()
    out["nan"] = (nan.state.skipped_steps, nan.state.bad_steps)
    shutil.copytree(root / "stopped", root / f"stopped_copy{dist.rank}")  # for the 1-rank resume
    if dist.is_main:
        shutil.copytree(root / "stopped", root / "stopped_ddp")
    distributed.barrier(dist)
    build_trainer(_config(root, "fsdp"), root / "stopped", dist).fit()
    build_trainer(_config(root, "ddp"), root / "stopped_ddp", dist).fit()  # shards, read whole
    return out


@pytest.fixture(scope="module")
def _spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any], set[str]]:
    root = tmp_path_factory.mktemp("parallel")
    write_corpus(root / "corpus")
    return root, *two_ranks(_on_two_ranks, root)


@pytest.fixture
def two_rank_runs(_spawned: tuple[Path, list[Any], set[str]]) -> tuple[Path, list[Any]]:
    root, ranks, called = _spawned
    credit_rank_calls(called)
    return root, ranks


def _last(run: Path) -> dict[str, Any]:
    return checkpoint.load(run / "checkpoints" / checkpoint.LAST)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOL, msg=key)


@pytest.mark.distributed
def test_fsdp_trains_like_ddp_on_the_same_global_batch(two_rank_runs: tuple[Path, Any]) -> None:
    """Losses, evaluations (3 batches over 2 ranks), gradient norms, samples and final weights."""
    root, _ = two_rank_runs
    runs = {p: read_metrics(root / p) for p in ("ddp", "fsdp")}
    assert [sorted(e) for e in runs["ddp"]] == [sorted(e) for e in runs["fsdp"]]
    for ddp, fsdp in zip(runs["ddp"], runs["fsdp"], strict=True):
        for key in ("train/loss", "val/loss", "grad_norm", "lr"):
            if key in ddp:
                assert fsdp[key] == pytest.approx(ddp[key], rel=0, abs=1e-5), (ddp["step"], key)
        assert fsdp.get("sample") == ddp.get("sample")
    assert sum("val/loss" in e for e in runs["fsdp"]) == 2
    info = json.loads((root / "fsdp" / "run.json").read_text())
    assert info["config"]["train"]["parallel"] == "fsdp" and info["memory_peak"]["rss_gb"] > 0
    _assert_close(_last(root / "ddp")["model"], _last(root / "fsdp")["model"])


@pytest.mark.distributed
def test_fsdp_with_activation_checkpointing_trains_the_same(
    two_rank_runs: tuple[Path, Any],
) -> None:
    """Blocks recomputed in backward gather their shards again and redraw the same dropout."""
    root, _ = two_rank_runs
    plain, recomputed = _last(root / "fsdp"), _last(root / "fsdp_recompute")
    assert recomputed["config"]["model"]["grad_checkpointing"] is True
    for key, value in plain["model"].items():  # bit-identical (measured): same ops, same order
        assert torch.equal(value, recomputed["model"][key]), key


@pytest.mark.distributed
def test_fsdp_keeps_half_the_parameters_and_optimizer_state_on_each_rank(
    two_rank_runs: tuple[Path, Any],
) -> None:
    _, ranks = two_rank_runs
    (params, state), _ = ranks[0]["ddp"], ranks[1]["ddp"]
    shards = [r["fsdp"] for r in ranks]
    assert sum(s[0] for s in shards) == params and sum(s[1] for s in shards) == state
    assert state == 2 * params  # AdamW: two moments per parameter
    for p, s in shards:  # each rank's share is half, up to a row a tensor
        assert abs(p - params / 2) < params * 0.05 and abs(s - state / 2) < state * 0.05


@pytest.mark.distributed
def test_an_fsdp_checkpoint_consolidates_to_the_single_process_format(
    two_rank_runs: tuple[Path, Any],
) -> None:
    """Saved as shards, loaded as full tensors, the optimizer keyed by parameter index as DDP
    writes it: generate, the exports and init_from read it as they read any other."""
    root, _ = two_rank_runs
    ddp, fsdp = _last(root / "ddp"), _last(root / "fsdp")
    assert checkpoint.SHARDS in fsdp and checkpoint.SHARDS not in ddp
    model = GPT(GPTConfig(**fsdp["model_config"]))
    model.load_state_dict(fsdp["model"])  # strict: every key, full shapes
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert sorted(fsdp["optimizer"]["state"]) == sorted(ddp["optimizer"]["state"])
    for i, s in ddp["optimizer"]["state"].items():
        for key, value in s.items():
            torch.testing.assert_close(fsdp["optimizer"]["state"][i][key], value, **TOL)


@pytest.mark.distributed
def test_fsdp_stopped_at_step_2_resumes_on_two_ranks_sharded_or_not_and_on_one(
    two_rank_runs: tuple[Path, Any],
) -> None:
    root, ranks = two_rank_runs
    assert [r.get("stopped") for r in ranks] == ["stopped by SIGTERM at step 2"] * 2
    straight = _last(root / "fsdp")["model"]
    stopped = checkpoint.load(root / "stopped_copy0" / "checkpoints" / checkpoint.LAST)
    assert stopped["train_state"]["step"] == 2
    _assert_close(straight, _last(root / "stopped")["model"])
    ddp = _last(root / "stopped_ddp")
    assert checkpoint.SHARDS not in ddp  # a ddp run writes one file
    _assert_close(straight, ddp["model"])
    # A single process keeps the global batch with 4 micro-steps.
    one = build_trainer(_config(root, "fsdp", grad_accum=4), root / "stopped_copy0")
    one.fit()
    assert one.state.step == 4
    _assert_close(straight, _last(root / "stopped_copy0")["model"])


@pytest.mark.distributed
def test_a_non_finite_gradient_on_one_rank_is_skipped_by_both(
    two_rank_runs: tuple[Path, Any],
) -> None:
    """Rank 0's NaN reaches every shard through the reduce-scatter, and the norm is the whole
    gradient's: both ranks skip the same step, and the run goes on with finite weights."""
    root, ranks = two_rank_runs
    assert [r["nan"] for r in ranks] == [(1, 0), (1, 0)]  # one skipped, none bad in a row now
    steps = [e for e in read_metrics(root / "fsdp_nan") if "grad_norm" in e]
    assert [e["grad_norm"] for e in steps][1] == "nan"  # the JSON lines write it as a string
    assert [math.isfinite(float(e["grad_norm"])) for e in steps] == [True, False, True]
    assert all(torch.isfinite(v).all() for v in _last(root / "fsdp_nan")["model"].values())


@pytest.mark.distributed
def test_after_forward_only_the_last_block_stays_gathered_until_resharded(
    two_rank_runs: tuple[Path, Any],
) -> None:
    """Each block gives its gathered weights back after its forward, but the last, which
    backward needs first (torchtitan's choice); reshard() frees it after an evaluation."""
    _, ranks = two_rank_runs
    assert [r["gathered"] for r in ranks] == [[[False, True], [False, False]]] * 2


def test_fsdp_refuses_float16_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"train\.dtype=float16 .*train\.dtype=bfloat16"):
        TrainConfig(parallel="fsdp", dtype="float16")
    with pytest.raises(ConfigError, match=r"train\.parallel"):
        TrainConfig(parallel="zero3")
