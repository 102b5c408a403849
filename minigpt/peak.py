"""The peak FLOP/s that MFU is measured against: a datasheet figure, or measured once and cached.

A CPU has no datasheet figure we can trust (clocks, vector units and threads vary), so its peak
is the speed of a large matmul. Timed for 0.05 s at start-up it varied 6x between runs on one
machine; here it is the best of many matmuls timed over 1.5 s after a warm-up, measured once per
machine and kept in ``peak_flops.json`` of the machine's cache folder (``$MINIGPT_CACHE_DIR`` or
``~/.cache/minigpt``, whatever a run's ``data.cache_dir``), so every run on the machine is
compared against the same figure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from minigpt.config import DEFAULT_CACHE_DIR

# Dense (no sparsity) peaks from the vendors' datasheets, in FLOP/s (H100/H200: the SXM parts).
# bf16/fp16 on tensor cores; float32 matmuls on TF32 tensor cores where torch allows TF32
# (torch.set_float32_matmul_precision("high"); not by default), else on the plain FP32 units,
# 7x slower on a Hopper: measuring a float32 run against the TF32 figure understated its MFU 7x.
# The most specific name wins: "NVIDIA H100 PCIe" is the PCIe part, "NVIDIA H100 80GB HBM3" SXM.
DATASHEET_PEAK = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "V100": 125e12,
    "L40S": 362e12,
}
DATASHEET_TF32 = {  # V100: none
    "H100 PCIe": 378e12,
    "H100 NVL": 418e12,
    "H200 NVL": 418e12,
    "H100": 494e12,
    "H200": 494e12,
    "A100": 156e12,
    "L40S": 183e12,
}
DATASHEET_FP32 = {
    "H100 PCIe": 51e12,
    "H100 NVL": 60e12,
    "H200 NVL": 60e12,
    "H100": 67e12,
    "H200": 67e12,
    "A100": 19.5e12,
    "V100": 15.7e12,
    "L40S": 91.6e12,
}
CACHE_FILE = "peak_flops.json"
MATMUL_N = 1024  # large enough to run at the vector units' speed, small enough to warm fast
# A GPU finishes a 1024² matmul in microseconds, launch included: timed alone it read a fraction
# of the GPU's peak (and MFU several times too high). 8192² keeps its tensor cores busy.
GPU_MATMUL_N = 8192


def machine_cache_dir() -> Path:
    """``$MINIGPT_CACHE_DIR`` (an exported but empty one counts as unset), else ~/.cache/minigpt:
    the peak is a fact of the machine, not of a run's data, so it is not kept in data.cache_dir."""
    return Path(os.environ.get("MINIGPT_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def peak_flops(
    device: torch.device, dtype: torch.dtype, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[float, str]:
    """The FLOP/s that MFU is measured against, and where the figure came from.

    GPUs known to us use the datasheet's dense peak; anything else is measured
    (:func:`measure_matmul_flops`), once per machine when ``cache_dir`` is given: the figure is
    read back from there by every later run with the same hardware, threads, dtype and torch.
    """
    if device.type == "cuda":
        known = datasheet_peak(torch.cuda.get_device_name(device), dtype)
        if known is not None:
            return known
    key = machine_key(device, dtype)
    path = Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else None
    cached = read_cache(path).get(key) if path is not None else None
    if _valid(cached):
        return float(cached["flops"]), f"{cached['source']}, cached {path}"
    start = time.perf_counter()
    flops = measure_matmul_flops(device, dtype)
    source = f"measured {time.perf_counter() - start:.1f} s on {key}"
    if path is None:
        return flops, source
    try:
        write_cache(path, key, {"flops": flops, "source": source, "at": _now()})
    except OSError as err:
        return flops, f"{source}, not cached ({err.strerror or err}: {path})"
    return flops, f"{source}, cached {path}"


def datasheet_peak(gpu_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """The datasheet's peak for matmuls in ``dtype`` on the GPU named ``gpu_name``, and its
    source; None for a GPU not listed (its peak is then measured)."""
    key = next(
        (key for key in sorted(DATASHEET_PEAK, key=len, reverse=True) if key in gpu_name), None
    )
    if key is None:
        return None
    if dtype != torch.float32:
        return DATASHEET_PEAK[key], f"datasheet {key}"
    if key in DATASHEET_TF32 and tf32_matmuls():
        return DATASHEET_TF32[key], f"datasheet {key} TF32"
    return DATASHEET_FP32[key], f"datasheet {key} FP32"


def tf32_matmuls() -> bool:
    """Whether torch lets cuBLAS run float32 matmuls on TF32 tensor cores (off by default)."""
    with contextlib.suppress(AttributeError, RuntimeError):  # torch >= 2.9 reads either API's
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    with contextlib.suppress(RuntimeError):
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return False


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, seconds: float = 1.5
) -> float:
    """FLOP/s of an n×n matmul in ``dtype``: the fastest of the single matmuls timed over
    ``seconds``, after a warm-up of a sixth of that (n: MATMUL_N on CPU, GPU_MATMUL_N on GPU).

    The fastest, not the mean: other work on the machine only ever slows a matmul down, so on a
    busy machine the best of many short timings is the one that comes back the same.
    """
    n = n or (GPU_MATMUL_N if device.type == "cuda" else MATMUL_N)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _timings(a, b, device, seconds / 6)  # clocks, caches, the library's thread pool
    return 2 * n**3 / min(_timings(a, b, device, seconds))


def _timings(a: torch.Tensor, b: torch.Tensor, device: torch.device, seconds: float) -> list[float]:
    """Seconds of each matmul done in ``seconds`` (at least three)."""
    out: list[float] = []
    end = time.perf_counter() + seconds
    while len(out) < 3 or time.perf_counter() < end:
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that a timing measures the work and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What decides the figure: the processor, the threads used, the dtype and torch's version."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"{what}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what the platform says)."""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f,
    ):
        for line in f:
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine() or "unknown CPU"


def read_cache(path: Path | None) -> dict[str, Any]:
    """The cached figures by machine key; {} when missing or damaged (they are measured again)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key``, atomically: a reader sees the old file or the new, whole."""
    data = {k: v for k, v in read_cache(path).items() if _valid(v)}
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _valid(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
        return False
    flops = entry.get("flops")
    return isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
