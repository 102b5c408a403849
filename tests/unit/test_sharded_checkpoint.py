"""Sharded checkpoints (``train.parallel=fsdp``): a step file naming a DCP shard folder.

One process writes the shards here (DCP needs no process group for it); two ranks writing and
resharding are tested in test_parallel.py, a SIGKILL inside a save in tests/distributed.
"""

from __future__ import annotations

import errno
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from minigpt import checkpoint, runfolder
from minigpt.checkpoint import CheckpointError
from minigpt.config import OptimizerConfig
from minigpt.consolidate import consolidate
from minigpt.consolidate import main as consolidate_main
from minigpt.distributed import Dist
from minigpt.model import GPT, GPTConfig
from minigpt.optim import build_optimizer
from minigpt.parallel import Parallel

CONFIG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, dropout=0.0)


def _trained(seed: int = 0) -> tuple[Parallel, torch.optim.Optimizer]:
    """A model after one AdamW step, so the optimizer holds state to save."""
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    return Parallel(model, "ddp", Dist(), torch.float32), optimizer


def _save(folder: Path, step: int, seed: int = 0, best: bool = False, keep_last: int = 3) -> Path:
    parallel, optimizer = _trained(seed)
    tmp = checkpoint.shards_tmp(folder, step)
    parallel.save_shards(optimizer, tmp)
    meta = {
        "model_config": asdict(CONFIG),
        "train_state": {"step": step},
        "param_order": parallel.param_order(optimizer),
        "aliases": parallel.aliases(),
    }
    return checkpoint.save_step(meta, folder, step, keep_last=keep_last, best=best, shards=tmp)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_same_optimizer(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for i, s in b["state"].items():
        assert sorted(a["state"][i]) == sorted(s)
        assert all(torch.equal(a["state"][i][k], v) for k, v in s.items()), i


def test_a_sharded_save_publishes_its_folder_and_load_consolidates_it(tmp_path: Path) -> None:
    path = _save(tmp_path, 1, best=True)
    assert _names(tmp_path) == ["best.pt", "last.pt", "step_0000001.dcp", "step_0000001.pt"]
    assert (tmp_path / "step_0000001.dcp" / ".metadata").is_file()
    parallel, optimizer = _trained()
    state = checkpoint.load(tmp_path / "last.pt")
    assert state[checkpoint.SHARDS] == "step_0000001.dcp"
    expected = parallel.model.state_dict()
    assert list(state["model"]) == list(expected)
    assert all(torch.equal(state["model"][k], v) for k, v in expected.items())
    _assert_same_optimizer(state["optimizer"], optimizer.state_dict())  # index-keyed, as DDP's
    GPT(CONFIG).load_state_dict(state["model"])  # strict: every key, full shapes
    model_only = checkpoint.load(path, read="model")
    assert "model" in model_only and "optimizer" not in model_only
    meta = checkpoint.load(path, read="meta")
    assert "model" not in meta and meta["train_state"] == {"step": 1}


def test_shards_load_into_an_unsharded_model_and_optimizer(tmp_path: Path) -> None:
    """A resume of a sharded run on one process (or under ddp): every tensor read whole."""
    _save(tmp_path, 1, seed=0)
    saved, saved_optimizer = _trained(seed=0)
    fresh = Parallel(GPT(CONFIG), "ddp", Dist(), torch.float32)
    optimizer = build_optimizer(fresh.model, OptimizerConfig(lr=1e-2))
    fresh.load_shards(optimizer, tmp_path / "step_0000001.dcp")
    for key, value in saved.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    _assert_same_optimizer(optimizer.state_dict(), saved_optimizer.state_dict())


def test_a_step_saved_again_gets_new_shards_and_the_old_ones_go(tmp_path: Path) -> None:
    """After a resume at step 1, a stop before any step saves step 1 again: the new shards
    cannot be renamed over the old, which last.pt names until the new step file replaces it."""
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 1, seed=1)
    assert _names(tmp_path) == ["last.pt", "step_0000001.1.dcp", "step_0000001.pt"]
    state = checkpoint.load(tmp_path / "last.pt")
    assert state[checkpoint.SHARDS] == "step_0000001.1.dcp"
    expected = _trained(seed=1)[0].model.state_dict()
    assert all(torch.equal(state["model"][k], v) for k, v in expected.items())


def test_pruned_steps_take_their_shards_but_best_keeps_its_own(tmp_path: Path) -> None:
    _save(tmp_path, 1, seed=1, best=True, keep_last=2)
    _save(tmp_path, 2, seed=2, keep_last=2)
    _save(tmp_path, 3, seed=3, keep_last=2)
    assert _names(tmp_path) == [
        "best.pt",
        "last.pt",
        "step_0000001.dcp",  # best.pt's
        "step_0000002.dcp",
        "step_0000002.pt",
        "step_0000003.dcp",
        "step_0000003.pt",
    ]
    assert checkpoint.load(tmp_path / "best.pt")["train_state"]["step"] == 1
    _save(tmp_path, 4, seed=4, best=True, keep_last=2)  # a new best: step 1's shards go
    assert "step_0000001.dcp" not in _names(tmp_path) and "step_0000002.dcp" not in _names(tmp_path)
    assert checkpoint.load(tmp_path / "best.pt")["train_state"]["step"] == 4


