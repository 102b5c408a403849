"""AdamW and its learning-rate schedule."""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import torch

from minigpt.config import OptimizerConfig


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, compile: bool = False
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, LayerNorm gains or position vectors).

    Embeddings are 2-D and decayed, as in GPT-2/nanoGPT. The fused kernel (one call updates
    every tensor) is used wherever this PyTorch has it, CPU included: on CPU it made config (a)'s
    step ~9% faster than the per-tensor loop nanoGPT gets there. Without ``train.compile`` the
    optimizer is :class:`AdamW`, which never imports ``torch._dynamo``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra: dict[str, bool] = {}
    if "fused" in inspect.signature(torch.optim.AdamW).parameters:
        extra["fused"] = True
    else:
        extra["foreach"] = True
    cls = torch.optim.AdamW if compile or _RAW_STEP is None else AdamW
    if cls is AdamW:
        _skip_dynamo_import()
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), **extra)


# torch.optim imports torch._dynamo (with sympy, ~1 s on a fast CPU, a third of train.py's
# start-up) at the first call of each optimizer method, only to keep torch.compile from tracing
# into it: ``step`` calls ``torch._dynamo.graph_break()`` and the others are wrapped by
# ``torch._disable_dynamo``, which imports it to build the wrapper. A run that never compiles
# needs neither. Where this PyTorch is laid out otherwise, nothing is changed.
_RAW_STEP = getattr(torch.optim.AdamW.step, "__wrapped__", None)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose ``step`` skips the dynamo graph break (an eager run's only use of
    ``torch._dynamo``); the update itself is torch's own, so results are identical."""

    def step(self, closure: Any = None) -> Any:  # noqa: D102
        with (
            torch.no_grad()
        ):  # what torch's _use_grad_for_differentiable does (differentiable=False)
            return _RAW_STEP(self, closure)


def _skip_dynamo_import() -> None:
    """Give torch.optim.Optimizer's ``_disable_dynamo`` wrappers the plain method to call, so
    their first call does not import torch._dynamo; once it is imported anyway, leave them be."""
    if "torch._dynamo" in sys.modules:
        return
    probe = torch._compile._disable_dynamo(lambda: None)
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        method = getattr(torch.optim.Optimizer, name, None)
        fn = getattr(method, "__wrapped__", None)
        wrapped = fn is not None and getattr(method, "__code__", None) is probe.__code__
        if wrapped and getattr(fn, "__dynamo_disable", None) is None:
            setattr(fn, "__dynamo_disable", fn)


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


def warmup_warning(cfg: OptimizerConfig, max_steps: int) -> str | None:
    """A warning when the run ends inside its warm-up: it never reaches ``optimizer.lr``, so
    runs that differ only in ``optimizer.lr`` compare warm-up slopes, not learning rates.

    The rule: warn when ``warmup_steps >= max_steps`` (nothing is scaled for the user).
    """
    if cfg.warmup_steps < max_steps:
        return None
    reached = lr_at(max_steps - 1, cfg, max_steps)
    return (
        f"warning: optimizer.warmup_steps={cfg.warmup_steps} >= train.max_steps={max_steps}: "
        f"the learning rate only warms up, to {reached:.3g} at the last step (optimizer.lr="
        f"{cfg.lr:g}), and never decays; lower optimizer.warmup_steps"
    )


SCHEDULE_KEYS = ("optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps", "train.max_steps")


def schedule_change(
    step: int, before: tuple[OptimizerConfig, int], after: tuple[OptimizerConfig, int]
) -> str | None:
    """What a resume at ``step`` does to the learning rate, when the schedule's keys changed:
    ``before``/``after`` are (optimizer config, train.max_steps) of the checkpoint and now.

    Raising train.max_steps stretches the cosine, so the lr jumps back up at the resumed step.
    """
    values = [(cfg.lr, cfg.min_lr, cfg.warmup_steps, steps) for cfg, steps in (before, after)]
    changed = [
        f"{key} {old:g} -> {new:g}"
        for key, old, new in zip(SCHEDULE_KEYS, *values, strict=True)
        if old != new
    ]
    if not changed:
        return None
    was, now = lr_at(step, *before), lr_at(step, *after)
    return (
        f"the learning-rate schedule changed ({', '.join(changed)}): the lr at the resumed step "
        f"{step} is {now:.3g}, where the checkpoint's schedule had {was:.3g}"
    )
