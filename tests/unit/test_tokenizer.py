"""The tokenizer interface: round trips, saved state, robust decoding, GPT-2 failing fast."""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import urllib.request

import pytest
import torch

from minigpt import tokenizer as tokenizer_mod
from minigpt.config import ConfigError
from minigpt.tokenizer import (
    EOT,
    GPT2_URLS,
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    can_reach,
    gpt2_files_cached,
    tokenizer_from_state,
)

SAMPLES = [
    "hello world",
    "naïve café, Straße, Ελληνικά, русский",
    "emoji 😀🚀👩‍💻 and CJK 世界你好",
    'def f(x):\n\tif x:\n        return {"a": [1, 2]}  # ok\r\n',
    "   leading and trailing spaces   \n\n\n",
    "",
]
TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
] * 10


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return build_tokenizer("bpe", iter(TRAIN_TEXTS), vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip_keeps_any_text(text: str) -> None:
    tok = ByteTokenizer()
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_keeps_any_text_even_unseen_characters(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_within_the_requested_vocab_size(bpe: BPETokenizer) -> None:
    assert 257 < bpe.vocab_size <= 400
    code = TRAIN_TEXTS[1]
    assert len(bpe.encode(code)) < len(code.encode()) / 2
    assert bpe.eot_id is not None and bpe.decode([bpe.eot_id]) == EOT


def test_bpe_treats_a_literal_end_of_text_string_as_text(bpe: BPETokenizer) -> None:
    ids = bpe.encode(f"a{EOT}b")
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == f"a{EOT}b"


def test_encode_batch_matches_encode(bpe: BPETokenizer) -> None:
    for tok in (ByteTokenizer(), bpe):
        assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_bpe_state_round_trip_gives_identical_ids(bpe: BPETokenizer) -> None:
    state = json.loads(json.dumps(bpe.state()))
    loaded = tokenizer_from_state(state)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == bpe.vocab_size and loaded.eot_id == bpe.eot_id
    for text in SAMPLES + [f"x{EOT}y"]:
        assert loaded.encode(text) == bpe.encode(text)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_state_survives_a_weights_only_torch_checkpoint(bpe: BPETokenizer, kind: str) -> None:
    tok = bpe if kind == "bpe" else ByteTokenizer()
    buffer = io.BytesIO()
    torch.save({"tokenizer": tok.state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["tokenizer"]
    assert tokenizer_from_state(state).encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_decode_never_raises_on_arbitrary_ids(bpe: BPETokenizer, kind: str) -> None:
    tok = bpe if kind == "bpe" else ByteTokenizer()
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert isinstance(tok.decode(ids), str)


def test_ids_outside_the_vocabulary_decode_as_replacement_characters() -> None:
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 50303, -1, 33]) == "hi\ufffd\ufffd\ufffd!"


def test_unknown_kinds_are_rejected() -> None:
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer("wordpiece", None, 100)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_state({"kind": "wordpiece"})


def test_gpt2_file_lookup_follows_tiktoken_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert not gpt2_files_cached()
    for url in GPT2_URLS:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"x")
    assert gpt2_files_cached()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's "no cache": always downloads
    assert not gpt2_files_cached()


def test_gpt2_without_files_or_network_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty Hugging Face cache
    monkeypatch.setattr(tokenizer_mod, "can_reach", lambda url, timeout=3.0: False)
    with pytest.raises(ConfigError, match=r"data.tokenizer=gpt2 .* use data.tokenizer=byte or bpe"):
        build_tokenizer("gpt2", None, 0)


def test_gpt2_error_says_the_hugging_face_cache_was_checked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(tokenizer_mod, "can_reach", lambda url, timeout=3.0: False)
    with pytest.raises(ConfigError, match="Hugging Face cache") as info:
        build_tokenizer("gpt2", None, 0)
    assert "any OpenAI GPT-2 model" in str(info.value) and "\n" not in str(info.value)


def test_gpt2_fails_fast_or_round_trips_on_this_machine(tmp_path, monkeypatch) -> None:
    """The real probe: without network a ConfigError in seconds; with network, a working GPT-2."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # no Hub copy to fall back on
    start = time.monotonic()
    try:
        tok = build_tokenizer("gpt2", None, 0)
    except ConfigError as err:
        assert "data.tokenizer=gpt2" in str(err)
        assert time.monotonic() - start < 10
        return
    assert (tok.backend, tok.vocab_size, tok.eot_id) == ("tiktoken", 50257, 50256)
    assert tok.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]
    assert tokenizer_from_state(tok.state()).encode("hello") == tok.encode("hello")


def test_network_probe_gives_up_after_its_timeout(monkeypatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(5))
    start = time.monotonic()
    assert not can_reach("https://example.invalid", timeout=0.2)
    assert time.monotonic() - start < 1
