"""Checkpoints are atomic, safe to load, and refuse what is not ours."""

from __future__ import annotations

import ast
import errno
import os
import pickle
import re
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt import checkpoint, export, filekinds, weights
from minigpt.checkpoint import CheckpointError
from minigpt.model import GPT, GPTConfig
from tests.conftest import save_payload_checkpoint


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


# ---------------------------------------------------------------- atomic save, in detail
def test_save_writes_through_a_hidden_temp_file_in_the_same_folder(tmp_path, monkeypatch):
    """A rename is atomic only within one file system; remove_leftovers finds `.NAME.*.tmp`."""
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)
    [(tmp, dst)] = renames
    assert dst == path and tmp.parent == tmp_path
    assert tmp.name.startswith(".last.pt.") and tmp.name.endswith(".tmp")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_a_saved_checkpoint_has_the_mode_of_any_new_file(tmp_path, umask, mode):
    """mkstemp makes 0600, but teammates read checkpoints as they read the user's other files."""
    old = os.umask(umask)
    try:
        checkpoint.save({"step": 1}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == mode


def _no_space(obj, f):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_space_in_context(obj, f):
    """What torch.save does: the zip writer's RuntimeError, raised while the OSError is handled."""
    try:
        _no_space(obj, f)
    except OSError:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0")  # noqa: B904


@pytest.mark.parametrize(
    ("failing_save", "cause"), [(_no_space, OSError), (_no_space_in_context, RuntimeError)]
)
def test_a_full_disk_is_an_os_error_naming_the_checkpoint(
    tmp_path, monkeypatch, failing_save, cause
):
    """The ENOSPC behind torch.save's failure, named after the file, is what users act on."""
    monkeypatch.setattr(torch, "save", failing_save)
    path = tmp_path / "last.pt"
    with pytest.raises(OSError) as err:
        checkpoint.save({"step": 1}, path)
    assert type(err.value) is OSError and str(err.value) == (
        f"[Errno 28] No space left on device: '{path}'"
    )
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert type(err.value.__cause__) is cause
    assert list(tmp_path.iterdir()) == []  # the temp file is gone


@pytest.mark.parametrize("tmp_vanished", [False, True])
def test_an_os_error_that_names_its_files_is_passed_on_unchanged(
    tmp_path, monkeypatch, tmp_vanished
):
    """os.replace names both files already; a temp file removed meanwhile is no second error."""
    real_replace = os.replace

    def replace(src, dst):
        if tmp_vanished:
            os.unlink(src)  # e.g. a user cleaning up .tmp files
            real_replace(src, dst)
        raise PermissionError(errno.EACCES, "Permission denied", src, None, dst)

    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "last.pt"
    with pytest.raises(OSError) as err:
        checkpoint.save({"step": 1}, path)
    assert type(err.value) is (FileNotFoundError if tmp_vanished else PermissionError)
    assert err.value.filename.startswith(f"{tmp_path}/.last.pt.")  # the temp file, not path
    assert err.value.__cause__ is None
    assert list(tmp_path.iterdir()) == []


def test_saving_works_where_folders_cannot_be_fsynced(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL); the file itself is still safe."""
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.save_step({"step": 1}, tmp_path, 1, keep_last=1, best=True)
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 1


def _removed_first_by_another_process(monkeypatch, name):
    """Path.unlink finds ``name`` gone: another process removed it between listing and unlink."""
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == name:
            real_unlink(self)
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)


def test_pruning_keeps_the_newest_steps_though_another_process_prunes_too(tmp_path, monkeypatch):
    """Two savers pruning one folder race; a step file already gone is not an error."""
    for step in (1, 2, 3):
        checkpoint.save_step({"step": step}, tmp_path, step, keep_last=3, best=False)
    _removed_first_by_another_process(monkeypatch, "step_0000001.pt")
    checkpoint.save_step({"step": 4}, tmp_path, 4, keep_last=2, best=False)
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path)] == [
        "step_0000003.pt",
        "step_0000004.pt",
    ]


def test_remove_leftovers_deletes_only_the_temp_files_of_killed_saves(tmp_path, monkeypatch):
    """Temp files are `.NAME.*.tmp`; a file removed meanwhile is neither an error nor reported."""
    names = [".last.pt.k3j2.tmp", ".best.pt.link.tmp", ".step_0000001.pt.x.tmp"]
    for name in [*names, "last.pt", "notes.tmp", ".hidden", ".last.pt.x.TMP"]:
        (tmp_path / name).write_bytes(b"x")
    _removed_first_by_another_process(monkeypatch, ".step_0000001.pt.x.tmp")
    removed = checkpoint.remove_leftovers(tmp_path)
    assert sorted(removed) == [tmp_path / ".best.pt.link.tmp", tmp_path / ".last.pt.k3j2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".hidden",
        ".last.pt.x.TMP",
        "last.pt",
        "notes.tmp",
    ]


def test_without_hard_links_last_and_best_are_full_copies(tmp_path, monkeypatch):
    """File systems without hard links (some network mounts) still get last.pt and best.pt."""

    def link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)
    w = torch.arange(3.0)
    step = checkpoint.save_step({"step": 5, "w": w}, tmp_path, 5, keep_last=1, best=True)
    for name in ("last.pt", "best.pt"):
        state = checkpoint.load(tmp_path / name)
        assert state["step"] == 5 and torch.equal(state["w"], w)
        assert not os.path.samefile(tmp_path / name, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", step.name]


# ---------------------------------------------------------------- load, in detail
def test_load_puts_tensors_where_asked_and_drops_old_generator_states(tmp_path):
    """map_location reaches torch.load; the rng key of older checkpoints is read by nothing."""
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 3, "w": torch.zeros(2), "rng": [torch.zeros(4)]}, path)
    state = checkpoint.load(path, map_location="meta")
    assert state["w"].device.type == "meta"
    assert set(state) == {"format", "version", "step", "w"}


def test_a_checkpoint_of_another_version_names_both(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"version": 2, "step": 3}, path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == (
        f"checkpoint {path} has format version 2, this minigpt reads version 1"
    )


def _truncated(path):
    checkpoint.save({"step": 1, "w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (_truncated, "RuntimeError"),
        (lambda p: p.write_bytes(bytes(range(256))), "Unsupported operand 0"),  # random bytes
        (lambda p: p.write_bytes(b""), "an empty file: 0 bytes"),
    ],
    ids=["truncated", "random", "empty"],
)
def test_a_broken_file_says_so_and_what_to_do(tmp_path, write, reason):
    """Random bytes fail as an unknown pickle opcode: corrupted, not an unsafe payload."""
    path = tmp_path / "last.pt"
    write(path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == (
        f"checkpoint {path} is truncated or corrupted ({reason}); "
        "use another checkpoint, e.g. an older one in the same folder"
    )


def test_a_file_of_a_known_other_kind_is_not_unpickled(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == f"{path} is not a minigpt checkpoint: it is a PNG image"


def test_an_unreadable_file_says_why(tmp_path, monkeypatch):
    """(Patched: root, who runs the tests in CI, can read a mode-000 file.)"""

    def sniff_file(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "sniff_file", sniff_file)
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == f"checkpoint {path} cannot be read (Permission denied)"


def _refusal(path, holding):
    return (
        f"checkpoint {path} was refused: it is a torch file holding {holding}, which a minigpt "
        "checkpoint never has (a model saved whole, or another program's file?); it was not "
        "unpickled, so nothing in it ran"
    )


def test_a_payload_of_a_blocked_module_is_refused_by_name_and_never_runs(tmp_path, monkeypatch):
    """torch names a blocked global on a line without "Unsupported"; even forced by the
    environment to unpickle, torch.load is told weights_only=True and so never runs it."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    save_payload_checkpoint(path, marker, "x")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == _refusal(path, f"{os.system.__module__}.system objects")
    assert not marker.exists()


LONG_LINE = "a global of no name: " + "x" * 200


@pytest.mark.parametrize(
    ("message", "holding"),
    [
        ("", "objects of other kinds (weights-only load failed)"),
        (
            "Weights only load failed.\n\n  Can only append to lists, but got dict  \n",
            "objects of other kinds (Weights only load failed.)",
        ),
        (
            "Weights only load failed.\nWeightsUnpickler error: Unsupported class x.Y",
            "objects of other kinds (WeightsUnpickler error: Unsupported class x.Y)",
        ),
        ("a\n" + LONG_LINE, f"objects of other kinds ({LONG_LINE[:160]})"),
    ],
    ids=["empty", "no-named-line", "unsupported-line", "long-global-line"],
)
def test_a_refusal_without_a_global_quotes_torchs_reason(tmp_path, monkeypatch, message, holding):
    """The first line naming what was unsupported (or any line), cut to 160 characters."""

    def load(*args, **kwargs):
        raise pickle.UnpicklingError(message)

    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)
    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == _refusal(path, holding)
