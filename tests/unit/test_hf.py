"""Hugging Face GPT-2 weights in and out: transformers' own models stand for the Hub.

Each model is a ``transformers.GPT2LMHeadModel`` with random weights (every parameter drawn, so a
bias or LayerNorm read from the wrong place shows), saved with ``save_pretrained`` into a temp
folder. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt import export, hf, hf_folder, hf_tokenizers, pretrained, weights
from minigpt.checkpoint import CheckpointError
from minigpt.config import ConfigError, DataConfig, ModelConfig
from minigpt.hf_folder import ExportError
from minigpt.sample import generate
from minigpt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

transformers = pytest.importorskip("transformers", reason="pip install -e '.[dev]'")

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
TEXT = "def f(x):\n    return x * 2  # naïve café 東京 😀\n\n\tdone  \r\n"


def hf_model(vocab_size: int = 256, seed: int = 0, **config: Any) -> Any:
    """A GPT-2 of transformers with every parameter random."""
    torch.manual_seed(seed)
    settings = {**TINY, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": None}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def save_folder(model: Any, folder: Path, tokenizer: Tokenizer | None = None) -> Path:
    """``save_pretrained`` plus tokenizer files, as a Hub repo holds them."""
    model.save_pretrained(folder)
    hf_tokenizers.write_tokenizer_files(tokenizer or ByteTokenizer(), folder, 64)
    return folder


def small_bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT * 20, "hello world " * 50], vocab_size=300)


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(spec: Path | str, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = pretrained.load_model(str(spec))
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("vocab_size", [256, 50257])
def test_a_transformers_folder_gives_its_logits(tmp_path: Path, vocab_size: int) -> None:
    model = hf_model(vocab_size)
    tok = ByteTokenizer() if vocab_size == 256 else small_bpe()
    folder = save_folder(model, tmp_path / "gpt", tok)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    theirs, ours = hf_logits(model, ids), our_logits(folder, ids)
    assert ours.shape == theirs.shape == (2, 40, vocab_size)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_old_layouts_load_too(tmp_path: Path) -> None:
    """A pickled .bin of a GPT2Model (no ``transformer.`` prefix, no lm_head, mask buffers)."""
    model = hf_model()
    folder = save_folder(model, tmp_path / "old")
    (folder / "model.safetensors").unlink()
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    ids = torch.arange(30)[None]
    assert torch.allclose(our_logits(folder, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_square_projection_is_transposed_by_name_not_shape() -> None:
    weight = torch.arange(16.0).view(4, 4)
    ours = hf.from_hf({"h.0.attn.c_proj.weight": weight, "h.0.ln_1.weight": weight}, "x")
    assert torch.equal(ours["transformer.h.0.attn.c_proj.weight"], weight.t())
    assert torch.equal(ours["transformer.h.0.ln_1.weight"], weight)
    back = hf.to_hf(ours)
    assert torch.equal(back["transformer.h.0.attn.c_proj.weight"], weight)


def test_sharded_safetensors_load(tmp_path: Path) -> None:
    model = hf_model()
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    hf_tokenizers.write_tokenizer_files(ByteTokenizer(), folder, 64)
    assert (folder / "model.safetensors.index.json").is_file()
    ids = torch.arange(20)[None]
    assert torch.allclose(our_logits(folder, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- out to transformers
def _ours(tmp_path: Path, tok: Tokenizer, vocab_size: int | None) -> Path:
    from minigpt import checkpoint
    from minigpt.model import GPT, GPTConfig

    path = tmp_path / "last.pt"
    if path.exists():
        return path
    torch.manual_seed(3)
    config = GPTConfig(2, 2, 32, 64, vocab_size or tok.vocab_size, 0.0, True, False)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    state = {
        "model": model.state_dict(),
        "model_config": config.__dict__,
        "tokenizer": tok.state(),
        "train_state": {"step": 7},
    }
    checkpoint.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_an_export_opens_in_transformers_with_the_same_greedy_text(
    tmp_path: Path, kind: str
) -> None:
    tok = ByteTokenizer() if kind == "byte" else small_bpe()
    ckpt = _ours(tmp_path, tok, None)
    out = export.export(ckpt, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    auto_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert auto_tok.encode(TEXT) == tok.encode(TEXT)
    ours, _, _ = weights.load_model(ckpt)
    prompt = torch.tensor([tok.encode("def f(")])
    greedy = torch.stack(list(generate(ours, prompt, 20, greedy=True)), dim=1)
    theirs = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert theirs[0, prompt.size(1) :].tolist() == greedy[0].tolist()
    ids = torch.randint(0, tok.vocab_size, (1, 50))
    with torch.no_grad():
        assert torch.allclose(ours(ids)[0], model(ids).logits, atol=1e-4, rtol=0)


def test_export_then_init_gives_the_same_parameters(tmp_path: Path) -> None:
    tok = small_bpe()
    ckpt = _ours(tmp_path, tok, None)
    out = export.export(ckpt, tmp_path / "hf")
    a, b = weights.read_model_file(ckpt), pretrained.read_source(str(out))
    assert a.config == b.config
    assert a.tokenizer.state() == b.tokenizer.state()  # still our bpe, not a wrapper of it
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_exporting_bias_false_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from minigpt import checkpoint
    from minigpt.model import GPT, GPTConfig

    config = GPTConfig(2, 2, 32, 64, 256, 0.0, False, False)
    state = {
        "model": GPT(config).state_dict(),
        "model_config": config.__dict__,
        "tokenizer": {"kind": "byte"},
    }
    checkpoint.save(state, tmp_path / "nobias.pt")
    with pytest.raises(ExportError, match=r"model.bias=false has no GPT-2 equivalent") as err:
        export.export(tmp_path / "nobias.pt", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nobias.pt"]


def test_export_replaces_only_its_own_folder_and_only_with_force(tmp_path: Path) -> None:
    ckpt = _ours(tmp_path, ByteTokenizer(), None)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="holds other files"):
        export.export(ckpt, mine, force=True)
    assert (mine / "todo.txt").read_text() == "keep me"
    out = export.export(ckpt, tmp_path / "hf")
    with pytest.raises(ExportError, match="pass --force"):
        export.export(ckpt, out)
    assert export.export(ckpt, out, force=True) == out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"activation_function": "relu"}, "activation_function='relu' is not GPT-2's"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06 is not GPT-2's"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not GPT-2's"),
        ({"n_inner": 48}, "n_inner=48 is not GPT-2's"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"model_type": "llama"}, "model_type='llama' is not GPT-2"),
        (
            {"quantization_config": {"quant_method": "gptq"}},
            "quantized (quantization_config: gptq)",
        ),
    ],
)
def test_an_architecture_we_cannot_express_is_refused_in_one_line(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    folder = save_folder(hf_model(), tmp_path / "gpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as err:
        pretrained.read_source(str(folder))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_untied_head_is_refused(tmp_path: Path) -> None:
    model = hf_model()
    folder = save_folder(model, tmp_path / "gpt")
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="an untied head"):
        pretrained.read_source(str(folder))


# ---------------------------------------------------------------- init_from
def test_init_takes_the_shape_and_crops_the_positions(tmp_path: Path) -> None:
    folder = save_folder(hf_model(), tmp_path / "gpt")
    model = ModelConfig(block_size=16, dropout=0.1)
    init = pretrained.plan_init(str(folder), model, DataConfig(), ["model.block_size=16"])
    config = init.gpt_config()
    assert (config.n_layer, config.d_model, config.block_size, config.dropout) == (2, 32, 16, 0.1)
    assert init.weights()["transformer.wpe.weight"].shape == (16, 32)
    assert init.tokenizer.encode(TEXT) == list(TEXT.encode())


@pytest.mark.parametrize(
    ("overrides", "model", "words"),
    [
        (["model.n_layer=4"], {"n_layer": 4}, "model.n_layer=4 (you set it) conflicts"),
        (["model=small"], {"d_model": 256}, "model.d_model=256 (model=small sets it) conflicts"),
        (["model.block_size=128"], {"block_size": 128}, "more than the 64 positions"),
        (["data.tokenizer=gpt2"], {}, "data.tokenizer=gpt2 conflicts with init_from="),
    ],
)
def test_a_conflicting_override_is_refused_in_one_line(
    tmp_path: Path, overrides: list[str], model: dict[str, Any], words: str
) -> None:
    folder = save_folder(hf_model(), tmp_path / "gpt")
    data = DataConfig(tokenizer="gpt2") if "data.tokenizer=gpt2" in overrides else DataConfig()
    model_cfg = ModelConfig(**{"n_layer": 2, "n_head": 2, "d_model": 32, **model})
    with pytest.raises(ConfigError) as err:
        pretrained.plan_init(str(folder), model_cfg, data, overrides)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_default_model_preset_does_not_conflict(tmp_path: Path) -> None:
    folder = save_folder(hf_model(), tmp_path / "gpt")
    init = pretrained.plan_init(str(folder), ModelConfig(), DataConfig(), ["train.max_steps=3"])
    assert init.gpt_config().n_layer == 2 and init.model.block_size == 64


def test_hub_names_and_paths_are_told_apart() -> None:
    assert pretrained.is_hub_name("gpt2") and pretrained.is_hub_name("openai-community/gpt2")
    assert not pretrained.is_hub_name("outputs/run/checkpoints/last")
    assert not pretrained.is_hub_name("last.pt") and not pretrained.is_hub_name("./x")
    assert pretrained.is_openai("gpt2-xl") and pretrained.is_openai("openai-community/gpt2")
    assert not pretrained.is_openai("someone/gpt2")


def test_hf_folder_helpers_agree_on_what_an_export_is(tmp_path: Path) -> None:
    ckpt = _ours(tmp_path, ByteTokenizer(), None)
    out = export.export(ckpt, tmp_path / "hf")
    assert hf_folder.is_model_folder(out)
    assert json.loads((out / "config.json").read_text())[hf.TOKENIZER_KEY] == "byte"
    assert pretrained.read_source(str(out)).tokenizer.name == "byte"


def test_a_dry_run_plans_the_source_model_not_the_preset(tmp_path: Path, monkeypatch) -> None:
    from minigpt.config import Config
    from minigpt.model import GPT
    from minigpt.plan import plan_run

    folder = save_folder(hf_model(), tmp_path / "gpt")
    source = pretrained.read_source(str(folder)).config
    plan = plan_run(Config(init_from=str(folder)), world_size=1)
    assert plan.params == GPT.param_count_formula(source) and plan.note == ""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    unknown = plan_run(Config(init_from="someone/not-cached"), world_size=1)
    assert "init_from=someone/not-cached is not here" in unknown.describe()


def test_init_from_a_minigpt_checkpoint_keeps_its_tokenizer_and_weights(tmp_path: Path) -> None:
    tok = small_bpe()
    ckpt = _ours(tmp_path, tok, 320)
    init = pretrained.plan_init(str(ckpt), ModelConfig(), DataConfig(), [])
    assert init.tokenizer.state() == tok.state() and init.gpt_config().vocab_size == 320
    saved = weights.read_model_file(ckpt).tensors
    assert all(torch.equal(init.weights()[k], saved[k]) for k in saved)


def _break_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _index_outside(folder: Path) -> None:
    index = {"weight_map": {"transformer.wte.weight": "../../etc/passwd"}}
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _claim_more_layers(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 48}))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_break_json, "config.json is not readable JSON"),
        (_drop_weights, "holds no weights: expected model.safetensors"),
        (_index_outside, "names '../../etc/passwd', not a file of the folder"),
        (_claim_more_layers, "the config implies"),
    ],
)
def test_a_damaged_folder_is_refused_in_one_line(tmp_path: Path, damage: Any, words: str) -> None:
    folder = save_folder(hf_model(), tmp_path / "gpt")
    damage(folder)
    with pytest.raises(CheckpointError) as err:
        pretrained.read_source(str(folder))
    assert words in str(err.value) and "\n" not in str(err.value)
