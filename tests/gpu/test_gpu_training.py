"""Training on the GPU: bf16 and fp16 autocast, the dtype auto picks, fused AdamW, torch.compile,
the memory figures and MFU against the GPU's peak."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt import peak, runtime
from minigpt.model import GPT, GPTConfig
from tests.gpu.suite import (
    BF16_STEPS,
    COMPILED_STEPS,
    DRY_RUN_NOTE,
    FP16_STEPS,
    LEARNED,
    ON_GPU,
    SUITE_MARKS,
    UNTRAINED_LOSS,
    Background,
    Run,
    cuda_only,
)

pytestmark = SUITE_MARKS


def assert_learned(run: Run) -> None:
    """The loss fell by the suite's margin (LEARNED), from near the untrained loss."""
    first = run.train_events()[0]["train/loss"]
    val = run.val_losses()
    assert first > 0.8 * UNTRAINED_LOSS, f"the first logged loss {first} is not an untrained one"
    assert val[-1][1] < LEARNED, f"val loss {val} did not fall below {LEARNED:.3f}"
    assert val[-1][1] < val[0][1] or len(val) == 1


def assert_no_skipped_steps(run: Run) -> None:
    """Every logged step had a finite gradient norm and the trainer skipped none."""
    events = run.train_events()
    bad = [(e["step"], e["grad_norm"]) for e in events if not math.isfinite(float(e["grad_norm"]))]
    assert not bad, f"non-finite gradient norms (step, norm): {bad}"
    assert all(e["skipped_steps"] == 0 for e in events), [e["skipped_steps"] for e in events]
    assert "optimizer step skipped" not in run.stdout


def test_bf16_autocast_run_learns_with_no_skipped_steps(bf16_run: Run) -> None:
    info = bf16_run.info()
    assert info["status"] == "completed" and info["steps"] == BF16_STEPS
    assert info["dtype"] == "bfloat16"
    assert info["device"] == ("cuda:0" if ON_GPU else "cpu")  # one process: cuda:LOCAL_RANK
    assert_learned(bf16_run)
    assert_no_skipped_steps(bf16_run)


@cuda_only("float16 autocast with the GradScaler (the trainer refuses float16 on CPU)")
def test_fp16_autocast_with_grad_scaler_learns_with_no_skipped_steps(fp16_run: Run) -> None:
    info = fp16_run.info()
    assert info["status"] == "completed" and info["dtype"] == "float16"
    assert_learned(fp16_run)
    assert [e["step"] for e in fp16_run.train_events()] == list(range(1, FP16_STEPS + 1))
    assert_no_skipped_steps(fp16_run)  # every step is logged: none can hide
    # The scaler halves its scale at each step it skips (an inf or NaN gradient) and counts
    # the steps since the last skip; it starts at 2**16 and grows only after 2000 good steps.
    scaler = fp16_run.checkpoint()["scaler"]
    assert scaler["scale"] == 2.0**16 > 0, scaler
    assert scaler["_growth_tracker"] == FP16_STEPS, scaler


@cuda_only("train.dtype=auto on a Hopper GPU")
def test_dtype_auto_picks_bf16_on_hopper(bf16_run: Run) -> None:
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        pytest.skip(f"{torch.cuda.get_device_name()} is sm_{major}{minor}, not Hopper (sm_90)")
    assert runtime.resolve_dtype("auto", "cuda") is torch.bfloat16
    info = bf16_run.info()
    assert "train.dtype=auto" in info["overrides"]
    assert info["dtype"] == "bfloat16"


@cuda_only("the fused AdamW kernel")
def test_fused_adamw_is_chosen_on_cuda(bf16_run: Run) -> None:
    """The optimizer's options travel in its state dict: the trainer's own optimizer was fused."""
    groups = bf16_run.checkpoint()["optimizer"]["param_groups"]
    assert [g["fused"] for g in groups] == [True, True], groups
    assert not any(g["foreach"] for g in groups)


