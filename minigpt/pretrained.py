"""Where pretrained weights come from: a Hub name, a local folder, or a minigpt model file.

``init_from=`` (train.py) and ``checkpoint=`` (generate.py) take any of them:

- a minigpt checkpoint (``.pt``) or its safetensors export;
- a folder in Hugging Face's layout (``config.json`` + weights + tokenizer files);
- a Hub name (``gpt2``, ``openai-community/gpt2-medium``, ``someone/their-gpt2``), fetched into
  (or, offline, read from) the local Hugging Face cache.

Without a network a name that is not in the cache fails in seconds with one line, as ``data=hub``
does, instead of after minutes of retries.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt import checkpoint, hf, hf_folder, weights
from minigpt.checkpoint import CheckpointError
from minigpt.config import ConfigError, DataConfig, ModelConfig
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import Tokenizer, can_reach

# OpenAI's models: their ids are tiktoken's "gpt2" (the `gpt2` tokenizer kind).
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
OPENAI_ORGS = ("openai-community", "distilbert")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
MODEL_SUFFIXES = (".pt", ".safetensors", ".bin", ".pth")
# What a model folder on the Hub holds that we read; the weights are fetched one layout only.
HUB_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# Keys of model.* that set the shape: with init_from, the source's shape wins and these refuse.
SHAPE_KEYS = ("n_layer", "n_head", "d_model", "vocab_size", "bias")


def is_openai(name: str) -> bool:
    """Whether a Hub name is one of OpenAI's GPT-2 models (its tokenizer is tiktoken's gpt2)."""
    org, _, model = name.rpartition("/")
    return model in OPENAI_MODELS and org in ("", *OPENAI_ORGS)


def is_hub_name(spec: str) -> bool:
    """Whether ``spec`` (which names nothing here) reads as a Hub repo id, not a path."""
    return bool(HUB_NAME.match(spec)) and not spec.endswith(MODEL_SUFFIXES)


def read_source(spec: str, key: str = "checkpoint", device: str = "cpu") -> weights.ModelFile:
    """The checked model that ``spec`` names; ``key`` names the setting in error messages."""
    path = Path(spec).expanduser()
    kind = source_kind(spec, key)
    if kind == "folder":
        return hf_folder.read_folder(path)
    if kind == "hub":
        return hf_folder.read_folder(hub_folder(spec, key), gpt2_tokenizer=is_openai(spec))
    return weights.read_model_file(path, device)


def source_kind(spec: str, key: str = "checkpoint") -> str:
    """``file``, ``folder`` (Hugging Face's layout) or ``hub``; anything else is refused in one
    line that says what was found (a run folder: which checkpoint to give)."""
    path = Path(spec).expanduser()
    if hf_folder.is_model_folder(path):
        return "folder"
    if not path.exists() and not path.is_symlink() and is_hub_name(spec):
        return "hub"
    if path.is_dir():
        message = checkpoint.describe_folder(path, key)
        raise CheckpointError(
            message.replace(
                "(.pt) or a .safetensors export",
                "(.pt), a .safetensors export or a Hugging Face model folder (with config.json)",
            )
        )
    checkpoint.require_file(path, key=key)
    return "file"


def load_model(
    spec: str, device: str | torch.device = "cpu", key: str = "checkpoint"
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model (eval mode), tokenizer and state of any source: all that generation needs."""
    found = read_source(spec, key)
    return weights.build_model(found, spec, device), found.tokenizer, found.state


def source_shape(spec: str) -> GPTConfig | None:
    """The model shape ``spec`` holds, read without a download (None when it is not at hand):
    for a dry run's figures, before any job has fetched the source."""
    from huggingface_hub import try_to_load_from_cache

    path = Path(spec).expanduser()
    try:
        kind = source_kind(spec, "init_from")
        if kind == "file":
            return weights.read_model_file(path).config
        if kind == "hub":
            cached = try_to_load_from_cache(spec, hf_folder.CONFIG)
            if not isinstance(cached, str):
                return None
            path = Path(cached).parent
        config = hf_folder.read_json(path / hf_folder.CONFIG, spec)
        return GPTConfig(**hf.model_config_from_hf(config, spec))
    except (CheckpointError, ConfigError, ValueError):
        return None


# ---------------------------------------------------------------- the Hub
def hub_folder(name: str, key: str) -> Path:
    """The snapshot folder of Hub model ``name`` in the local HF cache, fetched if need be."""
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = hf_constants.HF_HUB_OFFLINE or not can_reach(hf_constants.ENDPOINT)

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(name, filename, local_files_only=offline))
        except EntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            if offline:
                return None
            raise

    try:
        config = fetch(hf_folder.CONFIG)
        if config is None:
            raise ConfigError(_not_found(name, key, offline, hf_constants.ENDPOINT))
        if not any(_fetch_weights(name, fetch)):
            raise ConfigError(f"{key}={name}: the Hub model has no weights we read ({_layouts()})")
        for filename in HUB_TOKENIZER_FILES:
            fetch(filename)
    except GatedRepoError:
        raise ConfigError(
            f"{key}={name} is gated on the Hugging Face Hub: accept its terms on the Hub and log "
            "in (huggingface-cli login), then run again"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}={name} is neither a file or folder here nor a model on the Hugging Face Hub"
        ) from None
    return config.parent


