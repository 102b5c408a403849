"""Device facts the trainer needs: precision, autocast, the hardware's peak FLOP/s, versions."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
from importlib import metadata

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, in FLOP/s.
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "L40S": 362e12}


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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    wide = d_model is None or d_model >= CPU_BF16_MIN_WIDTH
    return torch.bfloat16 if wide and cpu_has_fast_bf16() else torch.float32


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


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The FLOP/s that MFU is measured against, and where the figure came from.

    GPUs known to us use the datasheet's dense peak; anything else is measured with a short
    sustained matmul in ``dtype`` (about 0.1 s), which is the honest peak for a CPU.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DATASHEET_PEAK.items():
            if key in name:
                return (peak if dtype != torch.float32 else peak / 2), f"datasheet {key}"
    return measure_matmul_flops(device, dtype), "measured matmul"


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.05
) -> float:
    """Sustained FLOP/s of an n×n matmul on ``device`` in ``dtype``, timed for ``seconds``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
