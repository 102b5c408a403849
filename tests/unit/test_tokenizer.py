"""The tokenizer interface: round trips, saved state, robust decoding, GPT-2 failing fast."""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import urllib.request
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch
from tiktoken._educational import bpe_train
from tiktoken_ext.openai_public import r50k_pat_str

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


def data_gym_chars() -> dict[int, str]:
    """Byte -> character of OpenAI's data-gym files, in rank order: printable bytes stand for
    themselves, the others (space included) for chr(256), chr(257), ..."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def data_gym_ranks(text: str) -> dict[bytes, int]:
    """GPT-2-shaped ranks: the 256 bytes in data-gym order, merges learned from ``text``, then
    two-byte fillers up to 50256 ids (``<|endoftext|>`` is the 50257th)."""
    ranks = {bytes([b]): i for i, b in enumerate(data_gym_chars())}
    learned = bpe_train(text, 300, r50k_pat_str, visualise=None)
    for token in sorted((t for t in learned if len(t) > 1), key=learned.__getitem__):
        ranks[token] = len(ranks)
    for pair in (bytes([a, b]) for a in range(256) for b in range(256)):
        if len(ranks) == 50256:
            break
        ranks.setdefault(pair, len(ranks))
    return ranks


def write_gpt2_cache(cache: Path, ranks: dict[bytes, int]) -> None:
    """vocab.bpe and encoder.json in OpenAI's data-gym format, under tiktoken's cache names."""
    char = data_gym_chars()

    def gym(token: bytes) -> str:
        return "".join(char[b] for b in token)

    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        cut = next(i for i in range(1, len(token)) if {token[:i], token[i:]} <= ranks.keys())
        merges.append(f"{gym(token[:cut])} {gym(token[cut:])}")
    encoder = {gym(token): rank for token, rank in ranks.items()} | {EOT: 50256}
    contents = ["#version: 0.2\n" + "\n".join(merges) + "\n", json.dumps(encoder)]
    cache.mkdir(parents=True, exist_ok=True)
    for url, text in zip(GPT2_URLS, contents, strict=True):  # vocab.bpe, encoder.json
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_text(text, encoding="utf-8")


def test_gpt2_loads_tiktokens_cached_files_without_the_network(tmp_path, monkeypatch) -> None:
    """GPT-2 from files in tiktoken's cache, made here in OpenAI's format: the cache lookup,
    tiktoken's real parsing and our vocab size, end-of-text id and ordinary encoding."""
    ranks = data_gym_ranks(" ".join(TRAIN_TEXTS))
    write_gpt2_cache(tmp_path / "tiktoken", ranks)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # no Hub copy to fall back on
    monkeypatch.setattr(tiktoken.load, "check_hash", lambda data, expected: True)  # not OpenAI's
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # build "gpt2" afresh, and forget it
    monkeypatch.setattr(tokenizer_mod, "can_reach", lambda *a, **k: pytest.fail("probed"))
    tok = build_tokenizer("gpt2", None, 0)
    assert (tok.backend, tok.vocab_size, tok.eot_id) == ("tiktoken", 50257, 50256)
    reference = tiktoken.Encoding(
        "ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={}
    )
    for text in [*SAMPLES, *TRAIN_TEXTS[:3], f"a{EOT}b"]:
        assert tok.encode(text) == reference.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("    return a + b")) < len("    return a + b")  # merges are used
    assert tok.decode([50256]) == EOT
    assert tokenizer_from_state(tok.state()).encode(SAMPLES[3]) == tok.encode(SAMPLES[3])


def test_network_probe_gives_up_without_waiting_for_a_stalled_request(monkeypatch) -> None:
    """A request stuck in DNS ignores its socket timeout: the probe answers "unreachable" while
    that request is still running (how soon: benchmarks/fail_fast.py)."""
    release, ended, calls = threading.Event(), threading.Event(), []

    def stalled_urlopen(request, timeout):
        calls.append(timeout)
        release.wait(30)  # a bound, so a probe that waits for us still ends (and fails below)
        ended.set()

    monkeypatch.setattr(urllib.request, "urlopen", stalled_urlopen)
    try:
        assert not can_reach("https://example.invalid", timeout=0.2)
        assert not ended.is_set(), "the probe waited for the stalled request to end"
        assert calls == [0.2]
    finally:
        release.set()
