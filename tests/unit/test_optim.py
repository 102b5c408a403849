"""Learning-rate schedule and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest

from minigpt.config import OptimizerConfig
from minigpt.model import GPT, GPTConfig
from minigpt.optim import build_optimizer, lr_at


@pytest.fixture
def opt_cfg() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)


def test_warmup_rises_linearly_to_lr(opt_cfg: OptimizerConfig) -> None:
    assert lr_at(0, opt_cfg, 100) == pytest.approx(1e-4)
    assert lr_at(4, opt_cfg, 100) == pytest.approx(5e-4)
    assert lr_at(9, opt_cfg, 100) == pytest.approx(1e-3)


def test_cosine_decays_to_min_lr(opt_cfg: OptimizerConfig) -> None:
    assert lr_at(10, opt_cfg, 100) == pytest.approx(1e-3)
    midpoint = 10 + 45
    assert lr_at(midpoint, opt_cfg, 100) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, opt_cfg, 100) == pytest.approx(1e-4)
    assert lr_at(1000, opt_cfg, 100) == pytest.approx(1e-4)
    values = [lr_at(s, opt_cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_warmup_starts_at_lr() -> None:
    cfg = OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 10) == pytest.approx(1e-3)
    assert lr_at(5, cfg, 10) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_applies_to_matrices_only() -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=32))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n_grouped = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters())
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
