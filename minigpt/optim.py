"""AdamW and its learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch

from minigpt.config import OptimizerConfig


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, device_type: str
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, LayerNorm gains or position vectors).

    Embeddings are 2-D and decayed, as in GPT-2/nanoGPT. The fused kernel is used on CUDA,
    foreach elsewhere: both avoid a Python loop over parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra: dict[str, bool] = {}
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        extra["fused"] = True
    else:
        extra["foreach"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **extra)


def lr_at(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply this step's learning rate to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
