"""The dry run's memory plan: what each train.parallel keeps per GPU, and when it warns."""

from __future__ import annotations

import pytest

from minigpt.config import Config, ModelConfig, TrainConfig
from minigpt.model import GPT
from minigpt.plan import FIT_SHARE, fit_warning, plan_memory


def _config(**model: object) -> Config:
    shape = {"n_layer": 48, "n_head": 25, "d_model": 1600, "block_size": 1024, **model}
    return Config(model=ModelConfig(**shape), train=TrainConfig(batch_size=4, dtype="bfloat16"))


def test_ddp_keeps_16_bytes_a_parameter_and_fsdp_a_world_size_share_of_them() -> None:
    cfg = _config()
    params = GPT.param_count_formula(cfg.model.gpt_config(256))
    ddp, fsdp = plan_memory(cfg, 8, "ddp"), plan_memory(cfg, 8, "fsdp")
    assert (ddp.params, ddp.grads, ddp.optimizer) == (4 * params, 4 * params, 8 * params)
    assert fsdp.optimizer == 8 * -(-params // 8)  # only the moments of this rank's shard
    # Weights and gradients: the shard plus what is gathered (root and two blocks, bf16) or
    # reduced (a block's fp32 gradient) at a time, far below a full copy.
    assert 4 * params // 8 < fsdp.params < 4 * params // 4
    assert 4 * params // 8 < fsdp.grads < 4 * params // 4
    assert fsdp.activations == ddp.activations  # the same micro-batch runs either way
    assert plan_memory(cfg, 1, "fsdp").total == ddp.total  # one rank: nothing to shard


def test_activations_grow_with_the_micro_batch_and_shrink_with_recompute() -> None:
    cfg = _config()
    act = plan_memory(cfg, 8, "ddp").activations
    double = Config(model=cfg.model, train=TrainConfig(batch_size=8, dtype="bfloat16"))
    assert plan_memory(double, 8, "ddp").activations == 2 * act
    recompute = plan_memory(_config(grad_checkpointing=True), 8, "ddp").activations
    assert recompute < act / 3
    fp32 = Config(model=cfg.model, train=TrainConfig(batch_size=4, dtype="float32"))
    assert plan_memory(fp32, 8, "ddp").activations > act


def test_a_point_past_the_declared_gpu_memory_warns_with_the_fixes() -> None:
    ddp = plan_memory(_config(), 8, "ddp")
    need = ddp.total / 2**30
    assert fit_warning(ddp, None) is None
    assert fit_warning(ddp, need / FIT_SHARE + 1) is None
    warning = fit_warning(ddp, need / FIT_SHARE - 1)
    assert warning is not None
    assert warning.startswith(f"will not fit: ddp: {need:,.1f} GiB/GPU")
    assert "cluster.gpu_memory_gb=" in warning and "try train.parallel=fsdp" in warning
    fsdp = plan_memory(_config(), 8, "fsdp")
    too_small = fit_warning(fsdp, 1)
    assert too_small is not None and "more GPUs (hydra.launcher.nodes)" in too_small
    assert "train.parallel=fsdp" not in too_small


def test_gpu_memory_must_be_positive() -> None:
    from minigpt.config import ClusterConfig, ConfigError

    with pytest.raises(ConfigError, match=r"cluster\.gpu_memory_gb=0 must be > 0"):
        ClusterConfig(gpu_memory_gb=0)
