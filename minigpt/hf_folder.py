"""Hugging Face model folders: read one as a checked model file, write one ``transformers`` opens.

A folder holds ``config.json``, the weights (``model.safetensors``, sharded safetensors with their
``.index.json``, or ``pytorch_model.bin`` read with ``weights_only=True``) and the tokenizer files.
Reading maps them through :mod:`minigpt.hf` and checks them like any model file
(:func:`minigpt.weights.check_model`). Writing builds the folder under a temporary name beside
the target and renames it into place: an export appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from minigpt import hf, hf_tokenizers
from minigpt.checkpoint import CheckpointError
from minigpt.weights import ModelFile, check_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# In the order a folder's weights are looked for: one file, or the shards an index names.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class ExportError(ValueError):
    """An output the export refuses (printed as one line)."""


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder in Hugging Face's layout (it has a config.json)."""
    return path.is_dir() and (path / CONFIG).is_file()


# ---------------------------------------------------------------- reading
def read_folder(folder: Path, gpt2_tokenizer: bool = False) -> ModelFile:
    """The checked model of a HF GPT-2 folder; ``gpt2_tokenizer``: OpenAI's model, whose ids are
    tiktoken's ``gpt2`` (faster than the folder's tokenizer.json, and a checkpoint names it)."""
    where = str(folder)
    config = read_json(folder / CONFIG, where)
    model_config = hf.model_config_from_hf(config, where)
    tensors = hf.from_hf(_read_tensors(folder, where), where)
    tokenizer = _tokenizer_state(folder, config, gpt2_tokenizer, where)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtypes = {k: v.is_floating_point() for k, v in tensors.items()}
    gpt_config, tok = check_model(where, model_config, tokenizer, shapes, dtypes)
    state = {"model": tensors, "model_config": model_config, "tokenizer": tok.state()}
    return ModelFile(gpt_config, tok, tensors, state)


def read_json(path: Path, where: str) -> Any:
    """A JSON file of the folder; a missing or broken one is one line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path.name} is missing") from None
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError too
        raise CheckpointError(f"{where}: {path.name} is not readable JSON ({err})") from None


def _read_tensors(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights, whichever of the four layouts holds them."""
    for name in WEIGHT_FILES + PICKLED_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        files = _shards(path, where) if name.endswith(".index.json") else [path]
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(_read_weight_file(file, where))
        return tensors
    raise CheckpointError(
        f"{where} holds no weights: expected {' or '.join(WEIGHT_FILES + PICKLED_WEIGHTS[:1])}"
    )


def _shards(index: Path, where: str) -> list[Path]:
    """The shard files an ``.index.json`` names: plain names inside the folder, all present."""
    weight_map = read_json(index, where).get("weight_map") if index.is_file() else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: {index.name} has no weight_map")
    names = sorted({str(v) for v in weight_map.values()})
    for name in names:
        if Path(name).name != name or not (index.parent / name).is_file():
            raise CheckpointError(f"{where}: {index.name} names {name!r}, not a file of the folder")
    return [index.parent / n for n in names]


def _read_weight_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{where}: {path.name} is not readable ({err})") from None
    try:  # weights_only: a pickle from the internet never runs code here
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # any failure to parse the file is the file's fault
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where}: {path.name} is not readable ({first[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where}: {path.name} is not a dict of tensors")
    return state


def _tokenizer_state(
    folder: Path, config: dict[str, Any], gpt2_tokenizer: bool, where: str
) -> dict[str, Any]:
    """Our kind for the folder's tokenizer: the one an export names, GPT-2's, or a wrapper."""
    kind = config.get(hf.TOKENIZER_KEY)
    if kind in ("byte", "gpt2") or (gpt2_tokenizer and kind is None):
        return {"kind": kind or "gpt2"}
    try:
        if kind == "bpe":  # trained by minigpt: the same state it had, so a resume matches it
            return {"kind": "bpe", "json": (folder / "tokenizer.json").read_text(encoding="utf-8")}
        tok = hf_tokenizers.tokenizer_from_folder(folder, config.get("eos_token_id"))
    except ValueError as err:  # the bpe kind is built once, by check_model, from its state
        raise CheckpointError(str(err)) from None
    except OSError as err:
        raise CheckpointError(f"{where}: tokenizer.json is not readable ({err})") from None
    return tok.state()


# ---------------------------------------------------------------- writing
def check_exportable(found: ModelFile) -> None:
    """Refuse, before anything is written, a model transformers cannot express."""
    try:
        hf.hf_config(dataclasses.asdict(found.config), {})
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def check_output(out: Path, force: bool) -> None:
    """A new folder, or (with ``force``) an earlier export; never a file or someone's folder."""
    if not out.exists() and not out.is_symlink():
        folder = next((p for p in out.parents if p.exists() or p.is_symlink()), None)
        if folder is not None and not folder.is_dir():
            raise ExportError(f"cannot write {out}: {folder} is a file, not a folder")
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(
            f"{out} exists and is not a folder; a Hugging Face export is a folder: give a new name"
        )
    if not _is_export(out) and any(out.iterdir()):
        raise ExportError(
            f"{out} is a folder that holds other files, not an earlier export; give a new "
            "folder name (the export replaces a folder only if it made it)"
        )
    if not force and any(out.iterdir()):
        raise ExportError(f"{out} holds an earlier export; pass --force to replace it")


def _is_export(folder: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return hf.TOKENIZER_KEY in json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    return False


def write_folder(found: ModelFile, out: Path, force: bool = False) -> Path:
    """Write ``found`` as a folder ``AutoModelForCausalLM`` and ``AutoTokenizer`` open as is."""
    check_exportable(found)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_contents(found, tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return out


def _write_contents(found: ModelFile, folder: Path) -> None:
    from safetensors.torch import save_file

    model_config = dataclasses.asdict(found.config)
    ids = hf_tokenizers.write_tokenizer_files(found.tokenizer, folder, model_config["block_size"])
    config = {**hf.hf_config(model_config, ids), hf.TOKENIZER_KEY: found.tokenizer.name}
    _write_json(folder / CONFIG, config)
    _write_json(folder / "generation_config.json", hf.generation_config(ids))
    # format=pt: transformers reads a safetensors file without it as another framework's.
    save_file(hf.to_hf(found.tensors), str(folder / WEIGHTS), metadata={"format": "pt"})
    for path in folder.iterdir():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
