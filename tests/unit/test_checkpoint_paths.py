"""A path that is not a checkpoint is named for what it is, with the file to give instead: a run
folder, its checkpoints folder, a sweep, or a file of another kind sniffed from its first bytes."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minigpt import checkpoint, weights
from minigpt.checkpoint import CheckpointError
from minigpt.model import GPT, GPTConfig

TINY = GPTConfig(n_layer=1, n_head=1, d_model=8, block_size=16, vocab_size=256)


def model_state() -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "model": GPT(TINY).state_dict(),
        "model_config": asdict(TINY),
        "tokenizer": {"kind": "byte"},
        "train_state": {"step": 40},
    }


def run_folder(path: Path, best: bool = True) -> Path:
    """A run folder as the trainer leaves it: step files, last.pt and (maybe) best.pt."""
    folder = checkpoint.checkpoint_dir(path)
    folder.mkdir(parents=True)
    for step in (20, 40):
        checkpoint.save_step(model_state(), folder, step, keep_last=3, best=best)
    return path


def refusal(path: Path, key: str | None = "checkpoint") -> str:
    with pytest.raises(CheckpointError) as err:
        checkpoint.require_file(path, key=key)
    return str(err.value)


def test_a_run_folder_names_its_checkpoints_and_suggests_best(tmp_path: Path) -> None:
    run = run_folder(tmp_path / "outputs" / "14-03-07")
    assert refusal(run) == (
        f"checkpoint={run} is a run folder; pass one of its checkpoints: "
        f"checkpoint={run}/checkpoints/best.pt "
        "(checkpoints/ holds best.pt, last.pt, step_0000020.pt, step_0000040.pt)"
    )


def test_a_checkpoints_folder_suggests_last_when_no_best_was_saved(tmp_path: Path) -> None:
    folder = run_folder(tmp_path / "run", best=False) / "checkpoints"
    assert refusal(folder) == (
        f"checkpoint={folder} is a checkpoints folder; pass one of its checkpoints: "
        f"checkpoint={folder}/last.pt (checkpoints/ holds last.pt, step_0000020.pt, "
        "step_0000040.pt)"
    )


def test_resume_is_offered_last_pt(tmp_path: Path) -> None:
    run = run_folder(tmp_path / "run")
    message = checkpoint.describe_folder(run, "resume", prefer=checkpoint.LAST)
    assert f"pass one of its checkpoints: resume={run}/checkpoints/last.pt" in message


def test_without_a_setting_the_suggestion_is_a_bare_path(tmp_path: Path) -> None:
    run = run_folder(tmp_path / "run")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(run)
    assert str(err.value) == (
        f"checkpoint {run} is a run folder; pass one of its checkpoints: "
        f"{run}/checkpoints/best.pt "
        "(checkpoints/ holds best.pt, last.pt, step_0000020.pt, step_0000040.pt)"
    )


@pytest.mark.parametrize(
    ("files", "pick"),
    [
        (["step_0000010.pt", "step_0000020.pt", "weights.pt"], "step_0000020.pt"),
        (["model.pt", "notes.txt"], "model.pt"),
        (["model.safetensors", "notes.txt"], "model.safetensors"),
    ],
)
def test_without_best_or_last_the_newest_step_is_suggested_else_any_model_file(
    tmp_path: Path, files: list[str], pick: str
) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"")
    assert f"pass one of its checkpoints: checkpoint={folder}/{pick} (" in refusal(folder)


def test_a_sweep_folder_and_a_day_of_runs_point_at_a_run_inside(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    (sweep / "0").mkdir(parents=True)  # failed before its first save
    run_folder(sweep / "10")
    run_folder(sweep / "2")  # the first run that saved, by number: 2 before 10
    assert refusal(sweep).endswith(
        f"is a sweep folder; pass a checkpoint of one of its runs: "
        f"checkpoint={sweep}/2/checkpoints/best.pt"
    )
    day = tmp_path / "2026-11-25"
    run_folder(day / "09-00-00")
    run_folder(day / "14-03-07")
    assert refusal(day) == (
        f"checkpoint={day} is a folder of runs; pass a checkpoint of one of its runs: "
        f"checkpoint={day}/14-03-07/checkpoints/best.pt"  # the newest
    )


def test_a_run_without_checkpoints_and_a_plain_folder_say_so(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "run.json").write_text("{}")  # written before checkpoints/ exists
    for run in ("run", "early"):
        assert refusal(tmp_path / run).endswith(
            "is a run folder that has saved no checkpoint yet; wait for its first save"
        )
    (tmp_path / "notes").mkdir()
    assert refusal(tmp_path / "notes") == (
        f"checkpoint={tmp_path}/notes is a folder; give a checkpoint file (.pt) or a "
        ".safetensors export"
    )


def test_a_missing_file_lists_what_its_folder_holds(tmp_path: Path) -> None:
    run = run_folder(tmp_path / "run", best=False)
    assert refusal(run / "checkpoints" / "best.pt") == (
        f"checkpoint={run}/checkpoints/best.pt does not exist; {run}/checkpoints holds "
        "last.pt, step_0000020.pt, step_0000040.pt"
    )


def test_a_missing_file_sums_up_many_step_files_and_lists_other_model_files(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    steps = ["step_0000010.pt", "step_0000020.pt", "step_0000030.pt"]
    for name in ["last.pt", "best.pt", *steps, "export.pt", "model.safetensors", "notes.txt"]:
        (folder / name).write_bytes(b"")
    (folder / ".last.pt.x1.tmp").write_bytes(b"")
    assert refusal(folder / "step_0000040.pt") == (
        f"checkpoint={folder}/step_0000040.pt does not exist; {folder} holds best.pt, last.pt, "
        "3 step files (step_0000010.pt to step_0000030.pt), export.pt, model.safetensors"
    )


def foreign_file(path: Path, kind: str) -> Path:
    """A file of each kind people mistake for a checkpoint."""
    if kind == "text":
        path.write_text("hello world\nmore text\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hi")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    elif kind == "torch_of_another_program":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif kind == "bare_state_dict":
        torch.save(GPT(TINY).state_dict(), path)
    elif kind == "foreign_safetensors":
        save_file({"w": torch.zeros(2)}, path)
    elif kind == "lfs_pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("text", "is not a model file: it is a text file (it starts 'hello world')"),
        ("empty", "is truncated or corrupted (an empty file: 0 bytes)"),
        ("png", "is not a model file: it is a PNG image"),
        ("zip", "is not a model file: it is a zip archive of notes.txt, not a torch file"),
        ("pickle", "is not a model file: it is a Python pickle, not a file torch.save wrote"),
        (
            "torch_of_another_program",
            "is not a minigpt checkpoint: it is a torch file of another program "
            "(its keys: state_dict, epoch)",
        ),
        (
            "bare_state_dict",
            "is not a minigpt checkpoint: it is a bare state dict (17 tensors), without the "
            "model config or tokenizer",
        ),
        (
            "foreign_safetensors",
            "is not a minigpt safetensors export: its metadata has format=None",
        ),
        ("lfs_pointer", "is not a model file: it is a Git LFS pointer, not the file itself"),
    ],
)
def test_a_file_of_another_kind_is_named_for_what_it_is(
    tmp_path: Path, kind: str, says: str
) -> None:
    path = foreign_file(tmp_path / "model.pt", kind)
    with pytest.raises(CheckpointError) as err:
        weights.load_model(path)
    message = str(err.value)
    assert says in message and str(path) in message
    assert "\n" not in message and "refused" not in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_a_model_file_loads_whatever_its_suffix(tmp_path: Path, suffix: str) -> None:
    """The bytes say which format it is: an export renamed .pt, a checkpoint renamed .bin."""
    ckpt = tmp_path / "last.pt"
    checkpoint.save(model_state(), ckpt)
    export = tmp_path / "model.safetensors"
    weights.write_safetensors(checkpoint.load(ckpt), export)
    for source in (ckpt, export):
        renamed = tmp_path / f"{source.stem}_copy{suffix}"
        renamed.write_bytes(source.read_bytes())
        model, _, _ = weights.load_model(renamed)
        assert model.config == TINY


def test_resume_from_an_export_says_it_holds_weights_only(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.pt"
    checkpoint.save(model_state(), ckpt)
    export = tmp_path / "model.safetensors"
    weights.write_safetensors(checkpoint.load(ckpt), export)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(export)
    assert str(err.value) == (
        f"{export} is not a minigpt checkpoint: it is a minigpt safetensors export "
        "(weights only, no training state)"
    )


def test_a_model_saved_whole_is_named_by_its_class_and_never_run(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert "is a torch file holding torch.nn.modules.linear.Linear objects" in str(err.value)
    assert "nothing in it ran" in str(err.value)


@pytest.mark.parametrize(
    ("state", "what"),
    [
        (torch.zeros(2, 3), "a torch file holding one tensor of shape [2, 3]"),
        ([1, 2], "a torch file holding list data"),
        ({"format": "nanogpt", "step": 1}, "a torch file of format 'nanogpt', not 'minigpt'"),
        (
            {"w": torch.zeros(1)},
            "a bare state dict (1 tensor), without the model config or tokenizer",
        ),
        (
            {"w": torch.zeros(1), "b": torch.zeros(1)},
            "a bare state dict (2 tensors), without the model config or tokenizer",
        ),
        (dict.fromkeys("abcde", 0), "a torch file of another program (its keys: a, b, c, d, e)"),
        (
            dict.fromkeys("abcdef", 0),
            "a torch file of another program (its keys: a, b, c, d, e, ...)",
        ),
    ],
)
def test_a_torch_file_of_another_kind_says_what_it_holds(
    tmp_path: Path, state: object, what: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == f"{path} is not a minigpt checkpoint: it is {what}"
