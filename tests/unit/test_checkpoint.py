"""Checkpoints are atomic, safe to load, and refuse what is not ours."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from minigpt.checkpoint import CheckpointError


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "ckpts" / "last.pt"
    checkpoint.save({"step": 3, "w": torch.arange(4.0)}, path)
    state = checkpoint.load(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2, "bad": Unsaveable()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1, "w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        checkpoint.load(path)


def test_foreign_file_is_not_a_minigpt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a minigpt checkpoint"):
        checkpoint.load(path)


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"format": "minigpt", "version": 1, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()


def test_best_is_a_link_to_last_not_a_second_write(tmp_path: Path) -> None:
    checkpoint.save({"step": 5}, tmp_path / "last.pt")
    checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    checkpoint.save({"step": 6}, tmp_path / "last.pt")
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 5
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 6


def test_resolve_resume(tmp_path: Path) -> None:
    assert checkpoint.resolve_resume("auto", tmp_path) is None
    assert checkpoint.resolve_resume("never", tmp_path) is None
    last = checkpoint.checkpoint_dir(tmp_path) / "last.pt"
    checkpoint.save({"step": 1}, last)
    assert checkpoint.resolve_resume("auto", tmp_path) == last
    assert checkpoint.resolve_resume("never", tmp_path) is None
    assert checkpoint.resolve_resume(str(last), "/elsewhere") == last
    with pytest.raises(CheckpointError, match="resume="):
        checkpoint.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
