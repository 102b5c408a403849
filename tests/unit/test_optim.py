"""Learning-rate schedule and optimizer parameter groups."""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch

from minigpt import optim
from minigpt.config import OptimizerConfig
from minigpt.model import GPT, GPTConfig
from minigpt.optim import build_optimizer, lr_at, schedule_change, warmup_warning


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


@pytest.mark.parametrize("step", [101, 125, 145, 190, 233, 1000])
def test_lr_stays_at_min_lr_past_max_steps(opt_cfg: OptimizerConfig, step: int) -> None:
    """A resumed run that goes past max_steps holds min_lr; the cosine would climb back up (at
    step 145 it is half way, at 190 back at lr)."""
    assert lr_at(step, opt_cfg, 100) == opt_cfg.min_lr


def test_no_warmup_starts_at_lr() -> None:
    cfg = OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 10) == pytest.approx(1e-3)
    assert lr_at(5, cfg, 10) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_applies_to_matrices_only() -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=32))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n_grouped = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters())
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("compile", [False, True])
def test_the_optimizer_is_the_fused_adamw_at_the_configured_lr(compile: bool) -> None:
    """Fused wherever this PyTorch has it (CPU included); lr and betas come from the config."""
    cfg = OptimizerConfig(lr=3e-4, min_lr=0.0, betas=[0.8, 0.9])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg, compile)
    assert opt.defaults["fused"] is True and opt.defaults["foreach"] is None
    assert [(g["lr"], g["betas"]) for g in opt.param_groups] == [(3e-4, (0.8, 0.9))] * 2


class _AdamWWithoutFused(torch.optim.AdamW):
    """torch.optim.AdamW as an older PyTorch has it: no ``fused`` keyword."""

    def __init__(
        self,
        params: object,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach)


@pytest.mark.parametrize("compile", [False, True])
def test_a_pytorch_without_fused_adamw_gets_the_foreach_one(
    monkeypatch: pytest.MonkeyPatch, compile: bool
) -> None:
    """Where AdamW has no ``fused`` keyword, the multi-tensor (foreach) update is asked for."""
    monkeypatch.setattr(torch.optim, "AdamW", _AdamWWithoutFused)
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(), compile)
    assert opt.defaults["foreach"] is True and opt.defaults["fused"] is None


@pytest.mark.parametrize(("warmup", "max_steps"), [(100, 60), (60, 60)])
def test_a_run_that_ends_in_its_warmup_is_warned_naming_both_keys_and_the_lr_reached(
    warmup: int, max_steps: int
) -> None:
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    warning = warmup_warning(cfg, max_steps)
    assert warning is not None and warning.startswith("warning: ")
    assert f"optimizer.warmup_steps={warmup}" in warning
    assert f"train.max_steps={max_steps}" in warning
    assert f"to {lr_at(max_steps - 1, cfg, max_steps):.3g} at the last step" in warning


def test_a_run_that_gets_past_its_warmup_is_not_warned(opt_cfg: OptimizerConfig) -> None:
    assert warmup_warning(opt_cfg, 11) is None
    assert warmup_warning(OptimizerConfig(warmup_steps=0), 1) is None


def test_raising_max_steps_at_resume_names_the_lr_before_and_after(
    opt_cfg: OptimizerConfig,
) -> None:
    note = schedule_change(60, (opt_cfg, 60), (opt_cfg, 200))
    assert note is not None and "train.max_steps 60 -> 200" in note
    before, after = lr_at(60, opt_cfg, 60), lr_at(60, opt_cfg, 200)
    assert before == pytest.approx(1e-4) and after > 8e-4
    assert f"is {after:.3g}, where the checkpoint's schedule had {before:.3g}" in note
    assert schedule_change(60, (opt_cfg, 200), (opt_cfg, 200)) is None


def test_a_schedule_change_names_every_changed_key(opt_cfg: OptimizerConfig) -> None:
    faster = OptimizerConfig(lr=2e-3, min_lr=1e-4, warmup_steps=10)
    note = schedule_change(60, (opt_cfg, 60), (faster, 200))
    assert note is not None
    assert "(optimizer.lr 0.001 -> 0.002, train.max_steps 60 -> 200)" in note


def test_a_run_that_is_all_warmup_ends_at_min_lr(opt_cfg: OptimizerConfig) -> None:
    """warmup_steps == max_steps: the last warm-up step reaches lr, then the clamp holds min_lr
    (the cosine, with nothing left to span, would give lr again)."""
    assert lr_at(9, opt_cfg, 10) == pytest.approx(opt_cfg.lr)
    assert lr_at(10, opt_cfg, 10) == opt_cfg.min_lr


