"""Config composition and validation through Hydra's own compose API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from minigpt.config import Config, ConfigError, GenerateConfig, register_configs, to_object

CONF = str(Path(__file__).resolve().parents[2] / "conf")
MODELS = ["tiny", "mini", "small", "medium", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def compose_config(*overrides: str, name: str = "config"):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_defaults_compose_into_typed_config() -> None:
    cfg = to_object(compose_config())
    assert isinstance(cfg, Config)
    assert cfg.model.name == "mini"
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.block_size) == (
        4,
        4,
        256,
        128,
    )
    assert cfg.data.source == "stdlib" and cfg.data.tokenizer == "byte"
    assert cfg.optimizer.name == "adamw"
    assert cfg.resume == "auto"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_is_valid(model: str) -> None:
    cfg = to_object(compose_config(f"model={model}"))
    assert cfg.model.name == model
    assert cfg.model.d_model % cfg.model.n_head == 0


def test_gpt2_presets_have_gpt2_shapes() -> None:
    shapes = {m: to_object(compose_config(f"model={m}")).model for m in MODELS[4:]}
    as_tuple = {m: (c.n_layer, c.n_head, c.d_model, c.block_size) for m, c in shapes.items()}
    assert as_tuple == {
        "gpt2": (12, 12, 768, 1024),
        "gpt2-medium": (24, 16, 1024, 1024),
        "gpt2-large": (36, 20, 1280, 1024),
        "gpt2-xl": (48, 25, 1600, 1024),
    }


def test_vocab_size_is_filled_from_the_tokenizer() -> None:
    cfg = to_object(compose_config("model=tiny"))
    assert cfg.model.vocab_size is None
    assert cfg.model.gpt_config(256).vocab_size == 256
    with pytest.raises(ConfigError, match="model.vocab_size"):
        to_object(compose_config("model=tiny", "model.vocab_size=100")).model.gpt_config(256)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_head=5", "model.n_head=5 must divide model.d_model=256"),
        ("model.dropout=1.5", "model.dropout"),
        ("data.tokenizer=wordpiece", "data.tokenizer='wordpiece' is not allowed; use one of: byte"),
        ("data.val_fraction=0.9", "data.val_fraction"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("train.device=tpu", "train.device='tpu'"),
        ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
        ("train.dtype=fp8", "train.dtype='fp8'"),
        ("optimizer.lr=inf", "optimizer.lr=inf must be a finite number"),
        ("optimizer.weight_decay=nan", "optimizer.weight_decay=nan must be"),
        ("optimizer.betas=[0.9,inf]", "optimizer.betas"),
        ("optimizer.grad_clip=inf", "optimizer.grad_clip=inf must be a finite number"),
        ("train.seed=-1", "train.seed=-1 must be in"),
        ("data.split_seed=-1", "data.split_seed=-1 must be >= 0"),
        ("train.keep_last=0", "train.keep_last=0 must be >= 1"),
        ("train.keep_last=-2", "train.keep_last=-2 must be >= 1"),
        ("train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
        ("train.grad_accum=-1", "train.grad_accum=-1 must be >= 1"),
        ("train.eval_steps=0", "train.eval_steps=0 must be >= 1"),
        ("train.eval_steps=-1", "train.eval_steps=-1 must be >= 1"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.log_every=-1", "train.log_every=-1 must be >= 1"),
    ],
)
def test_bad_value_raises_config_error_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        to_object(compose_config(override))


def test_wrong_type_on_the_command_line_is_refused_by_hydra_naming_the_key() -> None:
    """Hydra checks an override against the schema while composing (the CLI prints it as one
    line); the key it names is in the ValidationError it wraps."""
    with pytest.raises(ConfigCompositionException, match="override model.n_layer=many") as err:
        compose_config("model.n_layer=many")
    assert isinstance(err.value.__cause__, ValidationError)
    assert err.value.__cause__.full_key == "model.n_layer"
    assert "'many' of type 'str' could not be converted to Integer" in str(err.value.__cause__)


def test_wrong_type_reaching_to_object_is_a_config_error_naming_the_key(monkeypatch) -> None:
    """Interpolations resolve in to_object, which must turn OmegaConf's error into ours."""
    monkeypatch.setenv("MINIGPT_TEST_LAYERS", "many")
    cfg = compose_config("model.n_layer=${oc.env:MINIGPT_TEST_LAYERS}")
    with pytest.raises(ConfigError, match=r"^model\.n_layer: .*'many' of type 'str' could not be"):
        to_object(cfg)


