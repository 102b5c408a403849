"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML in ``conf/`` fills these dataclasses; entry points call :func:`to_object` once and the rest of
the package only ever sees the dataclasses. Each dataclass checks itself in ``__post_init__`` and
raises :class:`ConfigError` with a one-line message that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minigpt.model import GPTConfig


class ConfigError(ValueError):
    """A user-facing configuration error: printed as one line, never with a traceback."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    _require(
        value in allowed,
        f"{key}={value!r} is not allowed; use one of: {', '.join(map(str, allowed))}",
    )


@dataclass
class ModelConfig(GPTConfig):
    """GPT shape; ``vocab_size`` is filled from the tokenizer when left unset."""

    name: str = "custom"
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "block_size"):
            _require(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be >= 1")
        _require(
            self.d_model % self.n_head == 0,
            f"model.n_head={self.n_head} must divide model.d_model={self.d_model} "
            f"(e.g. model.n_head={_divisor_near(self.d_model, self.n_head)})",
        )
        _require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _require(
            self.vocab_size is None or self.vocab_size >= 2,
            f"model.vocab_size={self.vocab_size} must be >= 2, or null to take the tokenizer's",
        )

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model's own config, with the vocabulary taken from the tokenizer when unset."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)}
        values["vocab_size"] = self.vocab_size or vocab_size
        _require(
            values["vocab_size"] >= vocab_size,
            f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's {vocab_size}; "
            "leave it null",
        )
        return GPTConfig(**values)


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


DATA_SOURCES = ("stdlib", "text", "hub")
# The cache folder when neither data.cache_dir nor $MINIGPT_CACHE_DIR says (token caches, the peak).
DEFAULT_CACHE_DIR = "~/.cache/minigpt"
TOKENIZERS = ("byte", "bpe", "gpt2")
# A model folder's own tokenizer.json: set by init_from (the trainer), never chosen by a user.
PRETRAINED_TOKENIZER = "hf"
# The keys only one source reads: set for another, they would be ignored without a word
# (data.paths=[...] without data=text trained on the stdlib corpus).
SOURCE_KEYS = {"text": ("paths",), "hub": ("name", "config", "split", "text_column")}


@dataclass
class DataConfig:
    """Where text comes from, how it is tokenized, and where the token cache lives."""

    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    name: str | None = None
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    tokenizer: str = "byte"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    cache_dir: str = DEFAULT_CACHE_DIR
    num_proc: int = 2
    split_seed: int = 1234

    def __post_init__(self) -> None:
        if not self.cache_dir.strip():
            # conf/data reads ${oc.env:MINIGPT_CACHE_DIR,...}: an exported but empty variable
            # counts as unset, rather than caching into the working directory.
            self.cache_dir = DEFAULT_CACHE_DIR
        _one_of("data.source", self.source, DATA_SOURCES)
        if self.tokenizer != PRETRAINED_TOKENIZER:
            _one_of("data.tokenizer", self.tokenizer, TOKENIZERS)
        self._refuse_keys_of_other_sources()
        _require(
            self.source != "text" or len(self.paths) > 0,
            "data.paths is empty; give files or globs, e.g. data.paths=[notes/*.txt]",
        )
        _require(
            self.source != "hub" or bool(self.name),
            "data.name is empty; name a Hugging Face dataset, "
            "e.g. data.name=roneneldan/TinyStories",
        )
        _require(
            0.0 < self.val_fraction < 0.5,
            f"data.val_fraction={self.val_fraction} must be in (0, 0.5)",
        )
        _require(
            self.tokenizer != "bpe" or 257 <= self.vocab_size <= 65536 * 4,
            f"data.vocab_size={self.vocab_size} must be in [257, 262144] for data.tokenizer=bpe",
        )
        _require(self.num_proc >= 1, f"data.num_proc={self.num_proc} must be >= 1")
        _require(self.split_seed >= 0, f"data.split_seed={self.split_seed} must be >= 0")

    def _refuse_keys_of_other_sources(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
        defaults["paths"] = []
        for source, keys in SOURCE_KEYS.items():
            for key in keys:
                _require(
                    self.source == source or getattr(self, key) == defaults[key],
                    f"data.{key} is only read by data={source}, not by data={self.source}; "
                    f"choose that source with data={source}, or drop data.{key}",
                )


OPTIMIZERS = ("adamw",)


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr``."""

    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _one_of("optimizer.name", self.name, OPTIMIZERS)
        _require(self.lr > 0, f"optimizer.lr={self.lr} must be > 0")
        _require(
            0 <= self.min_lr <= self.lr,
            f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]",
        )
        _require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9,0.95]",
        )
        _require(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        _require(self.grad_clip >= 0, f"optimizer.grad_clip={self.grad_clip} must be >= 0 (0: off)")


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """The loop's knobs; ``batch_size`` is sequences per device per micro-step."""

    max_steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 100
    eval_steps: int = 20
    ckpt_every: int = 100
    log_every: int = 10
    sample_every: int = 0
    keep_last: int = 1
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    max_bad_steps: int = 20
    progress: str = "auto"
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "eval_steps", "log_every"):
            _require(getattr(self, key) >= 1, f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("eval_every", "ckpt_every", "sample_every"):
            _require(
                getattr(self, key) >= 0, f"train.{key}={getattr(self, key)} must be >= 0 (0: off)"
            )
        _require(self.keep_last >= 1, f"train.keep_last={self.keep_last} must be >= 1")
        _require(0 <= self.seed < 2**63, f"train.seed={self.seed} must be in [0, 2**63)")
        _require(self.max_bad_steps >= 1, f"train.max_bad_steps={self.max_bad_steps} must be >= 1")
        _one_of("train.device", self.device, DEVICES)
        _one_of("train.dtype", self.dtype, DTYPES)
        _one_of("train.progress", self.progress, ("auto", "bar", "lines", "off"))
        _one_of("train.parallel", self.parallel, ("ddp", "fsdp"))
        _require(
            not (self.parallel == "fsdp" and self.dtype == "float16"),
            "train.dtype=float16 needs a gradient scaler that train.parallel=fsdp does not "
            "shard; give train.dtype=bfloat16 (or float32), or train.parallel=ddp",
        )


@dataclass
class ClusterConfig:
    """Process-group settings; the launcher itself is chosen by the ``cluster=`` preset."""

    name: str = "local"
    backend: str = "auto"
    init_timeout_s: int = 300
    gpu_memory_gb: float | None = None  # one GPU's memory: the dry run warns past it

    def __post_init__(self) -> None:
        _one_of("cluster.backend", self.backend, ("auto", "nccl", "gloo"))
        _require(
            self.gpu_memory_gb is None or self.gpu_memory_gb > 0,
            f"cluster.gpu_memory_gb={self.gpu_memory_gb} must be > 0 (null: not declared)",
        )
        _require(
            self.init_timeout_s >= 1, f"cluster.init_timeout_s={self.init_timeout_s} must be >= 1"
        )


@dataclass
class LoggerConfig:
    """Which trackers get the metrics; several at once: ``logger=[wandb,tensorboard]``."""

    jsonl: bool = True
    wandb: bool = False
    tensorboard: bool = False
    project: str = "minigpt"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    mode: str | None = None  # None: $WANDB_MODE, else offline (minigpt.tracking.wandb_mode)

    def __post_init__(self) -> None:
        _require(
            self.mode in (None, "online", "offline", "disabled"),
            f"logger.mode={self.mode!r} is not allowed; use one of: online, offline, disabled",
        )


@dataclass
class Config:
    """The root config composed by ``conf/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    resume: str = "auto"
    init_from: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.resume), "resume is empty; use auto, never or a checkpoint path")
        _require(
            self.init_from != "",
            "init_from is empty; give a Hub name (gpt2), a model folder or a checkpoint, or null",
        )
        _require(
            self.data.tokenizer != PRETRAINED_TOKENIZER or self.init_from is not None,
            f"data.tokenizer={PRETRAINED_TOKENIZER} is a model folder's own tokenizer: it comes "
            f"with init_from=FOLDER; use one of: {', '.join(TOKENIZERS)}",
        )


@dataclass
class GenerateConfig:
    """``generate.py``'s options."""

    checkpoint: str | None = None
    prompt: str = "\n"
    prompt_file: str | None = None
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    num_samples: int = 1
    seed: int = 1337
    device: str = "auto"
    kv_cache: bool = True

    def __post_init__(self) -> None:
        _require(
            bool(self.checkpoint),
            "checkpoint is not set; pass checkpoint=PATH/TO/last.pt (or a Hugging Face "
            "model folder or Hub name, e.g. checkpoint=gpt2)",
        )
        _require(self.prompt_file != "", "prompt_file is empty; give a file name, or prompt=TEXT")
        _require(self.max_tokens >= 0, f"max_tokens={self.max_tokens} must be >= 0")
        # The comparisons are False for nan; inf would turn every logit into nan.
        _require(
            0 < self.temperature < float("inf"),
            f"temperature={self.temperature} must be a finite number > 0",
        )
        _require(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be >= 1 or null")
        _require(
            self.top_p is None or 0 < self.top_p <= 1,
            f"top_p={self.top_p} must be in (0, 1] or null",
        )
        _require(self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1")
        # torch.Generator.manual_seed takes a 64-bit integer; [0, 2**63) fits every device's.
        _require(0 <= self.seed < 2**63, f"seed={self.seed} must be in [0, 2**63)")
        _one_of("device", self.device, DEVICES)


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "cluster": ClusterConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Store the schemas as ``base_<group>`` (extended by ``conf/<group>/*.yaml``) and the roots."""
    cs = ConfigStore.instance()
    for group, schema in GROUPS.items():
        # At the root, not in the group: a schema stored in group `model` would be an option of
        # `model=` (a 10.8M default model). Each conf/<group>/*.yaml names it as `/base_<group>`.
        cs.store(name=f"base_{group}", node=schema)
    cs.store(name="base_config", node=Config)
    cs.store(name="base_generate", node=GenerateConfig)


def to_object(cfg: DictConfig) -> Any:
    """Turn a composed DictConfig into its dataclass, mapping OmegaConf errors to ConfigError."""
    _refuse_unknown_keys(cfg, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None
    _refuse_non_finite(obj, "")
    return obj


def _refuse_non_finite(obj: Any, prefix: str) -> None:
    """inf and nan pass every ``>`` check (``optimizer.lr=inf`` trained a model of NaNs)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _refuse_non_finite(value, f"{prefix}{f.name}.")
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{prefix}{f.name}={value} must be a finite number")


def _refuse_unknown_keys(node: DictConfig, prefix: str) -> None:
    """A key added with ``+`` that no schema has would be silently ignored (``+train.max_step``
    for ``train.max_steps``): refuse it, naming the keys that exist."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in known:
                raise ConfigError(unknown_key_message(f"{prefix}{key}", schema))
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


def unknown_key_message(full_key: str, schema: Any, typed: str | None = None) -> str:
    """``train.max_step is not a key of train; did you mean train.max_steps? The keys are: ...``

    ``full_key`` is the first unknown part of what the user ``typed`` (``trian`` of
    ``trian.max_steps``); the suggestion keeps the rest of what was typed.
    """
    parent, _, key = full_key.rpartition(".")
    known = [f.name for f in dataclasses.fields(schema)]
    message = f"{full_key} is not a key of {parent or 'the config'}"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        return f"{message}; the keys are: {', '.join(known)}"
    rest = (typed or full_key)[len(full_key) :]
    suggestion = f"{parent}.{close[0]}" if parent else close[0]
    return f"{message}; did you mean {suggestion}{rest}? The keys are: {', '.join(known)}"


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    cause = err.__cause__
    if isinstance(cause, ConfigError):
        return str(cause)
    return f"{key}: {first}" if key else first


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a config dataclass (for run.json and checkpoints)."""
    return dataclasses.asdict(obj)
