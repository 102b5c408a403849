"""Every config check, value by value: the exact one-line message a bad value gets, and the edges
of each allowed range accepted.

The CLI prints a ConfigError as one line without a traceback, so its text is the whole interface:
each message must name the key, the value and what is allowed. The schemas are built directly,
which is how OmegaConf.to_object runs their ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from minigpt.config import (
    DEFAULT_CACHE_DIR,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    GenerateConfig,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    as_dict,
    register_configs,
    to_object,
    unknown_key_message,
)
from minigpt.model import GPTConfig

CONF = str(Path(__file__).resolve().parents[2] / "conf")
# GenerateConfig refuses a missing checkpoint; every other case gives one.
Generate = functools.partial(GenerateConfig, checkpoint="x.pt")
HF = DataConfig(tokenizer="hf")


def compose_config(*overrides: str, name: str = "config"):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _param_id(schema, kwargs: dict) -> str:
    name = getattr(schema, "__name__", "GenerateConfig")  # Generate is a partial
    return f"{name}:" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())


def case(schema, message: str, **kwargs):
    """A refused value: the schema, its keyword arguments, the exact message."""
    return pytest.param(schema, kwargs, message, id=_param_id(schema, kwargs))


def _keys_of(schema) -> str:
    return ", ".join(f.name for f in dataclasses.fields(schema))


REFUSED = [
    # model
    *(
        case(ModelConfig, f"model.{k}=0 must be >= 1", **{k: 0})
        for k in ("n_layer", "n_head", "d_model", "block_size")
    ),
    case(
        ModelConfig, "model.n_head=5 must divide model.d_model=384 (e.g. model.n_head=4)", n_head=5
    ),
    case(ModelConfig, "model.dropout=1.0 must be in [0, 1)", dropout=1.0),
    case(ModelConfig, "model.dropout=-0.1 must be in [0, 1)", dropout=-0.1),
    case(
        ModelConfig,
        "model.vocab_size=1 must be >= 2, or null to take the tokenizer's",
        vocab_size=1,
    ),
    # data
    case(
        DataConfig, "data.source='csv' is not allowed; use one of: stdlib, text, hub", source="csv"
    ),
    case(
        DataConfig,
        "data.tokenizer='wordpiece' is not allowed; use one of: byte, bpe, gpt2",
        tokenizer="wordpiece",
    ),
    case(
        DataConfig,
        "data.paths is empty; give files or globs, e.g. data.paths=[notes/*.txt]",
        source="text",
    ),
    *(
        case(
            DataConfig,
            "data.name is empty; name a Hugging Face dataset, "
            "e.g. data.name=roneneldan/TinyStories",
            source="hub",
            name=name,
        )
        for name in (None, "")
    ),
    case(DataConfig, "data.val_fraction=0.0 must be in (0, 0.5)", val_fraction=0.0),
    case(DataConfig, "data.val_fraction=0.5 must be in (0, 0.5)", val_fraction=0.5),
    *(
        case(
            DataConfig,
            f"data.vocab_size={v} must be in [257, 262144] for data.tokenizer=bpe",
            tokenizer="bpe",
            vocab_size=v,
        )
        for v in (256, 262145)
    ),
    case(DataConfig, "data.num_proc=0 must be >= 1", num_proc=0),
    case(DataConfig, "data.split_seed=-1 must be >= 0", split_seed=-1),
    case(
        DataConfig,
        "data.paths is only read by data=text, not by data=stdlib; "
        "choose that source with data=text, or drop data.paths",
        paths=["x"],
    ),
    *(
        case(
            DataConfig,
            f"data.{key} is only read by data=hub, not by data=text; "
            f"choose that source with data=hub, or drop data.{key}",
            source="text",
            paths=["x"],
            **{key: "other"},
        )
        for key in ("name", "config", "split", "text_column")
    ),
    # optimizer
    case(OptimizerConfig, "optimizer.name='sgd' is not allowed; use one of: adamw", name="sgd"),
    case(OptimizerConfig, "optimizer.lr=0.0 must be > 0", lr=0.0, min_lr=0.0),
    case(
        OptimizerConfig, "optimizer.min_lr=-1e-09 must be in [0, optimizer.lr=0.001]", min_lr=-1e-9
    ),
    case(
        OptimizerConfig, "optimizer.min_lr=0.002 must be in [0, optimizer.lr=0.001]", min_lr=0.002
    ),
    case(OptimizerConfig, "optimizer.weight_decay=-0.1 must be >= 0", weight_decay=-0.1),
    *(
        case(
            OptimizerConfig,
            f"optimizer.betas={betas} must be two numbers in [0, 1), e.g. [0.9,0.95]",
            betas=betas,
        )
        for betas in ([0.9], [0.9, 0.95, 0.99], [0.9, 1.0], [1.0, 0.9], [-0.1, 0.9], [0.9, -0.1])
    ),
    case(OptimizerConfig, "optimizer.warmup_steps=-1 must be >= 0", warmup_steps=-1),
    case(OptimizerConfig, "optimizer.grad_clip=-1.0 must be >= 0 (0: off)", grad_clip=-1.0),
    # train
    *(
        case(TrainConfig, f"train.{k}=0 must be >= 1", **{k: 0})
        for k in ("max_steps", "batch_size", "grad_accum", "eval_steps", "log_every")
    ),
    *(
        case(TrainConfig, f"train.{k}=-1 must be >= 0 (0: off)", **{k: -1})
        for k in ("eval_every", "ckpt_every", "sample_every")
    ),
    case(TrainConfig, "train.keep_last=0 must be >= 1", keep_last=0),
    case(TrainConfig, "train.seed=-1 must be in [0, 2**63)", seed=-1),
    case(TrainConfig, f"train.seed={2**63} must be in [0, 2**63)", seed=2**63),
    case(TrainConfig, "train.max_bad_steps=0 must be >= 1", max_bad_steps=0),
    case(
        TrainConfig, "train.device='tpu' is not allowed; use one of: auto, cpu, cuda", device="tpu"
    ),
    case(
        TrainConfig,
        "train.dtype='fp8' is not allowed; use one of: auto, float32, bfloat16, float16",
        dtype="fp8",
    ),
    case(
        TrainConfig,
        "train.progress='fancy' is not allowed; use one of: auto, bar, lines, off",
        progress="fancy",
    ),
    # cluster, logger
    case(
        ClusterConfig,
        "cluster.backend='mpi' is not allowed; use one of: auto, nccl, gloo",
        backend="mpi",
    ),
    case(ClusterConfig, "cluster.init_timeout_s=0 must be >= 1", init_timeout_s=0),
    case(
        LoggerConfig,
        "logger.mode='sometimes' is not allowed; use one of: online, offline, disabled",
        mode="sometimes",
    ),
    # root
    case(Config, "resume is empty; use auto, never or a checkpoint path", resume=""),
    case(
        Config,
        "init_from is empty; give a Hub name (gpt2), a model folder or a checkpoint, or null",
        init_from="",
    ),
    case(
        Config,
        "data.tokenizer=hf is a model folder's own tokenizer: it comes with init_from=FOLDER; "
        "use one of: byte, bpe, gpt2",
        data=HF,
    ),
    # generate
    *(
        case(
            Generate,
            "checkpoint is not set; pass checkpoint=PATH/TO/last.pt (or a Hugging Face model "
            "folder or Hub name, e.g. checkpoint=gpt2)",
            checkpoint=checkpoint,
        )
        for checkpoint in (None, "")
    ),
    case(Generate, "prompt_file is empty; give a file name, or prompt=TEXT", prompt_file=""),
    case(Generate, "max_tokens=-1 must be >= 0", max_tokens=-1),
    *(
        case(Generate, f"temperature={t} must be a finite number > 0", temperature=t)
        for t in (0.0, -1.0, float("inf"), float("nan"))
    ),
    case(Generate, "top_k=0 must be >= 1 or null", top_k=0),
    case(Generate, "top_p=0.0 must be in (0, 1] or null", top_p=0.0),
    case(Generate, "top_p=1.01 must be in (0, 1] or null", top_p=1.01),
    case(Generate, "num_samples=0 must be >= 1", num_samples=0),
    case(Generate, "seed=-1 must be in [0, 2**63)", seed=-1),
    case(Generate, f"seed={2**63} must be in [0, 2**63)", seed=2**63),
    case(Generate, "device='tpu' is not allowed; use one of: auto, cpu, cuda", device="tpu"),
]


@pytest.mark.parametrize(("schema", "kwargs", "message"), REFUSED)
def test_a_bad_value_gets_its_exact_one_line_message(schema, kwargs: dict, message: str) -> None:
    """The message is all the user sees: the key, the value, and what is allowed or how to fix."""
    with pytest.raises(ConfigError) as err:
        schema(**kwargs)
    assert str(err.value) == message


def accept(schema, **kwargs):
    """An accepted value, usually the edge of its range."""
    return pytest.param(schema, kwargs, id=_param_id(schema, kwargs))


ACCEPTED = [
    # model: the smallest shape, the ends of dropout's range, the smallest vocabulary
    accept(ModelConfig, n_layer=1, n_head=1, d_model=1, block_size=1),
    accept(ModelConfig, dropout=0.0),
    accept(ModelConfig, dropout=0.999),
    accept(ModelConfig, vocab_size=2),
    accept(ModelConfig, vocab_size=None),
    # data: each source with its own keys, the ends of the ranges
    accept(DataConfig, source="text", paths=["x"]),
    accept(DataConfig, source="hub", name="a", config="en", split="test", text_column="story"),
    accept(DataConfig, tokenizer="hf"),
    accept(DataConfig, tokenizer="gpt2"),
    accept(DataConfig, val_fraction=1e-9),
    accept(DataConfig, val_fraction=0.4999),
    accept(DataConfig, tokenizer="bpe", vocab_size=257),
    accept(DataConfig, tokenizer="bpe", vocab_size=262144),
    accept(DataConfig, tokenizer="byte", vocab_size=1),
    accept(DataConfig, num_proc=1, split_seed=0),
    # optimizer
    accept(OptimizerConfig, lr=1e-12, min_lr=0.0),
    accept(OptimizerConfig, lr=0.5, min_lr=0.5),
    accept(OptimizerConfig, weight_decay=0.0, warmup_steps=0, grad_clip=0.0),
    accept(OptimizerConfig, betas=[0.0, 0.999]),
    # train: each count at its smallest, each choice
    accept(TrainConfig, max_steps=1, batch_size=1, grad_accum=1, eval_steps=1, log_every=1),
    accept(TrainConfig, eval_every=0, ckpt_every=0, sample_every=0),
    accept(TrainConfig, keep_last=1, max_bad_steps=1),
    accept(TrainConfig, seed=0),
    accept(TrainConfig, seed=2**63 - 1),
    *(accept(TrainConfig, device=d) for d in ("auto", "cpu", "cuda")),
    *(accept(TrainConfig, dtype=d) for d in ("auto", "float32", "bfloat16", "float16")),
    *(accept(TrainConfig, progress=p) for p in ("auto", "bar", "lines", "off")),
    # cluster, logger
    *(accept(ClusterConfig, backend=b) for b in ("auto", "nccl", "gloo")),
    accept(ClusterConfig, init_timeout_s=1),
    *(accept(LoggerConfig, mode=m) for m in (None, "online", "offline", "disabled")),
    # root: a model folder's tokenizer comes with init_from
    accept(Config, resume="never", init_from="gpt2", data=HF),
    accept(Config, init_from=None),
    # generate
    accept(Generate, prompt_file="prompt.txt", max_tokens=0),
    accept(Generate, temperature=1e-9),
    accept(Generate, temperature=1e308),
    accept(Generate, top_k=1),
    accept(Generate, top_k=None),
    accept(Generate, top_p=1e-9),
    accept(Generate, top_p=1.0),
    accept(Generate, top_p=None),
    accept(Generate, num_samples=1),
    accept(Generate, seed=0),
    accept(Generate, seed=2**63 - 1),
    *(accept(Generate, device=d) for d in ("auto", "cpu", "cuda")),
]


@pytest.mark.parametrize(("schema", "kwargs"), ACCEPTED)
def test_the_edges_of_each_allowed_range_are_accepted(schema, kwargs: dict) -> None:
    """Each check refuses exactly what its message says, no more: the bounds themselves pass."""
    cfg = schema(**kwargs)
    assert {k: getattr(cfg, k) for k in kwargs} == kwargs


@pytest.mark.parametrize(
    ("d_model", "n_head", "suggested"),
    [(7, 2, 1), (7, 6, 7), (10, 3, 2), (384, 5, 4), (384, 7, 6), (384, 11, 12), (768, 100, 96)],
)
def test_a_head_count_that_does_not_divide_gets_the_nearest_divisor(
    d_model: int, n_head: int, suggested: int
) -> None:
    """The suggestion is the divisor of d_model nearest the asked n_head (the smaller on a tie),
    1 and d_model included."""
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=d_model, n_head=n_head)
    assert str(err.value) == (
        f"model.n_head={n_head} must divide model.d_model={d_model} (e.g. model.n_head={suggested})"
    )


def test_gpt_config_carries_the_shape_and_takes_the_tokenizers_vocabulary() -> None:
    """The model is rebuilt from this GPTConfig: every field must come across."""
    shape = {"n_layer": 2, "n_head": 3, "d_model": 12, "block_size": 5, "dropout": 0.25}
    expected = {**shape, "bias": False, "grad_checkpointing": True}
    model = ModelConfig(**expected)
    assert model.gpt_config(256) == GPTConfig(**expected, vocab_size=256)
    model.vocab_size = 300
    assert model.gpt_config(256) == GPTConfig(**expected, vocab_size=300)
    model.vocab_size = 256
    assert model.gpt_config(256).vocab_size == 256


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(vocab_size=255).gpt_config(256)
    assert str(err.value) == (
        "model.vocab_size=255 is smaller than the tokenizer's 256; leave it null"
    )


@pytest.mark.parametrize(
    ("cache_dir", "expected"),
    [("", DEFAULT_CACHE_DIR), ("  ", DEFAULT_CACHE_DIR), ("/c", "/c"), (" /c", " /c")],
)
def test_an_empty_cache_dir_means_the_default(cache_dir: str, expected: str) -> None:
    """$MINIGPT_CACHE_DIR exported but empty (or blank) must not cache into the working folder."""
    assert DataConfig(cache_dir=cache_dir).cache_dir == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+foo=1"],
            f"foo is not a key of the config; the keys are: {_keys_of(Config)}",
        ),
        (
            ["+train.max_step=1"],
            "train.max_step is not a key of train; did you mean train.max_steps? "
            f"The keys are: {_keys_of(TrainConfig)}",
        ),
        (
            ["+train.zzz=1"],
            f"train.zzz is not a key of train; the keys are: {_keys_of(TrainConfig)}",
        ),
        (
            ["+model.foo.bar=1"],
            f"model.foo is not a key of model; the keys are: {_keys_of(ModelConfig)}",
        ),
        (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number"),
        (["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf must be a finite number"),
        (["optimizer.grad_clip=inf"], "optimizer.grad_clip=inf must be a finite number"),
    ],
)
def test_to_object_refuses_unknown_keys_and_non_finite_numbers_in_one_line(
    overrides: list[str], message: str
) -> None:
    """Checks no schema can make on its own: keys added with + and inf, which passes every >."""
    with pytest.raises(ConfigError) as err:
        to_object(compose_config(*overrides))
    assert str(err.value) == message


def test_an_unknown_root_key_suggests_the_closest_with_the_rest_of_what_was_typed() -> None:
    assert unknown_key_message("trian", Config, "trian.max_steps") == (
        "trian is not a key of the config; did you mean train.max_steps? "
        f"The keys are: {_keys_of(Config)}"
    )
    assert unknown_key_message("trian", Config) == (
        f"trian is not a key of the config; did you mean train? The keys are: {_keys_of(Config)}"
    )


def test_an_omegaconf_error_becomes_one_line_naming_the_key(monkeypatch) -> None:
    monkeypatch.setenv("MINIGPT_TEST_LAYERS", "many")
    cfg = compose_config("model.n_layer=${oc.env:MINIGPT_TEST_LAYERS}")
    with pytest.raises(ConfigError) as err:
        to_object(cfg)
    assert str(err.value) == (
        "model.n_layer: While dereferencing interpolation '${oc.env:MINIGPT_TEST_LAYERS}': "
        "Value 'many' of type 'str' could not be converted to Integer"
    )


def _raising(err: OmegaConfBaseException):
    def to_object(cfg):
        raise err

    return to_object


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (ValidationError("bad value\n    full_key: \n"), "bad value"),
        (ValidationError(""), "ValidationError"),
    ],
)
def test_an_omegaconf_error_without_a_key_or_text_still_gets_a_line(
    monkeypatch, err: OmegaConfBaseException, message: str
) -> None:
    """A root-level error has no key to name (no "None: " in front); one with no text at all is
    named by its type rather than crashing on an empty first line."""
    cfg = compose_config()
    monkeypatch.setattr(OmegaConf, "to_object", _raising(err))
    with pytest.raises(ConfigError) as raised:
        to_object(cfg)
    assert str(raised.value) == message


def test_a_config_error_inside_an_omegaconf_error_reaches_the_user_unchanged(monkeypatch) -> None:
    """A schema check that OmegaConf wrapped (chained as the cause, as with OC_CAUSE=1) keeps its
    own line: the user sees our message, not OmegaConf's wrapping with its key and types."""
    err = ValidationError("Could not create instance\n    full_key: train")
    err.full_key = "train"
    err.__cause__ = ConfigError("train.seed=-1 must be in [0, 2**63)")
    cfg = compose_config()
    monkeypatch.setattr(OmegaConf, "to_object", _raising(err))
    with pytest.raises(ConfigError) as raised:
        to_object(cfg)
    assert str(raised.value) == "train.seed=-1 must be in [0, 2**63)"


def test_as_dict_is_the_plain_nested_dict_of_a_config() -> None:
    cfg = Config()
    assert as_dict(cfg) == dataclasses.asdict(cfg)
    assert as_dict(cfg)["train"]["seed"] == 1337


@dataclasses.dataclass
class _Curve:
    """A schema with a list of floats that no __post_init__ checks (betas checks its own)."""

    points: list[float] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_to_object_refuses_a_non_finite_number_inside_a_list(bad: float) -> None:
    """Every float reaching the trainer is finite, list entries included, whatever the schema."""
    with pytest.raises(ConfigError) as err:
        to_object(OmegaConf.structured(_Curve(points=[1.0, bad])))
    assert str(err.value) == f"points=[1.0, {bad}] must be a finite number"
    assert to_object(OmegaConf.structured(_Curve(points=[1.0, 2.0]))).points == [1.0, 2.0]
