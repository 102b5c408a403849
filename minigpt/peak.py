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

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, in FLOP/s.
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "L40S": 362e12}
CACHE_FILE = "peak_flops.json"
MATMUL_N = 1024  # large enough to run at the vector units' speed, small enough to warm fast


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
        name = torch.cuda.get_device_name(device)
        for key, peak in DATASHEET_PEAK.items():
            if key in name:
                return (peak if dtype != torch.float32 else peak / 2), f"datasheet {key}"
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


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = MATMUL_N, seconds: float = 1.5
) -> float:
    """FLOP/s of an n×n matmul in ``dtype``: the fastest of the single matmuls timed over
    ``seconds``, after a warm-up of a sixth of that.

    The fastest, not the mean: other work on the machine only ever slows a matmul down, so on a
    busy machine the best of many short timings is the one that comes back the same.
    """
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
