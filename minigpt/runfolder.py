"""What a new process may do with the run a folder already holds.

Decides which checkpoint a run starts from without ever destroying what the folder holds:
starting afresh over a run is refused, a run is only continued from its newest checkpoint, and a
run that never saved one is kept aside before it starts over. Then checks that the checkpoint is
one this run can continue (shape, tokenizer) and notes what else changed. Who may write the
folder at all is :mod:`minigpt.runlock`'s question.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigpt import checkpoint, optim
from minigpt.checkpoint import CheckpointError
from minigpt.config import ConfigError, OptimizerConfig
from minigpt.runlock import RunFolderError
from minigpt.tracking import METRICS_FILE

RUN_FILE = "run.json"  # what the trainer writes about a run


@dataclass(frozen=True)
class Existing:
    """The run a folder already holds (all empty for a new folder)."""

    info: dict[str, Any]  # its run.json
    checkpoints: list[Path]  # step files, oldest first, and last.pt
    has_metrics: bool

    def __bool__(self) -> bool:
        return bool(self.info or self.checkpoints or self.has_metrics)

    def describe(self) -> str:
        status = self.info.get("status", "no run.json")
        steps = self.info.get("steps")
        return f"{status} at step {steps}" if steps is not None else status


def check_layout(run_dir: Path) -> None:
    """Refuse a folder where a run keeps a file (or a file where it keeps a folder): writing
    there later would fail midway, after the run has already changed other files."""
    folder = checkpoint.checkpoint_dir(run_dir)
    expected = [(folder, True), (run_dir / RUN_FILE, False), (run_dir / METRICS_FILE, False)]
    expected += [(folder / checkpoint.LAST, False), (folder / checkpoint.BEST, False)]
    for path, is_folder in expected:
        if path.exists() and path.is_dir() != is_folder:
            what = "a folder" if is_folder else "a file"
            raise RunFolderError(
                f"{path} is not {what}, where a run keeps {what} of its own; move it out of "
                "the way, or give this run its own hydra.run.dir"
            )
        if not is_folder and path.exists() and not path.is_file():
            raise RunFolderError(f"{path} is not a regular file; move it out of the way")


def existing_run(run_dir: Path) -> Existing:
    """What a previous run left in ``run_dir``."""
    folder = checkpoint.checkpoint_dir(run_dir)
    ckpts = checkpoint.step_checkpoints(folder) if folder.is_dir() else []
    if (folder / checkpoint.LAST).exists():
        ckpts.append(folder / checkpoint.LAST)
    return Existing(read_run_json(run_dir), ckpts, (run_dir / METRICS_FILE).exists())


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """A run's run.json ({} when missing or unreadable: it never stops a run)."""
    try:
        data = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


Say = Callable[[str], None]