def test_missing_or_short_shards_are_refused_and_a_resume_takes_the_step_before(
    tmp_path: Path,
) -> None:
    folder = checkpoint.checkpoint_dir(tmp_path)
    _save(folder, 1)
    _save(folder, 2)
    shard = next((folder / "step_0000002.dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated or corrupted \(.*distcp is missing or"):
        checkpoint.load(folder / "last.pt", read="meta")
    said: list[str] = []
    path, state = runfolder.newest_loadable(tmp_path, said.append)
    assert path.name == "step_0000001.pt" and state["train_state"]["step"] == 1
    assert "last.pt: checkpoint" in said[0] and "step_0000001.pt" in said[0]

    (folder / "step_0000001.dcp").rename(tmp_path / "moved.dcp")
    with pytest.raises(CheckpointError, match=r"sharded and its shards, .* are missing.*copy both"):
        checkpoint.load(folder / "step_0000001.pt")


def test_remove_leftovers_deletes_killed_sharded_saves_and_unnamed_shards(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    killed = checkpoint.shards_tmp(tmp_path, 2)  # killed while the ranks wrote
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"x" * 10)
    orphan = tmp_path / "step_0000003.dcp"  # killed between its rename and its step file
    orphan.mkdir()
    (orphan / ".metadata").write_bytes(b"x")
    removed = checkpoint.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".step_0000002.dcp.tmp", "step_0000003.dcp"]
    assert _names(tmp_path) == ["last.pt", "step_0000001.dcp", "step_0000001.pt"]
    checkpoint.load(tmp_path / "last.pt")


def test_consolidate_writes_the_single_file_a_ddp_run_saves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _save(tmp_path / "run", 1)
    out = tmp_path / "one.pt"
    assert consolidate_main([str(path), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    one, sharded = checkpoint.load(out), checkpoint.load(path)
    assert checkpoint.SHARDS not in one and "param_order" not in one
    assert all(torch.equal(one["model"][k], v) for k, v in sharded["model"].items())
    _assert_same_optimizer(one["optimizer"], sharded["optimizer"])
    assert consolidate_main([str(path), str(out)]) == 2  # exists: --force
    assert "exists; pass --force" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="already a single-file checkpoint"):
        consolidate(out, tmp_path / "two.pt")


def test_a_full_disk_in_a_sharded_save_is_an_os_error_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP gathers every rank's failure into one CheckpointException; the trainer reports a
    full disk (an OSError) in one line, as for a single-file save."""
    import torch.distributed.checkpoint.filesystem as dcp_files

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_files, "_write_files_from_queue", full)
    parallel, optimizer = _trained()
    tmp = checkpoint.shards_tmp(tmp_path, 1)
    with pytest.raises(OSError, match="No space left on device") as caught:
        parallel.save_shards(optimizer, tmp)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp)


def test_shards_of_another_shape_are_a_checkpoint_error(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    wider = Parallel(GPT(replace(CONFIG, d_model=32)), "ddp", Dist(), torch.float32)
    optimizer = build_optimizer(wider.model, OptimizerConfig())
    with pytest.raises(CheckpointError, match=r"the shards in .*step_0000001\.dcp cannot be read"):
        wider.load_shards(optimizer, tmp_path / "step_0000001.dcp")


def test_a_shard_folder_given_as_the_checkpoint_names_its_step_file(tmp_path: Path) -> None:
    _save(tmp_path, 1, best=True)
    message = checkpoint.describe_folder(tmp_path / "step_0000001.dcp", "checkpoint")
    assert message == (
        f"checkpoint={tmp_path}/step_0000001.dcp is the shard folder of a sharded checkpoint; "
        f"pass the file that names it: checkpoint={tmp_path}/best.pt"
    )


def test_an_optimizer_saved_before_its_first_step_loads_without_state(tmp_path: Path) -> None:
    """DCP's state dict gives AdamW a zero step to make its state: kept, the first real step
    would be AdamW's second (another bias correction) and the run would drift."""
    torch.manual_seed(0)
    parallel = Parallel(GPT(CONFIG), "ddp", Dist(), torch.float32)
    optimizer = build_optimizer(parallel.model, OptimizerConfig())
    tmp = checkpoint.shards_tmp(tmp_path, 0)
    parallel.save_shards(optimizer, tmp)
    assert optimizer.state_dict()["state"] == {}  # left as it was
    meta = {"param_order": parallel.param_order(optimizer), "aliases": parallel.aliases()}
    path = checkpoint.save_step(meta, tmp_path, 0, keep_last=1, best=False, shards=tmp)
    assert checkpoint.load(path)["optimizer"] == optimizer.state_dict()
    again = build_optimizer(parallel.model, OptimizerConfig())
    parallel.load_shards(again, tmp_path / "step_0000000.dcp")
    assert again.state_dict()["state"] == {}


def test_the_tied_head_is_written_once_and_read_back_as_the_embedding(tmp_path: Path) -> None:
    """GPT's head is its token embedding: a state dict lists it twice, the shards hold it once
    (for GPT-2 small, 38.6M of 124M parameters written twice), and every reader ties it again."""
    path = _save(tmp_path, 1)
    metadata = dcp.FileSystemReader(str(tmp_path / "step_0000001.dcp")).read_metadata()
    names = set(metadata.state_dict_metadata)
    assert "model.transformer.wte.weight" in names and "model.lm_head.weight" not in names
    model = checkpoint.load(path)["model"]
    assert model["lm_head.weight"] is model["transformer.wte.weight"]
    parallel = Parallel(GPT(CONFIG), "ddp", Dist(), torch.float32)
    optimizer = build_optimizer(parallel.model, OptimizerConfig(lr=1e-2))
    parallel.load_shards(optimizer, tmp_path / "step_0000001.dcp")
    head, embedding = parallel.model.lm_head.weight, parallel.model.transformer.wte.weight
    assert head is embedding and torch.equal(embedding, model["transformer.wte.weight"])
