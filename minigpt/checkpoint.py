"""Checkpoints: atomic save, safe load, and where the run's checkpoints live.

A checkpoint is a plain dict of tensors and JSON-like values, so it always loads with
``torch.load(weights_only=True)``: a crafted pickle can never run code here.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "minigpt"
VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
STEP_PATTERN = "step_*.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, unsafe or not ours."""


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The folder of a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def save(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` atomically: temp file, fsync, rename, fsync the folder.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; teammates may read checkpoints
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = _os_error_in(err)
        if cause is not None and cause.errno and (cause is not err or cause.filename is None):
            # torch.save reports a failed write (disk full) as a RuntimeError from its zip writer
            # while closing; the OSError it replaced, named after the file, is what users act on.
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        raise
    _fsync_dir(path.parent)


def _os_error_in(err: BaseException) -> OSError | None:
    """The first OSError in ``err``'s chain of causes and contexts."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def save_step(state: dict[str, Any], folder: Path, step: int, keep_last: int, best: bool) -> Path:
    """Save ``step_XXXXXXX.pt`` atomically, point last.pt (and best.pt) at it, prune old steps.

    last.pt and best.pt are hard links: one write per save however many names the file has, and
    pruning a step file never takes the data of last.pt or best.pt with it.
    """
    path = folder / f"step_{step:07d}.pt"
    save(state, path)
    link_or_copy(path, folder / LAST)
    if best:
        link_or_copy(path, folder / BEST)
    for old in step_checkpoints(folder)[:-keep_last]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def step_checkpoints(folder: Path) -> list[Path]:
    """The step files of a folder, oldest first (temp files of interrupted saves are not listed)."""
    return sorted(p for p in folder.glob(STEP_PATTERN) if p.stem.removeprefix("step_").isdigit())


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temp files of saves that were killed midway (each may be as big as a model).

    Only the process that saves calls it, at start-up, before its first save.
    """
    removed = []
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` the same checkpoint as ``src`` atomically (a hard link: no second write)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        save(load(src), dst)
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a minigpt checkpoint with ``weights_only=True``; every failure is a CheckpointError."""
    path = Path(path)
    require_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unsafe_reason(err)
        if "operand" in reason:  # an opcode pickle does not know: random bytes, not a payload
            raise _corrupted(path, reason) from None
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects a minigpt checkpoint never has "
            f"({reason}); nothing in it was run"
        ) from None
    except MemoryError:
        raise
    except Exception as err:  # any failure to parse a file is the file's fault
        # RuntimeError, EOFError, BadZipFile, OSError, ValueError, and from a crafted zip also
        # KeyError, IndexError, struct.error...: whatever it is, the user's next step is the same.
        raise _corrupted(path, type(err).__name__) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minigpt checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')}, this minigpt reads "
            f"version {VERSION}"
        )
    return state


def require_file(path: Path) -> None:
    """A checkpoint path must name a regular file: not a folder, a device or a dangling link."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; give a checkpoint file")


def _corrupted(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupted ({reason}); "
        "use another checkpoint, e.g. an older one in the same folder"
    )


def _unsafe_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "global" in line.lower()]
    return (named or lines or ["weights-only load failed"])[0][:160]
