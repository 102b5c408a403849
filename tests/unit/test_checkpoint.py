"""Checkpoints are atomic, safe to load, and refuse what is not ours."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt import checkpoint, export, filekinds, weights
from minigpt.checkpoint import CheckpointError
from minigpt.model import GPT, GPTConfig


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


def test_best_and_last_are_the_step_file_itself_not_copies(tmp_path: Path) -> None:
    step = checkpoint.save_step({"step": 5}, tmp_path, 5, keep_last=1, best=True)
    assert os.path.samefile(tmp_path / "best.pt", step)
    assert os.path.samefile(tmp_path / "last.pt", step)
    assert step.stat().st_nlink == 3  # one file on disk under three names
    newer = checkpoint.save_step({"step": 6}, tmp_path, 6, keep_last=1, best=False)
    assert not step.exists()  # pruned, but best.pt keeps its data
    assert os.path.samefile(tmp_path / "last.pt", newer)
    assert (tmp_path / "best.pt").stat().st_nlink == 1
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 5


# ---------------------------------------------------------------- model files (minigpt.weights)
TINY = GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=8, vocab_size=256)


def _model_checkpoint(path: Path, **changes: object) -> Path:
    """A checkpoint with the keys the trainer writes that matter to a model file."""
    torch.manual_seed(0)
    state = {
        "model": GPT(TINY).state_dict(),
        "model_config": asdict(TINY),
        "tokenizer": {"kind": "byte"},
        "train_state": {"step": 7},
        **changes,
    }
    checkpoint.save(state, path)
    return path


def test_a_checkpoint_and_its_export_load_as_the_same_model(tmp_path: Path) -> None:
    ckpt = _model_checkpoint(tmp_path / "last.pt")
    out = export.export(ckpt, fmt="minigpt")
    assert out == tmp_path / "last.minigpt.safetensors"
    (a, tok, _), (b, _, _) = weights.load_model(ckpt), weights.load_model(out)
    assert tok.name == "byte" and not a.training
    assert a.lm_head.weight is a.transformer.wte.weight  # still tied after loading
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_huge_claim_fails_on_the_count_before_any_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []
    monkeypatch.setattr(weights, "GPT", type("Spy", (GPT,), {"__init__": built.append}))
    claim = {**asdict(TINY), "n_layer": 48, "d_model": 4096, "n_head": 32}
    ckpt = _model_checkpoint(tmp_path / "last.pt", model_config=claim)
    with pytest.raises(CheckpointError) as err:
        weights.load_model(ckpt)
    assert str(err.value) == (
        f"{ckpt}: the config implies 9,667,321,856 parameters but the file holds 10,816"
    )
    assert built == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_head": 3}, "model_config.n_head=3 must divide model_config.d_model=16"),
        ({"n_layer": True}, "model_config.n_layer=True must be an int"),
        ({"d_model": "16"}, "model_config.d_model='16' must be an int"),
        ({"bias": 1}, "model_config.bias=1 must be a bool"),
        ({"dropout": 1.5}, "model_config.dropout=1.5 must be in [0, 1)"),
        ({"block_size": 0}, "model_config.block_size=0 must be >= 1"),
        ({"name": "tiny"}, "model_config.name is not a model setting"),
    ],
)
def test_the_model_config_obeys_the_rules_of_a_users_config(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    ckpt = _model_checkpoint(tmp_path / "last.pt", model_config={**asdict(TINY), **change})
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}: {message}")):
        weights.load_model(ckpt)


def test_a_missing_setting_and_a_broken_tokenizer_are_named(tmp_path: Path) -> None:
    config = {k: v for k, v in asdict(TINY).items() if k != "vocab_size"}
    ckpt = _model_checkpoint(tmp_path / "a.pt", model_config=config)
    with pytest.raises(CheckpointError, match="model_config lacks vocab_size$"):
        weights.load_model(ckpt)
    ckpt = _model_checkpoint(tmp_path / "b.pt", tokenizer={"kind": "bpe", "json": "{"})
    with pytest.raises(CheckpointError, match=r"b\.pt: tokenizer: the saved BPE tokenizer does"):
        weights.load_model(ckpt)


def test_tensors_must_match_the_config_by_name_and_shape(tmp_path: Path) -> None:
    tensors = GPT(TINY).state_dict()
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].t()  # same count
    ckpt = _model_checkpoint(tmp_path / "a.pt", model=tensors)
    with pytest.raises(CheckpointError, match=r"wpe.weight has shape \[16, 8\], the config needs"):
        weights.load_model(ckpt)
    tensors = GPT(TINY).state_dict()
    tensors["transformer.wpe.renamed"] = tensors.pop("transformer.wpe.weight")
    ckpt = _model_checkpoint(tmp_path / "b.pt", model=tensors)
    with pytest.raises(CheckpointError, match="tensor transformer.wpe.weight is missing"):
        weights.load_model(ckpt)


def test_checkpoint_never_imports_the_foreign_formats() -> None:
    """The formats import checkpoint, never the other way round (STYLE: one home per format);
    checkpoint's one minigpt import is filekinds, a leaf that imports no minigpt module."""

    def minigpt_imports(module: Any) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        return {m for m in imported if m.startswith("minigpt")}

    assert minigpt_imports(checkpoint) == {"minigpt.filekinds"}
    assert not minigpt_imports(filekinds)


@pytest.mark.parametrize("reader", [checkpoint.load, weights.load_model])
def test_a_folder_or_a_device_is_not_a_checkpoint(tmp_path: Path, reader: Any) -> None:
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path} is a folder; give a"):
        reader(tmp_path)
    with pytest.raises(CheckpointError, match="^checkpoint /dev/zero is not a regular file"):
        reader(Path("/dev/zero"))
    with pytest.raises(CheckpointError, match="does not exist$"):
        reader(tmp_path / "model.safetensors")