def test_text_data_needs_paths() -> None:
    with pytest.raises(ConfigError, match=r"^data\.paths is empty; give files or globs"):
        to_object(compose_config("data=text"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("temperature=0", "temperature=0"), ("top_k=0", "top_k=0"), ("top_p=1.01", "top_p=1.01")],
)
def test_generate_config_validates_sampling_options(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_object(compose_config("checkpoint=x.pt", override, name="generate"))


def test_generate_defaults() -> None:
    cfg = to_object(compose_config("checkpoint=x.pt", name="generate"))
    assert isinstance(cfg, GenerateConfig)
    assert (cfg.max_tokens, cfg.temperature, cfg.top_k, cfg.num_samples) == (200, 0.8, 40, 1)


@pytest.mark.parametrize(
    "prompt",
    [
        "def main(",
        "it's",
        r"a\nb",
        'x = "y"',
        "a,b",
        "[1, 2]",
        "tail\\",
        r"a\'b",
        "f(x)\n    y",
        "",
    ],
)
def test_free_text_prompts_reach_the_config_unchanged(prompt: str) -> None:
    from minigpt.cli import quote_free_text

    (arg,) = quote_free_text([f"prompt={prompt}"], keys=("prompt",))
    cfg = compose_config("checkpoint=x.pt", arg, name="generate")
    assert cfg.prompt == prompt


def test_prompts_already_in_hydra_quotes_are_left_alone() -> None:
    from minigpt.cli import quote_free_text

    assert quote_free_text(["prompt='a,b'", "top_k=3"], keys=("prompt",)) == [
        "prompt='a,b'",
        "top_k=3",
    ]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Job (task=0) failed during processing with trace:\n----\nTraceback (most recent "
            "call last):\n  File x\nerror: data.paths entry 'x' matches no file\n",
            "data.paths entry 'x' matches no file",
        ),
        (
            "Job 12_0 (task: 0) with path /s/.submitit/12_0 has not produced any output "
            "(state: OUT_OF_MEMORY)\nError stream produced:\n----\nKilled\n",
            "Job 12_0 (task: 0) with path /s/.submitit/12_0 has not produced any output (state: "
            "OUT_OF_MEMORY) (job 12_0)",
        ),
    ],
)
def test_a_failed_slurm_job_is_summed_up_by_its_error_line(message: str, expected: str) -> None:
    from minigpt import cli

    assert cli._job_error(message) == expected


def test_schemas_are_not_options_of_their_groups() -> None:
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        options = {g: loader.get_group_options(g) for g in ("model", "data", "optimizer", "train")}
        options |= {g: loader.get_group_options(g) for g in ("cluster", "logger")}
    assert options["model"] == sorted(MODELS)
    assert not [o for opts in options.values() for o in opts if o.startswith("base_")]
    with pytest.raises(MissingConfigException, match="Could not find 'model/base_model'"):
        compose_config("model=base_model")


@pytest.mark.parametrize("override", ["model.n_layers=3", "data.path=[a]", "train.seeds=1"])
def test_presets_stay_typed_by_their_schema(override: str) -> None:
    from omegaconf import OmegaConf

    from minigpt.config import GROUPS

    cfg = compose_config("model=tiny", "data=text", "data.paths=[x]", "logger=[wandb,none]")
    assert {g: OmegaConf.get_type(cfg[g]) for g in GROUPS} == GROUPS
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        compose_config(override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.paths=[/etc/hostname]"],
            "data.paths is only read by data=text, not by data=stdlib; "
            "choose that source with data=text, or drop data.paths",
        ),
        (["data=hub", "data.name=a/b", "data.paths=[x]"], "data.paths is only read by data=text"),
        (["data=text", "data.paths=[x]", "data.name=a/b"], "data.name is only read by data=hub"),
        (["data.config=en"], "data.config is only read by data=hub, not by data=stdlib"),
        (["data.split=test"], "data.split is only read by data=hub"),
        (["data=text", "data.paths=[x]", "data.text_column=story"], "data.text_column is only"),
    ],
)
def test_a_key_the_chosen_source_does_not_read_is_refused(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_object(compose_config(*overrides))


def test_each_source_takes_its_own_keys() -> None:
    hub = to_object(compose_config("data=hub", "data.name=a/b", "data.split=test")).data
    assert (hub.source, hub.name, hub.split) == ("hub", "a/b", "test")
    text = to_object(compose_config("data=text", "data.paths=[x]")).data
    assert (text.source, text.paths) == ("text", ["x"])


@pytest.mark.parametrize(
    ("full_key", "typed", "message"),
    [
        (
            "train.max_step",
            None,
            "train.max_step is not a key of train; did you mean train.max_steps? "
            "The keys are: max_steps, batch_size,",
        ),
        ("trian", "trian.max_steps", "trian is not a key of the config; did you mean "),
        ("train.zzz", None, "train.zzz is not a key of train; the keys are: max_steps,"),
    ],
)
def test_an_unknown_key_names_the_closest_one(full_key: str, typed, message: str) -> None:
    from minigpt.config import Config, TrainConfig, unknown_key_message

    schema = Config if "." not in full_key else TrainConfig
    assert unknown_key_message(full_key, schema, typed).startswith(message)
    if typed:
        assert "did you mean train.max_steps?" in unknown_key_message(full_key, schema, typed)
