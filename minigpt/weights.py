"""Model weights in every format: what a model file must hold, the safetensors reader and writer,
and :func:`load_model`, which turns any of them into a model ready to sample.

``checkpoint.py`` owns the training checkpoint (``.pt``); this module imports it and adds the
formats that share weights with the world (safetensors here, Hugging Face folders in
:mod:`minigpt.hf_folder`), never the other way round.

Every file is hostile until checked. The config, the tokenizer and every tensor's name and shape
are validated before a model is built, and the parameter count that the config implies is
compared with the elements in the file before anything is allocated: a small file that claims a
48-layer model fails in milliseconds instead of asking for gigabytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt import checkpoint
from minigpt.checkpoint import CheckpointError
from minigpt.config import ConfigError, ModelConfig
from minigpt.model import GPT, GPTConfig, skip_init
from minigpt.tokenizer import Tokenizer, tokenizer_from_state

SAFETENSORS_FORMAT = "minigpt-safetensors"
EMBEDDING = "transformer.wte.weight"
TIED = "lm_head.weight"  # the same tensor as the token embedding: a safetensors file stores it once
# safetensors' names for the floating dtypes (its header says "F32", "BF16", ...).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
Shape = tuple[int, ...]


@dataclass
class ModelFile:
    """A checked model file: everything in it agrees with everything else."""

    config: GPTConfig
    tokenizer: Tokenizer
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]  # the whole file as read (a .pt's train state and config, say)


# ---------------------------------------------------------------- what a model file must hold
def check_model(
    where: str, model_config: Any, tokenizer: Any, shapes: dict[str, Shape], dtypes: dict[str, bool]
) -> tuple[GPTConfig, Tokenizer]:
    """Validate a model file's parts against each other before any model exists.

    ``shapes`` maps every tensor name in the file to its shape (the tied head included) and
    ``dtypes`` says whether each is floating. Raises CheckpointError naming ``where``.
    """
    config = _check_config(where, model_config)
    implied = GPT.param_count_formula(config)
    held = sum(math.prod(shape) for name, shape in shapes.items() if name != TIED)
    if implied != held:
        raise CheckpointError(
            f"{where}: the config implies {implied:,} parameters but the file holds {held:,}"
        )
    try:
        ModelConfig(**dataclasses.asdict(config))  # the rules a user's model config obeys
    except ConfigError as err:
        raise CheckpointError(f"{where}: {str(err).replace('model.', 'model_config.')}") from None
    _check_tensors(where, config, shapes, dtypes)
    return config, _check_tokenizer(where, tokenizer, config.vocab_size)


def _check_config(where: str, model_config: Any) -> GPTConfig:
    """Keys and types of the model config, and sizes >= 1 (which bound the count check)."""
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{where}: model_config is {_a(type(model_config))}, not a dict")
    types = typing.get_type_hints(GPTConfig)
    missing = [k for k in types if k not in model_config]
    if missing:
        raise CheckpointError(f"{where}: model_config lacks {', '.join(missing)}")
    for key, value in model_config.items():
        if key not in types:
            raise CheckpointError(
                f"{where}: model_config.{key} is not a model setting; "
                f"the settings are: {', '.join(types)}"
            )
        if not _is_a(value, types[key]):
            raise CheckpointError(f"{where}: model_config.{key}={value!r} must be {_a(types[key])}")
        # Before the count check: with every size >= 1 the count bounds each of them by the
        # file's size, so ModelConfig's checks (its divisor hint walks d_model) stay cheap.
        if types[key] is int and value < 1:
            raise CheckpointError(f"{where}: model_config.{key}={value} must be >= 1")
    return GPTConfig(**model_config)


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is not a number of layers
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _check_tensors(
    where: str, config: GPTConfig, shapes: dict[str, Shape], dtypes: dict[str, bool]
) -> None:
    """Every tensor the model has, of its shape and floating, and no other."""
    with torch.device("meta"), skip_init():  # names and shapes, nothing allocated or drawn
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    # Without the embedding there is no tied head either: name the one tensor to look for.
    missing = [k for k in expected if k not in shapes and (k != TIED or EMBEDDING in shapes)]
    extra = [k for k in shapes if k not in expected]
    if missing:
        raise CheckpointError(f"{where}: tensor {_names(missing)} missing")
    if extra:
        raise CheckpointError(f"{where}: tensor {_names(extra)} not part of the model")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(shapes[name])}, "
                f"the config needs {list(shape)}"
            )
        if not dtypes[name]:
            raise CheckpointError(f"{where}: tensor {name} is not floating point")


def _a(kind: type) -> str:
    """``a list``, ``an int``; ``None`` for JSON's null."""
    name = "None" if kind is type(None) else kind.__name__
    return name if name == "None" else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _names(names: list[str]) -> str:
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    verb = "is" if len(names) == 1 else "are"
    return f"{', '.join(names[:3])}{more} {verb}"


