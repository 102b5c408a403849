"""The peak MFU is measured against: measured once per machine, cached, and said where from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minigpt import peak

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Counts the measurements, each of which reports 50 GFLOP/s at once."""
    calls: list[torch.dtype] = []

    def fake(device: torch.device, dtype: torch.dtype) -> float:
        calls.append(dtype)
        return 50e9

    monkeypatch.setattr(peak, "measure_matmul_flops", fake)
    return calls


def test_the_peak_is_measured_once_then_read_from_the_cache(
    tmp_path: Path, measured: list[torch.dtype]
) -> None:
    flops, source = peak.peak_flops(CPU, torch.float32, tmp_path)
    assert flops == 50e9 and len(measured) == 1
    assert source.startswith("measured ") and f"cached {tmp_path / peak.CACHE_FILE}" in source
    assert peak.cpu_model() in source
    again, source_again = peak.peak_flops(CPU, torch.float32, tmp_path)
    assert again == 50e9 and len(measured) == 1  # not measured again
    assert source_again == source
    assert [p.name for p in tmp_path.iterdir()] == [peak.CACHE_FILE]  # no temp file left


def test_another_dtype_or_thread_count_is_measured_on_its_own(
    tmp_path: Path, measured: list[torch.dtype], monkeypatch: pytest.MonkeyPatch
) -> None:
    peak.peak_flops(CPU, torch.float32, tmp_path)
    peak.peak_flops(CPU, torch.bfloat16, tmp_path)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)
    peak.peak_flops(CPU, torch.float32, tmp_path)
    assert measured == [torch.float32, torch.bfloat16, torch.float32]
    assert len(json.loads((tmp_path / peak.CACHE_FILE).read_text())) == 3


@pytest.mark.parametrize(
    "damage",
    ["{not json", "[]", '{"KEY": {"flops": -1, "source": "x"}}', '{"KEY": {"flops": "fast"}}'],
    ids=["truncated", "not_a_dict", "negative", "not_a_number"],
)
def test_a_damaged_cache_is_measured_again_not_trusted(
    tmp_path: Path, measured: list[torch.dtype], damage: str
) -> None:
    key = peak.machine_key(CPU, torch.float32)
    (tmp_path / peak.CACHE_FILE).write_text(damage.replace("KEY", key))
    flops, _ = peak.peak_flops(CPU, torch.float32, tmp_path)
    assert flops == 50e9 and len(measured) == 1
    assert json.loads((tmp_path / peak.CACHE_FILE).read_text())[key]["flops"] == 50e9


def test_an_unwritable_cache_still_gives_a_peak_and_says_so(
    tmp_path: Path, measured: list[torch.dtype]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    flops, source = peak.peak_flops(CPU, torch.float32, blocker / "cache")
    assert flops == 50e9 and "not cached" in source


def test_a_real_measurement_is_a_plausible_cpu_figure() -> None:
    flops = peak.measure_matmul_flops(CPU, torch.float32, n=256, seconds=0.1)
    assert 1e8 < flops < 1e14


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, (989e12, "datasheet H100")),
        ("NVIDIA H100 PCIe", torch.bfloat16, (756e12, "datasheet H100 PCIe")),
        ("NVIDIA H200 NVL", torch.float16, (835e12, "datasheet H200 NVL")),
        ("NVIDIA H200", torch.float32, (67e12, "datasheet H200 FP32")),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),
    ],
)
def test_the_datasheet_peak_is_the_named_parts_own(
    name: str, dtype: torch.dtype, expected: tuple[float, str] | None
) -> None:
    """A PCIe or NVL part is slower than the SXM one whose name it contains: MFU against the SXM
    figure would read low. float32 is the plain FP32 rate unless torch allows TF32."""
    assert peak.datasheet_peak(name, dtype) == expected
