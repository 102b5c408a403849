"""Export a model to share it: ``python -m minigpt.export CKPT [OUT] [--format hf|minigpt]``.

``--format hf`` (the default) writes a folder in Hugging Face's layout: ``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer files, which
``transformers``' ``AutoModelForCausalLM`` and ``AutoTokenizer`` open with no extra code (and so
``lm-eval``, vLLM and the Hub). ``--format minigpt`` writes minigpt's own single file: the
weights as safetensors, the model config and tokenizer in its metadata, read by ``generate.py``
and ``init_from=`` but by nothing else. An OUT ending in ``.safetensors`` means minigpt's file.

A training checkpoint carries the optimizer and sampler state and is a (weights-only)
pickle; both exports hold tensors alone and cannot run code on load, whoever made them.

The command never clobbers: an existing OUT needs ``--force`` (and a folder is replaced only if
it is an earlier export), and not even ``--force`` writes over the checkpoint itself (last.pt,
best.pt and step_N.pt are hard links of one another). The formats live in :mod:`minigpt.weights`
and :mod:`minigpt.hf_folder`; this module is the command and its rules.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from minigpt import hf_folder, pretrained, weights
from minigpt.checkpoint import CheckpointError
from minigpt.cli import OneLineParser
from minigpt.config import ConfigError
from minigpt.hf_folder import ExportError

load = weights.read_safetensors  # the reader, beside the other formats
FORMATS = ("hf", "minigpt")
OURS = ".minigpt.safetensors"  # the default name of minigpt's own file: not a HF file


def export(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    force: bool = False,
    fmt: str | None = None,
) -> Path:
    """Write the model of ``src`` (a checkpoint, an export, a HF folder or Hub name) to ``dst``.

    ``fmt`` None: minigpt's file if ``dst`` ends in .safetensors, else a HF folder. Without
    ``dst``, beside ``src``: ``best-hf/`` or ``best.minigpt.safetensors``. The source is checked
    in full first; ``dst``'s missing folders are made; the output appears whole or not at all.
    """
    fmt = fmt or ("minigpt" if dst and str(dst).endswith(".safetensors") else "hf")
    source = Path(src).expanduser()
    out = Path(dst) if dst else default_output(source, fmt)
    if fmt == "hf":
        check_not_input(source, out)
        hf_folder.check_output(out, force)
        found = pretrained.read_source(str(src), key="checkpoint")
        return hf_folder.write_folder(found, out, force)
    check_output(source, out, force)
    found = pretrained.read_source(str(src), key="checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(found.state, out)
    return out


def default_output(src: Path, fmt: str) -> Path:
    """Beside the source: ``checkpoints/best-hf/`` or ``checkpoints/best.minigpt.safetensors``."""
    stem = src.name if src.is_dir() else src.stem
    return src.with_name(f"{stem}-hf" if fmt == "hf" else f"{stem}{OURS}")


def check_not_input(src: Path, out: Path) -> None:
    """Never the source (under any name, or a folder holding it), never a device or FIFO."""
    if not out.exists():
        return
    if not out.is_file() and not out.is_dir():  # renaming over it would replace /dev/full itself
        raise ExportError(f"{out} is not a regular file (a device, FIFO or socket); give a file")
    if src.exists() and os.path.samefile(src, out):
        how = "the same file" if src.resolve() == out.resolve() else "a hard link of it"
        raise ExportError(
            f"{out} is the checkpoint {src} itself ({how}); the export never writes over its "
            "input: give another output path"
        )
    if src.exists() and out.is_dir() and out.resolve() in src.resolve().parents:
        raise ExportError(
            f"{out} holds the source {src}; the export never writes over its input: give another "
            "output folder"
        )


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
    check_not_input(src, out)
    if not force:
        raise ExportError(f"{out} exists; pass --force to replace it")


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt.export CKPT [OUT] [--force]``: every failure is one ``error:`` line."""
    parser = OneLineParser(prog="python -m minigpt.export", description=__doc__)
    parser.add_argument(
        "checkpoint", help="a checkpoint (e.g. .../checkpoints/best.pt), an export or a HF model"
    )
    parser.add_argument(
        "output", nargs="?", help="default: beside the checkpoint, best-hf/ or best" + OURS
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="hf: a folder transformers opens (default); minigpt: minigpt's own .safetensors file",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, force=args.force, fmt=args.format)
    except (CheckpointError, ExportError, ConfigError) as err:
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
