"""Sharded checkpoints of train.py under real torchrun (2 gloo ranks, ``train.parallel=fsdp``):
a SIGKILL inside a sharded save, and every reader of a checkpoint taking the shards directly."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt import checkpoint, export, hf
from minigpt.consolidate import consolidate
from tests.conftest import (
    ROOT,
    free_port,
    kill_when,
    run_entry,
    run_torchrun,
    tiny_train_args,
    write_alphabet_corpus,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Rank 0 pauses in DCP's last step of the save of step 20, once every rank has written its
# shard file and before the metadata that completes the folder: the test kills the job there.
PAUSE_IN_SAVE = textwrap.dedent(
    """\
    import pathlib, runpy, sys, time
    import torch.distributed.checkpoint as dcp

    original_finish = dcp.FileSystemWriter.finish

    def finish(self, metadata, results):
        if str(self.path).endswith(".step_0000020.dcp.tmp"):
            pathlib.Path({marker!r}).write_text(str(self.path))
            time.sleep(600)
        return original_finish(self, metadata, results)

    dcp.FileSystemWriter.finish = finish
    sys.argv[0] = {train!r}
    runpy.run_path({train!r}, run_name="__main__")
    """
)


def _args(corpus: Path, run_dir: Path, cache: Path) -> list[str]:
    return tiny_train_args(
        corpus,
        run_dir,
        cache,
        "train.parallel=fsdp",
        "train.batch_size=4",  # x 2 ranks
        "train.max_steps=30",
        "train.ckpt_every=10",
        "train.eval_every=10",
        "train.keep_last=3",
        "train.log_every=5",
        "model.dropout=0.1",
        "train.progress=lines",
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An uninterrupted sharded run, and the corpus and cache it used."""
    root = tmp_path_factory.mktemp("fsdp")
    corpus = write_alphabet_corpus(root / "corpus")
    run_dir = root / "straight"
    result = run_torchrun(2, "train.py", *_args(corpus, run_dir, root / "cache"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, corpus, root / "cache"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)["model"]


def test_a_sharded_run_saves_a_step_file_and_its_shard_folder(
    straight: tuple[Path, Path, Path],
) -> None:
    run_dir, _, _ = straight
    folder = run_dir / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "best.pt",
        "last.pt",
        "step_0000010.dcp",
        "step_0000010.pt",
        "step_0000020.dcp",
        "step_0000020.pt",
        "step_0000030.dcp",
        "step_0000030.pt",
    ]
    assert sorted(p.name for p in (folder / "step_0000030.dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",  # one file a rank
        "__1_0.distcp",
    ]
    meta = checkpoint.load(folder / "last.pt", read="meta")
    assert meta[checkpoint.SHARDS] == "step_0000030.dcp" and "model" not in meta
    assert (folder / "last.pt").stat().st_size < 100_000  # the step file holds no weights


def test_sigkill_inside_a_sharded_save_keeps_the_previous_checkpoint_and_resumes(
    tmp_path: Path, straight: tuple[Path, Path, Path]
) -> None:
    """Killed with both shard files of step 20 written but not the metadata: last.pt is still
    step 10, whose shards load; the resumed run removes the half-written folder and ends
    bit-identical to the uninterrupted run (the same two ranks reduce in the same order)."""
    ref_dir, corpus, cache = straight
    run_dir = tmp_path / "run"
    wrapper, marker = tmp_path / "pause_in_save.py", tmp_path / "in_save"
    train = str(ROOT / "train.py")
    wrapper.write_text(PAUSE_IN_SAVE.format(marker=str(marker), train=train))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    kill_when([*torchrun, str(wrapper), *_args(corpus, run_dir, cache)], tmp_path, marker.exists)
    leftover = Path(marker.read_text())
    assert sorted(p.name for p in leftover.iterdir()) == ["__0_0.distcp", "__1_0.distcp"]
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_0000010.dcp", "step_0000010.pt"]
    assert checkpoint.load(folder / "last.pt")["train_state"]["step"] == 10  # shards and all

    resumed = run_torchrun(2, "train.py", *_args(corpus, run_dir, cache), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 10" in resumed.stdout and f"removed {leftover.name}" in resumed.stdout
    assert not leftover.exists()
    final, expected = _weights(run_dir), _weights(ref_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resume drifted"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_from"].endswith("last.pt")


def test_generate_the_exports_and_consolidate_read_the_shards(
    tmp_path: Path, straight: tuple[Path, Path, Path]
) -> None:
    """No conversion by hand: generate.py and both exports take the step file of a sharded
    checkpoint; consolidate writes the one file with the same weights."""
    run_dir, _, _ = straight
    last = run_dir / "checkpoints" / "last.pt"
    args = [f"checkpoint={last}", "prompt=abc", "max_tokens=20", "device=cpu"]
    sampled = run_entry("generate.py", *args, cwd=tmp_path)
    assert sampled.returncode == 0 and sampled.stdout.startswith("abc"), sampled.stderr[-2000:]
    one = consolidate(last, tmp_path / "one.pt")
    export.export(last, tmp_path / "w.safetensors")
    export.export(last, tmp_path / "hf")
    full = checkpoint.load(one)["model"]
    for model in (
        load_file(tmp_path / "w.safetensors"),
        hf.from_hf(load_file(tmp_path / "hf" / "model.safetensors"), "hf"),
    ):
        assert all(torch.equal(model[k], full[k]) for k in model)
