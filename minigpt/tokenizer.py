"""Byte, BPE, GPT-2 and Hugging Face tokenizers behind one small interface, saved with checkpoints.

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
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minigpt.config import ConfigError

if TYPE_CHECKING:
    import tiktoken

EOT = "<|endoftext|>"
# The two files tiktoken fetches for "gpt2"; it caches each under sha1(url) in its cache folder.
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
# Hub repos whose tokenizer.json gives GPT-2's ids (OpenAI's models, under both names): the
# fallback when tiktoken's files are absent; any one in the local cache will do.
GPT2_HUB_REPOS = (
    "openai-community/gpt2",
    "gpt2",
    "openai-community/gpt2-medium",
    "gpt2-medium",
    "openai-community/gpt2-large",
    "gpt2-large",
    "openai-community/gpt2-xl",
    "gpt2-xl",
    "distilbert/distilgpt2",
    "distilgpt2",
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


class _LibraryTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` object (any JSON it reads) behind our interface."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        # A literal "<|endoftext|>" in the corpus is text, not a document boundary (as tiktoken's
        # encode_ordinary does); this flag is not saved by to_str(), so set it on every load.
        tok.encode_special_tokens = True
        # A Hub tokenizer.json may carry truncation or padding (some cut at 50 or 512 ids): a
        # corpus must be tokenized whole.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips offsets we never use: ~30% faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        """The ``tokenizers`` JSON (a tokenizer.json) this tokenizer is built from."""
        return self._tok.to_str()


class BPETokenizer(_LibraryTokenizer):
    """Byte-level BPE (GPT-2 style) trained on the corpus with Hugging Face ``tokenizers``."""

    name = "bpe"

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        super().__init__(tok)
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str | list[str]], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` (strings or batches of strings) up to ``vocab_size``."""
        tok = tokenizers.Tokenizer(models.BPE())
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

    def state(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self.to_json()}


class HFTokenizer(_LibraryTokenizer):
    """A Hugging Face model's own tokenizer (its tokenizer.json), for models we start from.

    ``eot`` names the token that separates documents (the model's end-of-text), if it has one.
    """

    name = "hf"

    def __init__(self, tok: tokenizers.Tokenizer, eot: str | None) -> None:
        super().__init__(tok)
        self.eot = eot
        self.eot_id = None if eot is None else tok.token_to_id(eot)
        if eot is not None and self.eot_id is None:
            raise ValueError(f"the tokenizer has no end-of-text token {eot!r}")

    @classmethod
    def from_json(cls, text: str, eot: str | None) -> HFTokenizer:
        """The tokenizer of a tokenizer.json text; a one-line ValueError when it does not load."""
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"bad tokenizer JSON: {_first_line(err)}") from err
        return cls(tok, eot)

    def state(self) -> dict[str, Any]:
        return {"kind": "hf", "json": self.to_json(), "eot": self.eot}


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50257 ids, ``<|endoftext|>`` = 50256).

    Two backends give the same ids: tiktoken, or the Hub's tokenizer.json when it is already in
    the local Hugging Face cache, so a machine without network can still use GPT-2.
    ``backend`` says which: "tiktoken" or "hf-cache".
    """

    name = "gpt2"

    def __init__(self) -> None:
        self.encoding: tiktoken.Encoding | None = None
        self._hub: HFTokenizer | None = None
        tiktoken_module = _import_tiktoken()
        if tiktoken_module is not None and gpt2_files_cached():
            self.encoding = tiktoken_module.get_encoding("gpt2")
        elif (path := gpt2_hub_file()) is not None:
            self._hub = _gpt2_from_hub_file(path)
        elif tiktoken_module is not None and can_reach(GPT2_URLS[0]):
            self.encoding = tiktoken_module.get_encoding("gpt2")
        else:
            raise ConfigError(_gpt2_unavailable(tiktoken_installed=tiktoken_module is not None))
        if self._hub is not None:
            self.backend = "hf-cache"
            self.vocab_size, self.eot_id = self._hub.vocab_size, self._hub.eot_id
        else:
            self.backend = "tiktoken"
            self.vocab_size, self.eot_id = self.encoding.n_vocab, self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        if self._hub is not None:
            return self._hub.encode(text)
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._hub is not None:
            return self._hub.encode_batch(texts)
        return self.encoding.encode_ordinary_batch(texts)

    def _decode(self, ids: list[int]) -> str:
        if self._hub is not None:
            return self._hub.decode(ids)
        return self.encoding.decode(ids, errors="replace")

    def cached_json(self) -> str | None:
        """The Hub's tokenizer.json text with the hf-cache backend; None with tiktoken."""
        return None if self._hub is None else self._hub.to_json()

    def state(self) -> dict[str, Any]:
        return {"kind": "gpt2"}


def _import_tiktoken() -> Any:
    """The tiktoken module, or None where it is not installed (it is an optional extra)."""
    try:
        import tiktoken
    except ImportError:
        return None
    return tiktoken


def _gpt2_unavailable(tiktoken_installed: bool) -> str:
    """The one-line error for a machine where neither backend can give GPT-2's ids."""
    where = (
        "tiktoken's GPT-2 files, which could not be fetched (no network?)"
        if tiktoken_installed
        else "tiktoken (pip install tiktoken)"
    )
    return (
        f"data.tokenizer=gpt2 needs {where}, or GPT-2's tokenizer.json in the Hugging Face cache "
        "(that of gpt2 or any OpenAI GPT-2 model); use data.tokenizer=byte or bpe"
    )


def gpt2_hub_file() -> str | None:
    """Path of GPT-2's tokenizer.json in the local Hugging Face cache, if there; never downloads.

    HF_HUB_CACHE is read here, at each call: huggingface_hub reads it only once, at import.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for repo in GPT2_HUB_REPOS:
        path = try_to_load_from_cache(repo, "tokenizer.json", cache_dir=cache_dir)
        if isinstance(path, str):  # else None, or a marker that the file is known to be absent
            return path
    return None


def _gpt2_from_hub_file(path: str) -> HFTokenizer:
    """GPT-2 from the Hub's tokenizer.json, checked to have GPT-2's vocabulary size and EOT id."""
    try:
        with open(path, encoding="utf-8") as f:
            tok = HFTokenizer.from_json(f.read(), EOT)
    except (OSError, ValueError) as err:
        raise ConfigError(f"GPT-2's cached tokenizer {path} does not load: {err}") from err
    if (tok.vocab_size, tok.eot_id) != (50257, 50256):
        raise ConfigError(
            f"GPT-2's cached tokenizer {path} has {tok.vocab_size} ids and {EOT}={tok.eot_id}; "
            "expected 50257 and 50256"
        )
    return tok


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
            return BPETokenizer(tokenizers.Tokenizer.from_str(state["json"]))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"the saved BPE tokenizer does not load: {_first_line(err)}") from err
    if kind == "hf":
        try:
            return HFTokenizer.from_json(state["json"], state.get("eot"))
        except ValueError as err:
            raise ValueError(f"the saved hf tokenizer does not load: {err}") from err
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer state kind {kind!r}; expected byte, bpe, gpt2 or hf")


def _first_line(err: Exception) -> str:
    """An error's message as one line: library errors sometimes span several."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
