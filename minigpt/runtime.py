"""Device facts the trainer needs: precision, autocast, memory, versions (peak FLOP/s: peak.py)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from importlib import metadata
from typing import Any

import torch

from minigpt.config import ConfigError
from minigpt.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# /proc/cpuinfo flags of CPUs whose bf16 matmul beats fp32 (AMX tiles, AVX-512 BF16 dot products).
FAST_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


# bf16 autocast on CPU pays off from width 256: tokens/s bf16 / fp32 measured 0.8x at width 128 and
# 2.3x at 384 on an AMX CPU (issue 6), and 1.09x at 128, 1.79x at 256 (the default `mini`; 1.66x
# end to end with the same val loss, 1.6851 vs 1.6852) and 2.26x at 384 on an AVX512-BF16 EPYC.
# At 128 elementwise work and casts dominate.
CPU_BF16_MIN_WIDTH = 256


def resolve_dtype(name: str, device_type: str, d_model: int | None = None) -> torch.dtype:
    """``train.dtype=auto``: bf16 on CUDA GPUs that have it, else fp16; on CPU bf16 only where
    the CPU has fast bf16 matmul (:func:`cpu_has_fast_bf16`) and the model is wide enough for it
    to pay (``d_model >= CPU_BF16_MIN_WIDTH``), fp32 otherwise."""
    if name != "auto":
        return DTYPES[name]
    if device_type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    wide = d_model is None or d_model >= CPU_BF16_MIN_WIDTH
    return torch.bfloat16 if wide and cpu_has_fast_bf16() else torch.float32


def cuda_has_native_bf16() -> bool:
    """Whether the current GPU computes in bf16 itself (Ampere, sm_80, and newer; ROCm GPUs).

    Not ``torch.cuda.is_bf16_supported()``: it also says yes where bf16 is only emulated
    (V100, T4; ``including_emulation=True`` is its default), many times slower than fp16 there.
    """
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability()[0] >= 8


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 (AMX or AVX512-BF16)."""
    if _cpu_flags() & FAST_BF16_FLAGS:
        return True
    with contextlib.suppress(AttributeError, RuntimeError):
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    return False


def _cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler_missing(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot build kernels here (no C/C++ compiler), else None.

    Inductor compiles C++ for CPU kernels and Triton builds C launchers for GPU kernels; without
    a compiler the first step fails after a 100-line traceback. Asking first gives one line.
    """
    if device_type == "cpu":
        try:
            from torch._inductor import cpp_builder, exc

            cpp_builder.get_cpp_compiler()  # the search inductor itself does ($CXX, then g++)
            return None
        except (ImportError, AttributeError):
            found = shutil.which(os.environ.get("CXX", "g++"))
            return None if found else f"no C++ compiler ({os.environ.get('CXX', 'g++')})"
        except exc.InvalidCxxCompiler:
            return f"no C++ compiler (looked for {os.environ.get('CXX', 'g++')})"
    cc = os.environ.get("CC")
    if cc:
        return None if shutil.which(cc) else f"no C compiler (CC={cc})"
    found = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    return None if found else "no C compiler (cc, gcc or clang) for Triton"


def autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes; float32 runs without autocast at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory a model on ``device`` can use at most: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says an allocation failed (numpy, torch on CPU or on a GPU)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "DefaultCPUAllocator" in text or "can't allocate memory" in text
    )


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Memory in GiB, for the trackers: the process's resident set, and on a GPU what PyTorch
    holds now and at its peak (the figure that decides whether a bigger batch fits)."""
    out = {}
    rss = _rss_bytes()
    if rss is not None:
        out["memory/rss_gb"] = rss / 2**30
    if device.type == "cuda":
        out["memory/gpu_allocated_gb"] = torch.cuda.memory_allocated(device) / 2**30
        out["memory/gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["memory/gpu_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
    return out


def seconds_since_launch() -> float | None:
    """How long this process has existed (Linux; None elsewhere): start-up cost includes the
    interpreter and every import, which a timer started inside the program cannot see."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22 (starttime, clock ticks after boot) follows the ")" that ends the name.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_memory(device: torch.device) -> dict[str, float]:
    """High-water marks in GiB, for run.json: the process's peak resident set and, on a GPU,
    the most PyTorch held allocated at once (this rank's; under fsdp every rank holds about
    the same), the figure to set against the dry run's plan."""
    out = {}
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_gb"] = peak * (1 if sys.platform == "darwin" else 1024) / 2**30  # KiB on Linux
    except ImportError:  # Windows
        pass
    if device.type == "cuda":
        out["gpu_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def versions() -> dict[str, str]:
    """Versions that decide whether two runs are comparable."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("minigpt", "torch", "hydra-core", "omegaconf", "datasets", "tokenizers", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def check_fits(gpt_cfg: Any, device: torch.device, shards: int = 1) -> None:
    """Refuse a model whose weights, gradients and AdamW moments (16 bytes a parameter in fp32)
    alone exceed the device's memory, before allocating any of it. Under ``train.parallel=fsdp``
    that state is split over ``shards`` ranks, but each still builds the full fp32 weights once
    before sharding them."""
    params = GPT.param_count_formula(gpt_cfg)
    need, have = max(16 * params // shards, 4 * params), device_memory(device)
    if have is not None and need > have:
        split = f" (sharded over {shards} ranks)" if shards > 1 else ""
        raise ConfigError(
            f"model.* describe {params / 1e6:,.1f}M parameters: about {need / 2**30:,.1f} GiB for "
            f"weights, gradients and AdamW state{split}, more than the {have / 2**30:,.1f} GiB of "
            f"{device.type}; use a smaller model (model.n_layer, model.d_model), or "
            "train.parallel=fsdp over more GPUs"
        )


def check_compiler(compile: bool, device: torch.device) -> None:
    """Refuse train.compile=true where torch.compile cannot build kernels."""
    missing = compiler_missing(device.type) if compile else None
    if missing:
        raise ConfigError(
            f"train.compile=true needs a compiler for torch.compile and there is {missing}; "
            "install one (apt-get install g++, or module load gcc) or set train.compile=false"
        )


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse fp16 on CPU (autocast and GradScaler are for CUDA there)."""
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("train.dtype=float16 is for CUDA; on CPU use float32 or bfloat16")
