"""Checkpoints: atomic save, safe load, and where the run's checkpoints live.

A checkpoint is a plain dict of tensors and JSON-like values, so it always loads with
``torch.load(weights_only=True)``: a crafted pickle can never run code here.

A sharded checkpoint (``train.parallel=fsdp``) is two things beside each other: the step file,
which holds everything but the weights and optimizer state plus the name of its shard folder
(``step_N.dcp/``), and that folder, written by every rank with torch.distributed.checkpoint
(DCP: one file per rank and a metadata file). The folder is written under a temporary name and
renamed whole, then the step file is saved: either is atomic, so a checkpoint is complete or
absent. ``load`` consolidates the shards on one process, so every reader of a checkpoint
(generate, the exports, ``init_from``) takes either kind; a sharded resume reads them in place,
onto any number of ranks.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from minigpt.filekinds import Sniffed, sniff_file

FORMAT = "minigpt"
VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
STEP_PATTERN = "step_*.pt"
SHARDS = "shards"  # a sharded checkpoint's key: the name of its DCP folder, beside it
FRESH = "optimizer_fresh"  # in the shards: saved before the optimizer's first step
SHARD_PATTERN = "step_*.dcp"


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


def save_step(
    state: dict[str, Any],
    folder: Path,
    step: int,
    keep_last: int,
    best: bool,
    shards: Path | None = None,
) -> Path:
    """Save ``step_XXXXXXX.pt`` atomically, point last.pt (and best.pt) at it, prune old steps.

    last.pt and best.pt are hard links: one write per save however many names the file has, and
    pruning a step file never takes the data of last.pt or best.pt with it. ``shards``: the
    complete temporary folder of a sharded save (:func:`shards_tmp`), published first under its
    own name, which the step file records; a shard folder that no step file, last.pt or best.pt
    names any more is deleted.
    """
    path = folder / f"step_{step:07d}.pt"
    if shards is not None:
        state = {**state, SHARDS: _publish_shards(shards, folder, step).name}
    save(state, path)
    link_or_copy(path, folder / LAST)
    if best:
        link_or_copy(path, folder / BEST)
    for old in step_checkpoints(folder)[:-keep_last]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    remove_unnamed_shards(folder)
    return path


def shards_tmp(folder: Path, step: int) -> Path:
    """Where every rank writes a sharded save's files before rank 0 publishes them: a dot name
    ending ``.tmp``, never listed as a checkpoint, deleted at start-up (remove_leftovers)."""
    return folder / f".step_{step:07d}.dcp.tmp"


def _publish_shards(tmp: Path, folder: Path, step: int) -> Path:
    """Rename the complete shard folder to a name no other checkpoint uses (a step saved again,
    after a resume, gets ``step_N.1.dcp``: the first one may still be last.pt's)."""
    name, n = f"step_{step:07d}", 0
    final = folder / f"{name}.dcp"
    while final.exists():
        n += 1
        final = folder / f"{name}.{n}.dcp"
    os.rename(tmp, final)
    _fsync_dir(folder)
    return final


def remove_unnamed_shards(folder: Path) -> list[Path]:
    """Delete the shard folders that no checkpoint file of ``folder`` names (pruned steps, a
    save killed between publishing its shards and writing its step file)."""
    found = [p for p in folder.glob(SHARD_PATTERN) if p.is_dir()]
    if not found:
        return []
    named = {_shards_named(p) for p in folder.glob("*.pt")}
    removed = []
    for shards in found:
        if shards.name not in named:
            shutil.rmtree(shards, ignore_errors=True)
            removed.append(shards)
    return removed


def _shards_named(path: Path) -> str | None:
    """The shard folder a checkpoint file names; memory-mapped, so a full checkpoint's tensors
    are not read."""
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - unreadable: it names nothing that can be loaded
        return None
    return state.get(SHARDS) if isinstance(state, dict) else None


def step_checkpoints(folder: Path) -> list[Path]:
    """The step files of a folder, oldest first (temp files of interrupted saves are not listed)."""
    return sorted(p for p in folder.glob(STEP_PATTERN) if p.stem.removeprefix("step_").isdigit())


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temp files (and shard folders) of saves that were killed midway (each may be
    as big as a model).

    Only rank 0 calls it, at start-up, before the first save.
    """
    removed = []
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
    return removed + (remove_unnamed_shards(folder) if folder.is_dir() else [])


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` the same checkpoint as ``src`` atomically (a hard link: no second write)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        save(load(src, read="meta"), dst)
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


def load(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", read: str = "all"
) -> dict[str, Any]:
    """Load a minigpt checkpoint with ``weights_only=True``; every failure is a CheckpointError.

    A sharded checkpoint's shards are checked complete, and consolidated on this process:
    ``read="all"`` the model and the optimizer (in the single-process format), ``"model"`` the
    model alone, ``"meta"`` neither (a sharded resume reads them in place).
    """
    path = Path(path)
    require_file(path)
    found = sniff(path)
    if found.kind == "blank":
        raise _corrupted(path, found.what)
    if found.kind in ("safetensors", "other"):
        raise CheckpointError(f"{path} is not a minigpt checkpoint: it is {found.what}")
    try:  # a file object: given a path ending .safetensors, torch.load would read it as one
        with path.open("rb") as f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unsafe_reason(err)
        if "operand" in reason:  # an opcode pickle does not know: random bytes, not a payload
            raise _corrupted(path, reason) from None
        raise CheckpointError(
            f"checkpoint {path} was refused: it is a torch file holding "
            f"{_held_object(reason)}, which a minigpt checkpoint never has (a model saved whole, "
            "or another program's file?); it was not unpickled, so nothing in it ran"
        ) from None
    except MemoryError:
        raise
    except Exception as err:  # any failure to parse a file is the file's fault
        # RuntimeError, EOFError, BadZipFile, OSError, ValueError, and from a crafted zip also
        # KeyError, IndexError, struct.error...: whatever it is, the user's next step is the same.
        raise _corrupted(path, type(err).__name__) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minigpt checkpoint: it is {_torch_file(state)}")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')}, this minigpt reads "
            f"version {VERSION}"
        )
    # Older checkpoints carried each rank's generator states; nothing reads them now: dropout,
    # the only draw training makes, is reseeded from (seed, step, slice) at every micro-step.
    state.pop("rng", None)
    if SHARDS in state:
        folder = shard_folder(path, state)
        if read != "meta":
            order, aliases = state.get("param_order"), state.get("aliases") or {}
            state.update(read_shards(folder, order, aliases, read, map_location))
    return state


# ---------------------------------------------------------------- sharded checkpoints
def shard_folder(path: Path, state: dict[str, Any]) -> Path:
    """The complete shard folder of the sharded checkpoint ``path``; else a CheckpointError."""
    name = state[SHARDS]
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".dcp"):
        raise _corrupted(path, f"its shard folder is named {name!r}")
    folder = path.parent / name
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is sharded and its shards, {folder}, are missing: a sharded "
            "checkpoint is the .pt file and the .dcp folder it names, beside it (copy both); "
            "use another checkpoint, e.g. an older one in the same folder"
        )
    try:
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # noqa: BLE001 - no metadata or a damaged one
        raise _corrupted(folder, f"its metadata: {type(err).__name__}") from None
    for info in getattr(metadata, "storage_data", {}).values():
        part = folder / info.relative_path
        if not part.is_file() or part.stat().st_size < info.offset + info.length:
            raise _corrupted(folder, f"{info.relative_path} is missing or short")
    return folder


def read_shards(
    folder: Path,
    order: list[str] | None,
    aliases: dict[str, str] | None = None,
    read: str = "all",
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The full model (and optimizer) state of a shard folder on this one process, as a
    single-process run saves it. ``order``: the parameter names in the optimizer's index order;
    ``aliases``: the names written once under another (the tied head), given back their tensor."""
    state: dict[str, Any] = {}
    keys = {"model"} if read == "model" else {"model", "optimizer", FRESH}
    # DCP's public load fills a state dict shaped like the model's; to read a checkpoint
    # without building the model, torch's own dcp_to_torch_save calls this loader with a
    # planner that builds the state dict from the metadata: the same, minus its torch.save.
    try:
        reader, planner = dcp.FileSystemReader(str(folder)), _EmptyStateDictLoadPlanner(keys)
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - the shards are the fault
        raise _corrupted(folder, type(err).__name__) from None
    for alias, name in (aliases or {}).items():
        state["model"][alias] = state["model"][name]  # one tensor, as in the model's state dict
    if map_location != "cpu":
        state["model"] = {k: v.to(map_location) for k, v in state["model"].items()}
    if "optimizer" in state:
        state["optimizer"] = by_index(state["optimizer"], order or [])
        if bool(state.pop(FRESH, False)):  # as Optimizer.state_dict has it before a step
            state["optimizer"]["state"] = {}
    return state


def by_index(optim_sd: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """Name-keyed optimizer state (``get_optimizer_state_dict``'s) in ``Optimizer.state_dict``'s
    own format: parameters numbered in group order."""
    index = {name: i for i, name in enumerate(order)}
    groups = [
        {**g, "params": [index[n] for n in g["params"]]} for g in optim_sd.get("param_groups", [])
    ]
    state = {index[n]: s for n, s in optim_sd.get("state", {}).items()}
    return {"state": state, "param_groups": groups}


def require_file(path: Path, key: str | None = None) -> None:
    """A checkpoint path must name a regular file: not a folder, a device or a dangling link.

    ``key`` (``checkpoint``, ``resume``) names the setting in the message and its suggestion.
    """
    named = f"{key}={path}" if key else f"checkpoint {path}"
    if path.is_dir():
        raise CheckpointError(describe_folder(path, key))
    if not path.exists():
        held = _checkpoint_names(path.parent) if path.parent.is_dir() else []
        hint = f"; {path.parent} holds {', '.join(held)}" if held else ""
        raise CheckpointError(f"{named} does not exist{hint}")
    if not path.is_file():
        raise CheckpointError(f"{named} is not a regular file; give a checkpoint file")


# ---------------------------------------------------------------- what a path holds
def describe_folder(folder: Path, key: str | None = None, prefer: str = BEST) -> str:
    """Why a folder is not a checkpoint, and the file to give instead: for a run folder or its
    checkpoints folder, the checkpoints it holds and the one to use (``prefer`` when there)."""
    named = f"{key}={folder}" if key else f"checkpoint {folder}"
    setting = f"{key}=" if key else ""
    if folder.suffix == ".dcp":
        files = sorted(p for p in folder.parent.glob("*.pt") if _shards_named(p) == folder.name)
        pick = next((p for p in files if p.name == prefer), files[0] if files else None)
        if pick is not None:
            return (
                f"{named} is the shard folder of a sharded checkpoint; pass the file that "
                f"names it: {setting}{pick}"
            )
    for what, where in (("a run folder", checkpoint_dir(folder)), ("a checkpoints folder", folder)):
        pick = _pick(where, prefer)
        if pick is not None:
            held = ", ".join(_checkpoint_names(where))
            return (
                f"{named} is {what}; pass one of its checkpoints: {setting}{pick} "
                f"({where.name}/ holds {held})"
            )
    subfolders = [p for p in folder.iterdir() if p.is_dir()]
    runs = sorted((p for p in subfolders if p.name.isdigit()), key=lambda p: int(p.name))
    runs += sorted((p for p in subfolders if not p.name.isdigit()), reverse=True)  # newest first
    picks = ((run, _pick(checkpoint_dir(run), prefer)) for run in runs)
    found = next(((run, pick) for run, pick in picks if pick is not None), None)
    if found is not None:
        what = "a sweep folder" if found[0].name.isdigit() else "a folder of runs"
        return f"{named} is {what}; pass a checkpoint of one of its runs: {setting}{found[1]}"
    if checkpoint_dir(folder).is_dir() or (folder / "run.json").is_file():
        return f"{named} is a run folder that has saved no checkpoint yet; wait for its first save"
    return f"{named} is a folder; give a checkpoint file (.pt) or a .safetensors export"


def _pick(folder: Path, prefer: str) -> Path | None:
    """The checkpoint of ``folder`` to suggest: ``prefer``, else best.pt or last.pt, else the
    newest step file, else any model file."""
    if not folder.is_dir():
        return None
    for name in (prefer, BEST, LAST):
        if (folder / name).is_file():
            return folder / name
    steps = step_checkpoints(folder)
    others = sorted(p for p in folder.glob("*") if p.suffix in (".pt", ".safetensors"))
    return (steps or others or [None])[-1]


def _checkpoint_names(folder: Path) -> list[str]:
    """best.pt, last.pt and the step files in ``folder``, then its other model files."""
    if not folder.is_dir():
        return []
    names = [n for n in (BEST, LAST) if (folder / n).is_file()]
    steps = [p.name for p in step_checkpoints(folder)]
    names += steps if len(steps) <= 2 else [f"{len(steps)} step files ({steps[0]} to {steps[-1]})"]
    others = sorted(p.name for p in folder.glob("*") if p.suffix in (".pt", ".safetensors"))
    return names + [n for n in others if n not in names and n not in steps]


def sniff(path: Path) -> Sniffed:
    """What the file at ``path`` seems to be (minigpt.filekinds); unreadable: CheckpointError."""
    try:
        return sniff_file(path)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.strerror})") from None


def _torch_file(state: Any) -> str:
    """What a torch file that is not ours holds."""
    if isinstance(state, torch.Tensor):
        return f"a torch file holding one tensor of shape {list(state.shape)}"
    if not isinstance(state, dict):
        return f"a torch file holding {type(state).__name__} data"
    if "format" in state:
        return f"a torch file of format {state['format']!r}, not {FORMAT!r}"
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        count = f"{len(state)} tensor{'s' if len(state) > 1 else ''}"
        return f"a bare state dict ({count}), without the model config or tokenizer"
    keys = [str(k) for k in state][:5]
    more = ", ..." if len(state) > 5 else ""
    return f"a torch file of another program (its keys: {', '.join(keys)}{more})"


def _held_object(reason: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", reason)
    return f"{found.group(1)} objects" if found else f"objects of other kinds ({reason})"


def _corrupted(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupted ({reason}); "
        "use another checkpoint, e.g. an older one in the same folder"
    )


def _unsafe_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "global" in line.lower()]
    return (named or lines or ["weights-only load failed"])[0][:160]
