"""Our tokenizers as Hugging Face tokenizer files: transformers gives exactly our ids.

No network: GPT-2 is a stand-in tiktoken ``Encoding`` (GPT-2's pattern, merges learned here,
50257 ids with ``<|endoftext|>`` = 50256) that ``GPT2Tokenizer`` picks up in place of tiktoken's
downloaded files, so the tiktoken-to-HF conversion is the code under test.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import tiktoken
import tokenizers
import torch
from tiktoken._educational import bpe_train
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from minigpt import tokenizer as tokenizer_mod
from minigpt.hf_tokenizers import tokenizer_from_folder, tokenizer_json, write_tokenizer_files
from minigpt.tokenizer import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
    tokenizer_from_state,
)

CODE = '''class Point:
    """A point."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x  # the abscissa
\tif x:\r\n\t\treturn {"a": [1, 2, 30_000]}
'''
TEXTS = [
    CODE,
    "naïve café — 東京 😀🎉 Ελληνικά",
    "runs of    spaces\t\t\tand tabs \t \t mixed",
    "windows\r\nline\r\nends\r\n",
    "trailing spaces   ",
    "\n\n\n",
    "   leading",
    "it's they'll we've I'm 12345 3.14 $x+=1;",
    "",
]
TRAIN = CODE * 3 + "The quick brown fox jumps over the lazy dog. " * 10 + " ".join(TEXTS)
GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def gpt2_encoding() -> tiktoken.Encoding:
    """A GPT-2-shaped tiktoken encoding: learned merges, then two-byte fillers up to 50256."""
    ranks = bpe_train(TRAIN, 400, r50k_pat_str, visualise=None)
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    for pair in pairs:
        if len(ranks) == GPT2_VOCAB - 1:
            break
        ranks.setdefault(pair, len(ranks))
    return tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: GPT2_VOCAB - 1}
    )


def use_as_tiktoken_gpt2(encoding: tiktoken.Encoding, monkeypatch) -> None:
    """Make ``encoding`` what GPT2Tokenizer finds as tiktoken's cached "gpt2"."""
    monkeypatch.setattr(tokenizer_mod, "gpt2_files_cached", lambda: True)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)


@pytest.fixture
def tiktoken_gpt2(gpt2_encoding, monkeypatch) -> GPT2Tokenizer:
    """GPT2Tokenizer on the tiktoken backend, with the stand-in as tiktoken's cached files."""
    use_as_tiktoken_gpt2(gpt2_encoding, monkeypatch)
    tok = GPT2Tokenizer()
    assert tok.backend == "tiktoken" and tok.encoding is gpt2_encoding
    return tok


@pytest.fixture(scope="module")
def gpt2_json(gpt2_encoding) -> str:
    """The stand-in converted once, for the tests that read the result."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_as_tiktoken_gpt2(gpt2_encoding, monkeypatch)
        return tokenizer_json(GPT2Tokenizer())


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TRAIN], vocab_size=400)


def foreign_tokenizer_json() -> str:
    """A model's own tokenizer.json unlike ours: digits split, BOS added, "</s>" ends text, and
    truncation and padding switched on (as some Hub files have them)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.enable_truncation(max_length=8)
    tok.enable_padding(pad_id=1, pad_token="</s>")
    return tok.to_str()


@pytest.fixture
def hf_tok(tmp_path) -> HFTokenizer:
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(foreign_tokenizer_json())
    return tokenizer_from_folder(folder, eos_token_id=1)


@pytest.fixture(params=["byte", "bpe", "hf", "gpt2"])
def tok(request, bpe) -> Tokenizer:
    if request.param == "byte":
        return ByteTokenizer()
    if request.param == "bpe":
        return bpe
    return request.getfixturevalue("hf_tok" if request.param == "hf" else "tiktoken_gpt2")


def load_with_transformers(tok: Tokenizer, folder: Path, as_gpt2_model: bool):
    """Write our files, as an exported model folder would hold them, and load them as users do."""
    ids = write_tokenizer_files(tok, folder, model_max_length=1024)
    assert ids == {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id}
    if as_gpt2_model:  # transformers then knows the model type, whose own class is GPT2Tokenizer
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("as_gpt2_model", [False, True])
def test_transformers_gives_our_ids_and_text_back(tok, tmp_path, as_gpt2_model) -> None:
    hf = load_with_transformers(tok, tmp_path / "model", as_gpt2_model)
    for text in TEXTS:
        ours = tok.encode(text)
        assert hf(text)["input_ids"] == ours, text
        assert hf.encode(text) == ours, text  # add_special_tokens=True adds nothing: no BOS
        assert hf.decode(ours) == tok.decode(ours) == text
    if tok.eot_id is not None:
        assert hf.eos_token_id == tok.eot_id
        assert hf.decode([tok.eot_id]) == tok.decode([tok.eot_id])


def test_a_model_that_adds_a_prefix_space_keeps_it_in_transformers(tmp_path) -> None:
    """transformers 4.x resets the pre-tokenizer's add_prefix_space to the config's value."""
    lib = tokenizers.Tokenizer.from_str(foreign_tokenizer_json())
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    (tmp_path / "tokenizer.json").write_text(lib.to_str())
    tok = tokenizer_from_folder(tmp_path, eos_token_id=1)
    hf = load_with_transformers(tok, tmp_path / "model", as_gpt2_model=True)
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())[
        "add_prefix_space"
    ]
    for text in TEXTS:
        ours = tok.encode(text)
        assert hf.encode(text) == ours
        assert hf.decode(ours) == tok.decode(ours)
    assert tok.encode("word") == tok.encode(" word")


def test_tokenizer_files_are_the_ones_transformers_and_gpt2_readers_expect(tmp_path, bpe) -> None:
    write_tokenizer_files(bpe, tmp_path, model_max_length=256)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 256
    assert config["add_prefix_space"] is False and config["clean_up_tokenization_spaces"] is False
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == EOT
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == EOT
    assert json.loads((tmp_path / "vocab.json").read_text())[EOT] == bpe.eot_id


def test_byte_kind_declares_no_special_tokens(tmp_path) -> None:
    ids = write_tokenizer_files(ByteTokenizer(), tmp_path, model_max_length=64)
    assert ids == {"bos_token_id": None, "eos_token_id": None}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not {"bos_token", "eos_token", "unk_token"} & config.keys()
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {}


def test_byte_kind_json_gives_the_utf8_bytes_of_any_text() -> None:
    lib = tokenizers.Tokenizer.from_str(tokenizer_json(ByteTokenizer()))
    every_char = "".join(chr(i) for i in range(0x800)) + "\U0001f600\ufeff\u200d"
    for text in [*TEXTS, every_char, EOT]:
        ids = lib.encode(text).ids
        assert ids == list(text.encode("utf-8"))
        assert lib.decode(ids) == text


def test_tiktoken_conversion_recovers_one_merge_per_multibyte_token(gpt2_json) -> None:
    data = json.loads(gpt2_json)
    assert len(data["model"]["merges"]) == GPT2_VOCAB - 1 - 256
    assert data["model"]["vocab"][EOT] == 50256
    assert [(t["content"], t["id"], t["special"]) for t in data["added_tokens"]] == [
        (EOT, 50256, True)
    ]
    pre = data["pre_tokenizer"]
    assert (pre["type"], pre["use_regex"], pre["add_prefix_space"]) == ("ByteLevel", True, False)


def test_literal_end_of_text_is_text_for_us_but_the_eot_for_transformers(tmp_path, bpe) -> None:
    """transformers' convention (as for GPT-2 on the Hub): a special token written in the text is
    that token. Our training treats it as text, so these ids differ; all other text agrees."""
    hf = load_with_transformers(bpe, tmp_path, as_gpt2_model=False)
    text = f"end{EOT}start"
    assert bpe.eot_id not in bpe.encode(text)
    assert hf.encode(text) == bpe.encode("end") + [bpe.eot_id] + bpe.encode("start")
    assert hf.decode(bpe.encode(text)) == text


def test_hf_tokenizer_state_round_trips_through_a_weights_only_checkpoint(hf_tok) -> None:
    assert (hf_tok.eot, hf_tok.eot_id) == ("</s>", 1)
    buffer = io.BytesIO()
    torch.save({"tokenizer": hf_tok.state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["tokenizer"]
    assert state["kind"] == "hf" and state["eot"] == "</s>"
    loaded = tokenizer_from_state(state)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.vocab_size, loaded.eot_id) == (hf_tok.vocab_size, hf_tok.eot_id)
    for text in [*TEXTS, "a</s>b<s>"]:
        assert loaded.encode(text) == hf_tok.encode(text)
    assert 0 not in hf_tok.encode("no BOS")  # the folder's post-processor adds one; we do not


def test_hf_tokenizer_neither_truncates_nor_pads(hf_tok) -> None:
    assert len(hf_tok.encode(CODE)) > 8
    assert hf_tok.encode_batch(TEXTS) == [hf_tok.encode(t) for t in TEXTS]


def test_a_bad_hf_tokenizer_state_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError, match="hf tokenizer does not load") as info:
        tokenizer_from_state({"kind": "hf", "json": "{not json", "eot": None})
    assert "\n" not in str(info.value)


def test_tokenizer_from_folder_reads_vocab_and_merges_alone(tmp_path, bpe) -> None:
    write_tokenizer_files(bpe, tmp_path, model_max_length=64)
    (tmp_path / "tokenizer.json").unlink()
    loaded = tokenizer_from_folder(tmp_path)
    assert (loaded.eot, loaded.eot_id) == (EOT, bpe.eot_id)
    for text in [*TEXTS, f"x{EOT}y"]:
        assert loaded.encode(text) == bpe.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_tokenizer_from_folder_without_tokenizer_files_names_the_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no tokenizer files") as info:
        tokenizer_from_folder(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_an_eos_id_outside_the_tokenizer_falls_back_to_its_end_of_text(tmp_path, bpe) -> None:
    """GPT2Config's default eos_token_id (50256) is often left in models with a smaller vocab."""
    write_tokenizer_files(bpe, tmp_path, model_max_length=64)
    tok = tokenizer_from_folder(tmp_path, eos_token_id=99999)
    assert tok.eot_id == bpe.eot_id is not None


def put_in_hub_cache(hub: Path, text: str, repo: str = "openai-community/gpt2") -> Path:
    """Lay a tokenizer.json out as huggingface_hub's cache does after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    path = repo_dir / "snapshots" / commit / "tokenizer.json"
    path.write_text(text)
    return path


def test_gpt2_falls_back_to_the_hub_tokenizer_in_the_hf_cache(
    gpt2_json, gpt2_encoding, tmp_path, monkeypatch
) -> None:
    put_in_hub_cache(tmp_path / "hub", gpt2_json)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(tokenizer_mod, "gpt2_files_cached", lambda: False)
    monkeypatch.setattr(tokenizer_mod, "can_reach", lambda url, timeout=3.0: False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken was used"))
    tok = GPT2Tokenizer()
    assert (tok.backend, tok.encoding) == ("hf-cache", None)
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    for text in [*TEXTS, f"x{EOT}y"]:
        assert tok.encode(text) == gpt2_encoding.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.state() == {"kind": "gpt2"}
    assert tokenizer_json(tok) == tok.cached_json() == gpt2_json


def test_gpt2_prefers_tiktoken_when_its_files_are_cached(
    gpt2_json, tiktoken_gpt2, tmp_path, monkeypatch
) -> None:
    put_in_hub_cache(tmp_path / "hub", gpt2_json, repo="gpt2")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert tokenizer_mod.gpt2_hub_file() is not None
    assert GPT2Tokenizer().backend == "tiktoken"
    monkeypatch.setattr(tokenizer_mod, "gpt2_files_cached", lambda: False)
    assert GPT2Tokenizer().backend == "hf-cache"


def test_gpt2_falls_back_to_any_openai_model_in_the_cache(gpt2_json, tmp_path, monkeypatch) -> None:
    """A compute node that fetched only gpt2-medium still has GPT-2's ids."""
    put_in_hub_cache(tmp_path / "hub", gpt2_json, repo="openai-community/gpt2-medium")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(tokenizer_mod, "gpt2_files_cached", lambda: False)
    monkeypatch.setattr(tokenizer_mod, "can_reach", lambda url, timeout=3.0: False)
    assert GPT2Tokenizer().backend == "hf-cache"