def _fetch_weights(name: str, fetch: Any) -> list[Path]:
    """One layout of weights: safetensors (one file or shards), else the pickled .bin."""
    for filename in hf_folder.WEIGHT_FILES + hf_folder.PICKLED_WEIGHTS:
        path = fetch(filename)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        shards = sorted(set(hf_folder.read_json(path, name).get("weight_map", {}).values()))
        return [path] + [p for p in map(fetch, shards) if p is not None]
    return []


def _layouts() -> str:
    return ", ".join(hf_folder.WEIGHT_FILES + hf_folder.PICKLED_WEIGHTS)


def _not_found(name: str, key: str, offline: bool, endpoint: str) -> str:
    if offline:
        return (
            f"{key}={name} is not a file or folder here, and not in the local Hugging Face cache "
            f"while {endpoint} cannot be reached (no network, or HF_HUB_OFFLINE=1); run once "
            "with network, or give a local folder that holds config.json and the weights"
        )
    return f"{key}={name}: the Hub model has no config.json (not a transformers model?)"


# ---------------------------------------------------------------- init_from
@dataclass
class Init:
    """What ``init_from`` gives a run: its model config, tokenizer and starting weights."""

    source: str
    model: ModelConfig
    tokenizer: Tokenizer
    tensors: dict[str, torch.Tensor]

    def describe(self) -> str:
        """``gpt2 (124.4M parameters, tokenizer gpt2)``, for the console and the log."""
        count = GPT.param_count_formula(self.gpt_config()) / 1e6
        return f"{self.source} ({count:.2f}M parameters, tokenizer {self.tokenizer.name})"

    def gpt_config(self) -> GPTConfig:
        return self.model.gpt_config(self.tokenizer.vocab_size)

    def weights(self) -> dict[str, torch.Tensor]:
        """The source's weights for this run's model: the position table cut to its block_size."""
        tensors = dict(self.tensors)
        wpe = "transformer.wpe.weight"
        tensors[wpe] = tensors[wpe][: self.model.block_size]
        return tensors


def plan_init(init_from: str, model: ModelConfig, data: DataConfig, overrides: list[str]) -> Init:
    """Read ``init_from`` and refuse, in one line, what the command line set against it.

    The shape comes from the source; ``model.dropout``, ``model.grad_checkpointing`` and a
    smaller ``model.block_size`` (the position table is cut, as nanoGPT does) are the run's.
    """
    found = read_source(init_from, key="init_from")
    given = _given(overrides)
    source = dataclasses.asdict(found.config)
    _refuse_shape_overrides(init_from, model, source, given)
    block_size = source["block_size"]
    if "model.block_size" in given or "model" in given:
        if model.block_size > block_size:
            raise ConfigError(
                f"model.block_size={model.block_size} is more than the {block_size} positions of "
                f"init_from={init_from}; give model.block_size={block_size} or less"
            )
        block_size = model.block_size
    _refuse_tokenizer_override(init_from, data, found.tokenizer, given)
    values = {
        **source,
        "block_size": block_size,
        "dropout": model.dropout,
        "grad_checkpointing": model.grad_checkpointing,
    }
    run_model = ModelConfig(**values, name=Path(init_from).name or init_from)
    return Init(init_from, run_model, found.tokenizer, found.tensors)


def _given(overrides: list[str]) -> dict[str, str]:
    """The keys the command line set (``model=small``, ``+model.n_layer=2``) and their values."""
    given = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep:
            given[key.lstrip("+~")] = value
    return given


def _refuse_shape_overrides(
    init_from: str, model: ModelConfig, source: dict[str, Any], given: dict[str, str]
) -> None:
    for key in SHAPE_KEYS:
        ours = getattr(model, key)
        if key == "vocab_size" and ours is None:
            continue  # null: "the tokenizer's", which is the source's here
        if ("model" in given or f"model.{key}" in given) and ours != source[key]:
            how = f"model={given['model']} sets" if f"model.{key}" not in given else "you set"
            raise ConfigError(
                f"model.{key}={ours} ({how} it) conflicts with init_from={init_from}, whose "
                f"{key} is {source[key]}: the shape comes from init_from; drop the model "
                "override (model.dropout and a smaller model.block_size may be set)"
            )


def _refuse_tokenizer_override(
    init_from: str, data: DataConfig, tokenizer: Tokenizer, given: dict[str, str]
) -> None:
    if "data.tokenizer" in given and data.tokenizer != tokenizer.name:
        raise ConfigError(
            f"data.tokenizer={data.tokenizer} conflicts with init_from={init_from}, whose "
            f"tokenizer is {tokenizer.name}: the tokenizer comes with the weights; drop "
            "data.tokenizer"
        )
