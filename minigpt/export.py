"""Model-only export to safetensors, for sharing weights: ``python -m minigpt.export CKPT [OUT]``.

A training checkpoint carries the optimizer, RNG and sampler state and is a (weights-only) pickle;
a ``.safetensors`` file holds tensors alone and cannot run code on load, whoever made it. The model
config and tokenizer travel as its string metadata, so ``generate.py checkpoint=model.safetensors``
works from the file alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from minigpt import checkpoint

FORMAT = "minigpt-safetensors"
TIED = "lm_head.weight"  # the same tensor as transformer.wte.weight: stored once


def export(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None) -> Path:
    """Write the model weights of checkpoint ``src`` to ``dst`` (default: beside it)."""
    from safetensors.torch import save_file

    src = Path(src)
    out = Path(dst) if dst else src.with_suffix(".safetensors")
    state = checkpoint.load(src)
    tensors = {k: v.contiguous() for k, v in state["model"].items() if k != TIED}
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(state["model_config"]),
        "tokenizer": json.dumps(state["tokenizer"]),
        "step": str(state.get("train_state", {}).get("step", "")),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """What ``checkpoint.load_model`` needs from an export: weights, config, tokenizer."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError) as err:
        raise checkpoint.CheckpointError(
            f"{path} is not a readable safetensors file ({err})"
        ) from None
    if meta.get("format") != FORMAT:
        raise checkpoint.CheckpointError(f"{path} is not a minigpt safetensors export")
    tensors[TIED] = tensors["transformer.wte.weight"]
    return {
        "model": tensors,
        "model_config": json.loads(meta["model_config"]),
        "tokenizer": json.loads(meta["tokenizer"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minigpt.export", description=__doc__)
    parser.add_argument("checkpoint", help="a minigpt checkpoint, e.g. .../checkpoints/best.pt")
    parser.add_argument("output", nargs="?", help="default: the checkpoint's name, .safetensors")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output)
    except checkpoint.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
