"""Byte, BPE and GPT-2 tokenizers behind one small interface, saved with the checkpoint.

A tokenizer's :meth:`~Tokenizer.state` holds only plain values (str/int/list/dict/None), because it
is stored inside a torch checkpoint that is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minigpt.config import ConfigError

EOT = "<|endoftext|>"
# The two files tiktoken fetches for "gpt2"; it caches each under sha1(url) in its cache folder.
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


class Tokenizer(ABC):
    """Text <-> token ids. ``eot_id`` separates documents when the vocabulary has such a token."""

    name: str
    vocab_size: int
    eot_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens in the text are treated as ordinary text)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; subclasses override this where the library batches faster."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Plain values that :func:`tokenizer_from_state` turns back into this tokenizer."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; never raises: bad UTF-8 and ids outside the vocabulary become U+FFFD.

        A model's vocabulary may be padded past the tokenizer's (e.g. 50304 for GPT-2), so an
        untrained model can sample ids the tokenizer has never seen.
        """
        ids = [int(i) for i in ids]
        if all(0 <= i < self.vocab_size for i in ids):
            return self._decode(ids)
        parts = []
        for known, run in groupby(ids, key=lambda i: 0 <= i < self.vocab_size):
            run = list(run)
            parts.append(self._decode(run) if known else "\ufffd" * len(run))
        return "".join(parts)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: no training, no files, every text round-trips."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {"kind": "byte"}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) trained on the corpus with Hugging Face ``tokenizers``."""

    name = "bpe"

    def __init__(self, tok: HFTokenizer) -> None:
        # A literal "<|endoftext|>" in the corpus is text, not a document boundary (as tiktoken's
        # encode_ordinary does); this flag is not saved by to_str(), so set it on every load.
        tok.encode_special_tokens = True
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str | list[str]], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` (strings or batches of strings) up to ``vocab_size``."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            # All 256 bytes from the start, so any text encodes even if the corpus lacks a byte.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips offsets we never use: ~30% faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def state(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self._tok.to_str()}


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE via tiktoken (50257 ids, ``<|endoftext|>`` = 50256)."""

    name = "gpt2"

    def __init__(self) -> None:
        try:
            import tiktoken
        except ImportError:
            raise ConfigError(
                "data.tokenizer=gpt2 needs tiktoken; pip install tiktoken "
                "(or use data.tokenizer=byte or bpe)"
            ) from None
        if not (gpt2_files_cached() or can_reach(GPT2_URLS[0])):
            raise ConfigError(
                "data.tokenizer=gpt2 needs tiktoken's GPT-2 files, which could not be fetched "
                "(no network?); use data.tokenizer=byte or bpe"
            )
        self._enc = tiktoken.get_encoding("gpt2")
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

    def state(self) -> dict[str, Any]:
        return {"kind": "gpt2"}


def gpt2_files_cached() -> bool:
    """Whether tiktoken can build "gpt2" without the network (same lookup as tiktoken.load)."""
    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))
    if not cache_dir:
        return False  # "" disables tiktoken's cache: it always downloads
    names = (hashlib.sha1(url.encode()).hexdigest() for url in GPT2_URLS)
    return all(os.path.exists(os.path.join(cache_dir, n)) for n in names)


def can_reach(url: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP(S) request to ``url`` gets any answer within ``timeout`` seconds.

    Libraries that download on first use retry for many seconds, or hang in DNS, when there is no
    network; asking first lets us fail in seconds with a clear message. DNS lookups ignore socket
    timeouts, so the probe runs in a daemon thread that we stop waiting for.
    """
    reached: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
            reached.append(True)
        except urllib.error.HTTPError:
            reached.append(True)  # the server answered, even if not with 200
        except (OSError, ValueError):
            pass  # URLError, TLS errors and timeouts are OSErrors

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def build_tokenizer(kind: str, train_texts: Iterable[str] | None, vocab_size: int) -> Tokenizer:
    """A new tokenizer of ``kind``; BPE learns from ``train_texts`` (the training split only)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        if train_texts is None:
            raise ValueError("the bpe tokenizer needs train_texts to learn from")
        return BPETokenizer.train(train_texts, vocab_size)
    raise ConfigError(f"data.tokenizer={kind!r} is not allowed; use one of: byte, bpe, gpt2")


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """The tokenizer that produced ``state`` (from a checkpoint or a corpus cache)."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        try:
            return BPETokenizer(HFTokenizer.from_str(state["json"]))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"the saved BPE tokenizer does not load: {err}") from err
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer state kind {kind!r}; expected byte, bpe or gpt2")
