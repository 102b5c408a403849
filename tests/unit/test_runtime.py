"""train.dtype=auto on CPU: bf16 only where the CPU has fast bf16 matmul."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from minigpt import runtime


@pytest.fixture
def no_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_auto_picks_bf16_on_cpus_with_fast_bf16(
    monkeypatch: pytest.MonkeyPatch, no_amx: None, flag: str
) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f", flag})
    assert runtime.resolve_dtype("auto", "cpu") == torch.bfloat16


def test_auto_picks_float32_on_cpus_without_fast_bf16(
    monkeypatch: pytest.MonkeyPatch, no_amx: None
) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f", "fma"})
    assert runtime.resolve_dtype("auto", "cpu") == torch.float32


def test_torch_reporting_amx_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", set)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16_AMX")
    assert runtime.cpu_has_fast_bf16()


def test_explicit_dtypes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"amx_bf16"})
    assert runtime.resolve_dtype("float32", "cpu") == torch.float32
    assert runtime.resolve_dtype("bfloat16", "cpu") == torch.bfloat16


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Fake CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 avx512f amx_bf16
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2
"""


def fake_proc_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    """Serve `files` to the runtime module's `open`; any other path does not exist."""

    def fake_open(path, *args, **kwargs):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(runtime, "open", fake_open, raising=False)


def test_cpu_flags_are_the_first_flags_line_of_proc_cpuinfo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_proc_files(monkeypatch, {"/proc/cpuinfo": CPUINFO})
    assert runtime._cpu_flags() == {"fpu", "sse2", "avx2", "avx512f", "amx_bf16"}
    assert runtime.cpu_has_fast_bf16()


def test_cpu_flags_are_empty_without_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc_files(monkeypatch, {})
    assert runtime._cpu_flags() == set()


def test_auto_keeps_small_models_in_float32_even_with_amx(
    monkeypatch: pytest.MonkeyPatch, no_amx: None
) -> None:
    """bf16 autocast slows narrow models down on CPU (0.8x at width 128): auto keeps fp32 there
    and takes bf16 from width 256 (1.79x measured on an AVX512-BF16 CPU)."""
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"amx_bf16"})
    assert runtime.resolve_dtype("auto", "cpu", d_model=128) == torch.float32
    assert runtime.resolve_dtype("auto", "cpu", d_model=256) == torch.bfloat16
    assert runtime.resolve_dtype("auto", "cpu", d_model=384) == torch.bfloat16


def test_seconds_since_launch_counts_from_process_start_not_from_import() -> None:
    code = (
        "import time; time.sleep(0.6); "
        "from minigpt.runtime import seconds_since_launch; print(seconds_since_launch())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0.6 <= float(out.stdout) < 30


def test_check_fits_counts_fsdp_shards_and_the_full_weights_built_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 bytes a parameter on one rank; a quarter of it on 4 fsdp ranks, but never less than
    the 4 bytes a parameter of the full fp32 weights each rank builds before sharding."""
    from minigpt.config import ConfigError
    from minigpt.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, d_model=64)
    params = GPT.param_count_formula(cfg)
    monkeypatch.setattr(runtime, "device_memory", lambda device: 8 * params)
    with pytest.raises(ConfigError, match=r"GiB for weights, gradients and AdamW state, more"):
        runtime.check_fits(cfg, torch.device("cpu"))
    runtime.check_fits(cfg, torch.device("cpu"), shards=2)  # 8 bytes a parameter: fits
    monkeypatch.setattr(runtime, "device_memory", lambda device: 4 * params - 1)
    with pytest.raises(ConfigError, match=r"\(sharded over 8 ranks\)"):
        runtime.check_fits(cfg, torch.device("cpu"), shards=8)


def test_peak_memory_is_at_least_what_the_process_holds_now() -> None:
    held = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    now = runtime.memory_metrics(torch.device("cpu"))["memory/rss_gb"]
    peak = runtime.peak_memory(torch.device("cpu"))
    # ru_maxrss is sampled by the kernel a little apart from /proc's count: 1% of slack.
    assert set(peak) == {"rss_gb"} and peak["rss_gb"] >= 0.99 * now and now > 64 / 1024
    del held
