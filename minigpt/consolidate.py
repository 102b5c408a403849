"""One file from a sharded checkpoint: ``python -m minigpt.consolidate CKPT OUT.pt [--force]``.

A ``train.parallel=fsdp`` run saves ``step_N.pt`` beside a ``step_N.dcp/`` folder of shards
(see :mod:`minigpt.checkpoint`). Nothing needs converting: generate.py, the exports,
``init_from=`` and ``resume=`` read that pair directly. This command is for moving a checkpoint
as one file (to a machine, a colleague, an archive): OUT is the checkpoint a ``ddp`` run writes,
the model and the optimizer state in full, and resumes on any number of ranks. It is built on
one process, which needs host memory for the model and its optimizer state (16 bytes a
parameter in fp32), not GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from minigpt import checkpoint
from minigpt.checkpoint import CheckpointError
from minigpt.cli import OneLineParser
from minigpt.export import check_output
from minigpt.hf_folder import ExportError


def consolidate(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], force: bool = False
) -> Path:
    """Write ``src``'s full state to ``dst`` atomically; refuses a checkpoint that is one file."""
    source, out = Path(src).expanduser(), Path(dst).expanduser()
    check_output(source, out, force)
    state = checkpoint.load(source)
    if checkpoint.SHARDS not in state:
        raise CheckpointError(f"{source} is already a single-file checkpoint; copy it as it is")
    for key in ("format", "version", checkpoint.SHARDS, "param_order", "aliases"):
        state.pop(key, None)
    checkpoint.save(state, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Every failure is one ``error:`` line."""
    parser = OneLineParser(prog="python -m minigpt.consolidate", description=__doc__)
    parser.add_argument("checkpoint", help="a sharded checkpoint, e.g. .../checkpoints/last.pt")
    parser.add_argument("output", help="the single file to write, e.g. last_full.pt")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.output, force=args.force)
    except (CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, a read-only folder
        where = err.filename or args.output
        print(f"error: cannot write {where}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