@cuda_only("GPU memory metrics")
def test_gpu_memory_metrics_are_logged(bf16_run: Run) -> None:
    events = bf16_run.train_events()
    assert events
    for e in events:
        allocated, peak_gb = e["memory/gpu_allocated_gb"], e["memory/gpu_peak_gb"]
        assert 0 < allocated <= peak_gb < 139, e
        assert e["memory/gpu_reserved_gb"] >= allocated, e
        assert e["memory/rss_gb"] > 0, e


def test_mfu_is_measured_against_the_devices_peak(bf16_run: Run) -> None:
    info = bf16_run.info()
    mfu = info["mfu"]
    assert mfu["windows"] == len(bf16_run.train_events()) and math.isfinite(mfu["mean"])
    assert mfu["mean"] > 0 and mfu["last"] > 0
    if not ON_GPU:
        assert info["peak_flops_source"].startswith("measured")
        pytest.skip(f"{DRY_RUN_NOTE}: checked MFU against a measured CPU peak, not a GPU's")
    assert mfu["mean"] < 1 and mfu["last"] < 1
    name = torch.cuda.get_device_name()
    known = [key for key in peak.DATASHEET_PEAK if key in name]
    if known:  # bf16 against the dense bf16 tensor-core peak of the datasheet
        assert info["peak_flops"] == peak.DATASHEET_PEAK[known[0]]
        assert info["peak_flops_source"] == f"datasheet {known[0]}"
    else:
        assert info["peak_flops_source"].startswith("measured")


def test_float32_peak_follows_whether_matmuls_may_use_tf32() -> None:
    """float32 matmuls run on TF32 tensor cores only when torch allows it (not by default): MFU
    is measured against the peak of the units doing the work (7x apart on a Hopper)."""
    name = torch.cuda.get_device_name() if ON_GPU else "NVIDIA H200 (dry run: a name only)"
    known = [key for key in peak.DATASHEET_FP32 if key in name]
    if not known:
        pytest.skip(f"{name} has no datasheet figures in minigpt.peak: its peak is measured")
    key, was = known[0], torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        plain = peak.datasheet_peak(name, torch.float32)
        on_device = peak.peak_flops(torch.device("cuda"), torch.float32) if ON_GPU else plain
        torch.set_float32_matmul_precision("high")
        tf32 = peak.datasheet_peak(name, torch.float32)
    finally:
        torch.set_float32_matmul_precision(was)
    assert plain == on_device == (peak.DATASHEET_FP32[key], f"datasheet {key} FP32")
    if key in peak.DATASHEET_TF32:
        assert tf32 == (peak.DATASHEET_TF32[key], f"datasheet {key} TF32")
    assert peak.datasheet_peak(name, torch.bfloat16) == (
        peak.DATASHEET_PEAK[key],
        f"datasheet {key}",
    )


def test_compiled_run_learns_and_saves_the_plain_modules_weights(
    compiled_run: Run, background: Background
) -> None:
    """train.compile=true compiles for the run's device (Triton kernels on CUDA, C++ on CPU),
    learns, and saves the unwrapped module's state dict (no ``_orig_mod.`` names)."""
    info = compiled_run.info()
    assert info["status"] == "completed" and info["steps"] == COMPILED_STEPS
    assert info["config"]["train"]["compile"] is True
    first, val = compiled_run.train_events()[0]["train/loss"], compiled_run.val_losses()[-1][1]
    assert val < first - 0.5, f"val loss {val} did not fall from the first logged loss {first}"
    assert_no_skipped_steps(compiled_run)
    state = compiled_run.checkpoint()
    assert not [k for k in state["model"] if "_orig_mod" in k]
    GPT(GPTConfig(**state["model_config"])).load_state_dict(state["model"])  # strict
    generated = [p for p in (background.root / "inductor").rglob("*.py") if p.is_file()]
    code = "\n".join(p.read_text(errors="replace") for p in generated)
    kernel = "@triton.jit" if ON_GPU else "cpp_fused"
    assert kernel in code, f"no {kernel} kernel among inductor's {len(generated)} output files"
