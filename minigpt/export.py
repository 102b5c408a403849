"""Model-only export to safetensors, for sharing weights: ``python -m minigpt.export CKPT [OUT]``.

A training checkpoint carries the optimizer, RNG and sampler state and is a (weights-only) pickle;
a ``.safetensors`` file holds tensors alone and cannot run code on load, whoever made it. The model
config and tokenizer travel as its string metadata, so ``generate.py checkpoint=model.safetensors``
works from the file alone.

The command never clobbers: an existing OUT needs ``--force``, and not even ``--force`` writes over
the checkpoint itself (last.pt, best.pt and step_N.pt are hard links of one another). The file
format lives in :mod:`minigpt.weights`; this module is the command and its rules.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from minigpt import weights
from minigpt.checkpoint import CheckpointError
from minigpt.cli import OneLineParser

load = weights.read_safetensors  # the reader, beside the other formats


class ExportError(ValueError):
    """An output path the export refuses (printed as one line)."""


def export(
    src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, force: bool = False
) -> Path:
    """Write the model weights of checkpoint ``src`` to ``dst`` (default: beside it, .safetensors).

    The checkpoint is checked in full first; ``dst``'s missing folders are made; the file appears
    whole or not at all.
    """
    src = Path(src)
    out = Path(dst) if dst else src.with_suffix(".safetensors")
    check_output(src, out, force)
    found = weights.read_checkpoint(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(found.state, out)
    return out


def check_output(src: Path, out: Path, force: bool) -> None:
    """Refuse a folder, a device, a path under a file, the input itself (under any name) and,
    without ``force``, any existing file."""
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name, e.g. {out / src.stem}.safetensors")
    folder = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
    if folder is not None and not folder.is_dir():
        raise ExportError(f"cannot write {out}: {folder} is a file, not a folder")
    if not out.exists() and not out.is_symlink():
        return
    if out.exists() and not out.is_file():  # renaming over it would replace /dev/full itself
        raise ExportError(f"{out} is not a regular file (a device, FIFO or socket); give a file")
    if src.exists() and out.exists() and os.path.samefile(src, out):
        how = "the same file" if src.resolve() == out.resolve() else "a hard link of it"
        raise ExportError(
            f"{out} is the checkpoint {src} itself ({how}); the export never writes over its "
            "input: give another output path"
        )
    if not force:
        raise ExportError(f"{out} exists; pass --force to replace it")


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt.export CKPT [OUT] [--force]``: every failure is one ``error:`` line."""
    parser = OneLineParser(prog="python -m minigpt.export", description=__doc__)
    parser.add_argument("checkpoint", help="a minigpt checkpoint, e.g. .../checkpoints/best.pt")
    parser.add_argument("output", nargs="?", help="default: the checkpoint's name, .safetensors")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, force=args.force)
    except (CheckpointError, ExportError) as err:
        return _error(str(err), 2)
    except OSError as err:  # disk full, a read-only folder, a file where a folder should be
        where = err.filename or args.output or args.checkpoint
        return _error(f"cannot write {where}: {err.strerror or err}", _exit_code(err))
    except KeyboardInterrupt:
        return _error("interrupted; nothing was written", 130)
    print(out)
    return 0


def _exit_code(err: OSError) -> int:
    return 1 if err.errno in (errno.ENOSPC, errno.EDQUOT) else 2


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