def _check_tokenizer(where: str, state: Any, vocab_size: int) -> Tokenizer:
    """The tokenizer, rebuilt, with no id the model's embedding lacks."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: tokenizer is {_a(type(state))}, not a dict")
    if state.get("kind") == "bpe" and not isinstance(state.get("json"), str):
        raise CheckpointError(f"{where}: tokenizer.json must be the BPE tokenizer's JSON text")
    try:
        tokenizer = tokenizer_from_state(state)
    except ValueError as err:  # ConfigError too: a gpt2 tokenizer without tiktoken's files
        raise CheckpointError(f"{where}: tokenizer: {_one_line(err)}") from None
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size:,} tokens but "
            f"model_config.vocab_size={vocab_size}"
        )
    return tokenizer


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the training checkpoint
def read_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelFile:
    """A training checkpoint's model, checked (``checkpoint.load`` keeps weights_only=True)."""
    state = checkpoint.load(path, map_location=device, read="model")
    where = str(path)
    tensors = state.get("model")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{where}: model is {_a(type(tensors))}, not a dict of tensors")
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: model[{name!r}] is not a tensor")
        if value.layout != torch.strided or value.is_meta:  # nothing to copy into a model
            raise CheckpointError(f"{where}: tensor {name} is sparse or holds no data")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtypes = {k: v.is_floating_point() for k, v in tensors.items()}
    config, tokenizer = check_model(
        where, state.get("model_config"), state.get("tokenizer"), shapes, dtypes
    )
    return ModelFile(config, tokenizer, tensors, state)


# ---------------------------------------------------------------- safetensors
def read_safetensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelFile:
    """A safetensors export, checked from its header alone before a tensor is read."""
    from safetensors import SafetensorError, safe_open

    where = str(path)
    checkpoint.require_file(Path(path))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            model_config, tokenizer = _read_metadata(where, metadata)
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() in FLOAT_DTYPES for k, s in slices.items()}
            if TIED in shapes:
                raise CheckpointError(f"{where}: holds {TIED}, which an export stores once")
            if EMBEDDING in shapes:
                shapes[TIED], dtypes[TIED] = shapes[EMBEDDING], dtypes[EMBEDDING]
            config, tok = check_model(where, model_config, tokenizer, shapes, dtypes)
            tensors = {k: f.get_tensor(k) for k in slices}
    except (SafetensorError, OSError) as err:
        found = checkpoint.sniff(Path(path))
        what = f"it is {found.what}" if found.kind in ("blank", "torch", "other") else err
        raise CheckpointError(f"{where} is not a readable safetensors file ({what})") from None
    tensors[TIED] = tensors[EMBEDDING]
    state = {"model": tensors, "model_config": model_config, "tokenizer": tokenizer}
    return ModelFile(config, tok, tensors, state)


def _read_metadata(where: str, metadata: dict[str, str]) -> tuple[Any, Any]:
    """The model config and tokenizer state that an export carries as JSON strings."""
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{where} is not a minigpt safetensors export: its metadata has format="
            f"{metadata.get('format')!r}, not {SAFETENSORS_FORMAT!r} (another program's weights?)"
        )
    values = []
    for key in ("model_config", "tokenizer"):
        if key not in metadata:
            raise CheckpointError(f"{where}: metadata lacks {key}")
        try:
            values.append(json.loads(metadata[key]))
        except ValueError:  # also a number too long for int()
            raise CheckpointError(f"{where}: metadata {key} is not JSON") from None
    return values[0], values[1]


def write_safetensors(state: dict[str, Any], dst: str | os.PathLike[str]) -> None:
    """Write a checkpoint's model as safetensors, atomically: temp file in ``dst``'s folder,
    then rename. Whatever happens (disk full, Ctrl-C), no temp file is left behind."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    dst = Path(dst)
    train_state = state.get("train_state")
    step = train_state.get("step", "") if isinstance(train_state, dict) else ""
    tensors = {k: v.contiguous() for k, v in state["model"].items() if k != TIED}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "model_config": json.dumps(state["model_config"]),
        "tokenizer": json.dumps(state["tokenizer"]),
        "step": str(step),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            # safetensors can drop the error of its last buffered write: reading the header
            # back proves the file is whole, and fsync surfaces a full disk before the rename.
            with safe_open(tmp, framework="pt"):
                pass
        except SafetensorError as err:
            raise _os_error(err, dst) from None
        _fsync(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an export is for sharing
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _os_error(err: Exception, dst: Path) -> OSError:
    """safetensors' I/O failure as the OSError it wraps ("... (os error 28)"), named after dst."""
    found = re.search(r"os error (\d+)", str(err))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else _one_line(err), str(dst))


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------- any format
def read_model_file(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelFile:
    """The checked model file at ``path``, whichever format its bytes (else its suffix) show.

    A file of any other kind (text, an image, a plain pickle...) is refused by what it is.
    """
    path = Path(path)
    checkpoint.require_file(path)
    found = checkpoint.sniff(path)
    if found.kind == "other":
        raise CheckpointError(
            f"{path} is not a model file: it is {found.what}; give a checkpoint (.pt), a "
            ".safetensors export or a model folder"
        )
    if found.kind == "safetensors" or (found.kind != "torch" and path.suffix == ".safetensors"):
        return read_safetensors(path, device)
    return read_checkpoint(path, device)


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model (eval mode), tokenizer and state of a model file: all that generation needs.

    Any damaged or hostile file is a CheckpointError, never a traceback.
    """
    found = read_model_file(path)  # on the host: a training checkpoint's optimizer state too
    return build_model(found, path, device), found.tokenizer, found.state


def build_model(found: ModelFile, where: Any, device: str | torch.device = "cpu") -> GPT:
    """The model of a checked model file, in eval mode on ``device``."""
    with skip_init():  # every weight is the file's
        model = GPT(found.config)
    try:
        model.load_state_dict(found.tensors)  # names, shapes and dtypes are checked by now
    except RuntimeError as err:  # a tensor kind no check foresaw: still the file's fault
        raise CheckpointError(f"{where}: the weights do not load ({_one_line(err)})") from None
    return model.to(device).eval()