def test_the_eager_adamw_calls_the_closure_and_returns_its_loss() -> None:
    """torch's optimizer contract (LBFGS-style callers): step(closure) re-evaluates the loss."""
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, OptimizerConfig())
    calls: list[int] = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor) and loss.requires_grad


def _trained(optimizer_cls: type, steps: int = 5, **kwargs: object) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=32))
    opt = optimizer_cls(model.parameters(), lr=1e-2, weight_decay=0.1, **kwargs)
    x = torch.randint(0, 32, (4, 8))
    for _ in range(steps):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()] + [
        t for s in opt.state_dict()["state"].values() for t in s.values()
    ]


def test_the_eager_adamw_updates_exactly_as_torch_adamw() -> None:
    """Our AdamW only skips torch's dynamo graph break: weights and moments stay bit-identical."""
    for fused in (True, False):
        ours = _trained(optim.AdamW, fused=fused)
        torch_s = _trained(torch.optim.AdamW, fused=fused)
        assert all(torch.equal(a, b) for a, b in zip(ours, torch_s, strict=True))


def test_an_eager_run_never_imports_torch_dynamo() -> None:
    """Building the optimizer, stepping, zeroing and saving it must not pull in torch._dynamo
    (a second of start-up); with train.compile the optimizer is torch's own."""
    code = (
        "import sys, torch\n"
        "from minigpt.config import OptimizerConfig\n"
        "from minigpt.model import GPT, GPTConfig\n"
        "from minigpt.optim import build_optimizer\n"
        "m = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=32))\n"
        "o = build_optimizer(m, OptimizerConfig())\n"
        "x = torch.randint(0, 32, (2, 8))\n"
        "m(x, x)[1].backward(); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict())\n"
        "print(type(o).__module__, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["minigpt.optim", "False"]
    compiled = build_optimizer(
        GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8)), OptimizerConfig(), True
    )
    assert type(compiled) is torch.optim.AdamW


WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def test_optimizer_methods_get_their_plain_function_before_dynamo_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process (the subprocess test above is invisible to mutmut's coverage): each of the four
    wrapped Optimizer methods is handed itself as its dynamo-disabled form, so calling it never
    imports torch._dynamo; once torch._dynamo is imported they are left to torch."""
    plain = {name: getattr(torch.optim.Optimizer, name).__wrapped__ for name in WRAPPED}
    for fn in plain.values():
        if hasattr(fn, "__dynamo_disable"):
            monkeypatch.delattr(fn, "__dynamo_disable")
    monkeypatch.setitem(sys.modules, "torch._dynamo", object())
    optim._skip_dynamo_import()
    assert not any(hasattr(fn, "__dynamo_disable") for fn in plain.values())
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    optim._skip_dynamo_import()
    assert {name: getattr(fn, "__dynamo_disable", None) for name, fn in plain.items()} == plain


def _plain_functions_without_a_disabled_form(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The four wrapped methods' plain functions, none yet given a dynamo-disabled form, and
    torch._dynamo not imported (all put back after the test)."""
    plain = {name: getattr(torch.optim.Optimizer, name).__wrapped__ for name in WRAPPED}
    for fn in plain.values():
        if hasattr(fn, "__dynamo_disable"):
            monkeypatch.delattr(fn, "__dynamo_disable")
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    return plain


def test_a_dynamo_disabled_form_already_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a method without one is given itself: a form torch (or a compile) set stays."""
    plain = _plain_functions_without_a_disabled_form(monkeypatch)
    marker = object()
    for fn in plain.values():
        monkeypatch.setattr(fn, "__dynamo_disable", marker, raising=False)
    optim._skip_dynamo_import()
    assert all(getattr(fn, "__dynamo_disable") is marker for fn in plain.values())


@pytest.mark.parametrize("layout", ["missing", "not_wrapped", "other_wrapper", "wrapper_object"])
def test_an_optimizer_method_laid_out_otherwise_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """On a PyTorch where zero_grad is missing, plain, or wrapped by something other than
    _disable_dynamo (a function or an object without __code__), nothing is changed there and
    nothing raises; the other three methods are still given their plain function."""
    plain = _plain_functions_without_a_disabled_form(monkeypatch)
    zero_grad = plain.pop("zero_grad")
    replacement = {
        "not_wrapped": zero_grad,
        "other_wrapper": functools.wraps(zero_grad)(lambda *a, **k: zero_grad(*a, **k)),
        "wrapper_object": functools.lru_cache(zero_grad),
    }
    if layout == "missing":
        monkeypatch.delattr(torch.optim.Optimizer, "zero_grad")
    else:
        monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", replacement[layout])
    optim._skip_dynamo_import()
    assert not hasattr(zero_grad, "__dynamo_disable")
    assert {name: getattr(fn, "__dynamo_disable", None) for name, fn in plain.items()} == plain