def start_from(
    resume: str, run_dir: Path, say: Say, map_location: Any = "cpu"
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint (path and state) that ``resume=auto|never|PATH`` starts this run from.

    None for a fresh start. Never continues anything but a folder's newest checkpoint in it, and
    never starts afresh over a run that is there: both would overwrite what that run wrote.
    """
    check_layout(run_dir)
    existing = existing_run(run_dir)
    if resume == "never":
        if existing:
            raise RunFolderError(
                f"{run_dir} already holds a run ({existing.describe()}); resume=never would "
                "start another run over it: give the new run its own hydra.run.dir, or use "
                "resume=auto to continue this one"
            )
        return None, None
    if resume == "auto":
        return _auto(run_dir, existing, say, map_location)
    return _explicit(Path(resume).expanduser(), run_dir, existing, say, map_location)


def _auto(
    run_dir: Path, existing: Existing, say: Say, map_location: Any
) -> tuple[Path | None, dict[str, Any] | None]:
    if not existing:
        return None, None
    if existing.checkpoints:
        return newest_loadable(run_dir, say, map_location)
    aside = set_aside(run_dir)
    say(
        f"{run_dir} holds a run that saved no checkpoint ({existing.describe()}): its run.json "
        f"and metrics.jsonl were moved to {aside.name}/ and the run starts at step 0"
    )
    return None, None


def newest_loadable(
    run_dir: Path, say: Say, map_location: Any = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """last.pt, or else the newest step file that loads; refuses when none does."""
    folder = checkpoint.checkpoint_dir(run_dir)
    last = folder / checkpoint.LAST
    candidates = [last, *reversed(checkpoint.step_checkpoints(folder))]
    problems = []
    for path in candidates:
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        try:
            state = checkpoint.load(path, map_location=map_location, read="meta")
        except CheckpointError as err:
            problems.append(f"{path.name}: {err}")
            continue
        if path != last:
            say(f"{'; '.join(problems)}: resuming from {path.name}, the newest that loads")
        return path, state
    raise RunFolderError(
        f"{run_dir} holds a run but none of its checkpoints loads ({'; '.join(problems)}); "
        "resume=PATH names another checkpoint, or give a new run its own hydra.run.dir"
    )


def _explicit(
    path: Path, run_dir: Path, existing: Existing, say: Say, map_location: Any
) -> tuple[Path, dict[str, Any]]:
    if path.is_dir():
        raise RunFolderError(checkpoint.describe_folder(path, "resume", prefer=checkpoint.LAST))
    if not path.is_file():
        raise RunFolderError(f"resume={path}: no such checkpoint file; use auto, never or a path")
    state = checkpoint.load(path, map_location=map_location, read="meta")
    if not existing:
        return path, state
    folder = checkpoint.checkpoint_dir(run_dir).resolve()
    if path.resolve().parent != folder:
        raise RunFolderError(
            f"{run_dir} already holds a run ({existing.describe()}); continuing resume={path} "
            "in it would write over that run: give this run its own hydra.run.dir"
        )
    newest, newest_state = newest_loadable(run_dir, say, map_location)
    step, reached = _step(state), _step(newest_state)
    if step < reached:
        raise RunFolderError(
            f"resume={path} is step {step} of the run in {run_dir}, which went on to step "
            f"{reached}; resuming it there would write over steps {step + 1}-{reached}: "
            "resume from it into a new hydra.run.dir"
        )
    return path, state


def _step(state: dict[str, Any]) -> int:
    return int(state.get("train_state", {}).get("step", 0))


def set_aside(run_dir: Path) -> Path:
    """Move an earlier attempt's run.json and metrics.jsonl into ``earlier-<time>/``."""
    aside = run_dir / time.strftime("earlier-%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "x")
    aside.mkdir()
    for name in (RUN_FILE, METRICS_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.rename(run_dir / name, aside / name)
    return aside


# ---------------------------------------------------------------- what a resume may continue
SHAPE_KEYS = ("n_layer", "n_head", "d_model", "block_size", "vocab_size", "bias")


def check_resumable(
    state: dict[str, Any], path: Path, model_config: dict[str, Any], tokenizer: dict[str, Any]
) -> None:
    """Refuse a checkpoint this run cannot continue: another model shape or another tokenizer."""
    old_model = state.get("model_config", {})
    changed = [k for k in SHAPE_KEYS if old_model.get(k) != model_config.get(k)]
    if changed:
        diff = ", ".join(f"model.{k}={old_model.get(k)} -> {model_config.get(k)}" for k in changed)
        raise RunFolderError(
            f"resume={path} holds a model of another shape ({diff}); keep the checkpoint's shape "
            "to continue it, or give a new run its own hydra.run.dir"
        )
    old_tok = state.get("tokenizer", {})
    if old_tok != tokenizer:
        raise RunFolderError(
            f"resume={path} was trained with another tokenizer than this corpus's "
            f"({_tokenizer_change(old_tok, tokenizer, state.get('data'))}): its token ids would "
            "mean other text; resume with the data and data.tokenizer the run started with, or "
            "give a new run its own hydra.run.dir"
        )


def _tokenizer_change(old: dict[str, Any], new: dict[str, Any], data: Any) -> str:
    if old.get("kind") != new.get("kind"):
        return f"data.tokenizer was {old.get('kind')}, now {new.get('kind')}"
    old_vocab, new_vocab = _bpe_vocab(old), _bpe_vocab(new)
    differ = sum(1 for token, i in new_vocab.items() if old_vocab.get(token) != i)
    then = f" (the data was {describe_data(data)})" if isinstance(data, dict) else ""
    return (
        f"{old.get('kind')} trained again on changed data{then}: {differ} of its "
        f"{len(new_vocab)} ids now stand for other text"
    )


def _bpe_vocab(state: dict[str, Any]) -> dict[str, int]:
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return dict(json.loads(state["json"])["model"]["vocab"])
    return {}


def data_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint remembers of its corpus: the cache key, files and tokens."""
    return {
        "key": meta.get("key"),
        "files": meta.get("key_inputs", {}).get("files"),
        "tokens": meta.get("tokens"),
    }


def describe_data(data: dict[str, Any]) -> str:
    files, tokens = data.get("files") or {}, data.get("tokens") or {}
    parts = []
    if files.get("count"):
        parts.append(f"{files['count']} files, {files.get('bytes')} bytes")
    if tokens:
        parts.append(f"{tokens.get('train')} train + {tokens.get('val')} val tokens")
    return ", ".join(parts) or "unknown"


def resume_notes(
    state: dict[str, Any], config: dict[str, Any], data: dict[str, Any]
) -> tuple[list[str], dict[str, Any] | None]:
    """What changed since the checkpoint that a run may continue with: options and data."""
    notes = []
    old = _flat(state.get("config") or {})
    new = _flat(config)
    changed = [k for k in sorted(new) if k != "resume" and k in old and old[k] != new[k]]
    if changed:
        shown = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        notes.append(f"resuming with changed options: {shown}{more}")
    schedule = _schedule_change(state, config)
    if schedule:
        notes.append(schedule)
    change = None
    before = state.get("data")
    if isinstance(before, dict) and before.get("key") != data.get("key"):
        change = {"from": before, "to": data}
        notes.append(
            f"the data changed since the checkpoint (was {describe_data(before)}, now "
            f"{describe_data(data)}); the tokenizer is the same, so the run continues on it"
        )
    return notes, change


def _schedule_change(state: dict[str, Any], config: dict[str, Any]) -> str | None:
    """What the options changed since the checkpoint do to the lr at the resumed step."""
    try:
        before = _schedule(state.get("config") or {})
        after = _schedule(config)
    except (KeyError, TypeError, ValueError, ConfigError):
        return None  # a checkpoint too old to say: the changed options are listed anyway
    return optim.schedule_change(_step(state), before, after)


def _schedule(config: dict[str, Any]) -> tuple[OptimizerConfig, int]:
    known = {f.name for f in dataclasses.fields(OptimizerConfig)}
    values = {k: v for k, v in config["optimizer"].items() if k in known}
    return OptimizerConfig(**values), int(config["train"]["max_steps"])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
