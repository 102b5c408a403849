"""Our tokenizers as Hugging Face tokenizer files, and the tokenizer a Hugging Face folder carries.

Every kind becomes one ``tokenizers`` JSON (a tokenizer.json) whose ids are exactly ours. The
tokenizer_config.json names ``PreTrainedTokenizerFast``, which loads that JSON as it is: a
model-specific class such as ``GPT2Tokenizer`` rebuilds the pipeline from vocab.json and
merges.txt with its own pre-tokenizer settings, which would change the byte tokenizer's ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from minigpt.tokenizer import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    Tokenizer,
)


def tokenizer_json(tok: Tokenizer) -> str:
    """A HF tokenizers JSON whose ids equal tok.encode(text) for every text."""
    if isinstance(tok, ByteTokenizer):
        return _byte_level_json({bytes([b]): b for b in range(256)}, use_regex=False)
    if isinstance(tok, GPT2Tokenizer):
        cached = tok.cached_json()  # the Hub's own file, with the hf-cache backend
        return cached if cached is not None else _tiktoken_json(tok.encoding)
    if isinstance(tok, (BPETokenizer, HFTokenizer)):
        return _without_inserted_specials(tok.to_json())
    raise ValueError(f"tokenizer {tok.name!r} has no Hugging Face form")


def write_tokenizer_files(
    tok: Tokenizer, folder: Path, model_max_length: int
) -> dict[str, int | None]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into folder (for
    BPE-based kinds also vocab.json and merges.txt); return {"bos_token_id": ...,
    "eos_token_id": ...} for the model's config.json (the EOT id, or None for byte)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = tokenizer_json(tok)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    model = tokenizers.Tokenizer.from_str(text).model
    if isinstance(model, models.BPE):  # for readers that want GPT-2's two classic files
        model.save(str(folder))
    special = _special_tokens(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_prefix_space": _add_prefix_space(text),
        "clean_up_tokenization_spaces": False,
        **special,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    return {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id}


def tokenizer_from_folder(folder: Path, eos_token_id: int | None = None) -> HFTokenizer:
    """The tokenizer a HF model folder carries: its tokenizer.json, else vocab.json + merges.txt
    (a GPT-2-style byte-level BPE); an HFTokenizer whose eot is the token of eos_token_id (else
    "<|endoftext|>" if present). Raises ValueError (one line naming the folder) when the folder
    has no tokenizer files."""
    folder = Path(folder)
    lib = _load_folder(folder)
    # config.json's eos_token_id, when the tokenizer has it: a GPT2Config's default (50256)
    # is often left in models whose own tokenizer is smaller.
    eot = lib.id_to_token(eos_token_id) if isinstance(eos_token_id, int) else None
    if eot is None:
        eot = EOT if lib.token_to_id(EOT) is not None else None
    return HFTokenizer(lib, eot)


def _load_folder(folder: Path) -> tokenizers.Tokenizer:
    """The folder's tokenizer.json, else a GPT-2-style tokenizer from vocab.json + merges.txt."""
    if (folder / "tokenizer.json").is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            message = (str(err).splitlines() or [repr(err)])[0]
            raise ValueError(f"{folder}/tokenizer.json does not load: {message}") from err
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ValueError(
            f"{folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
        )
    lib = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    if lib.token_to_id(EOT) is not None:  # GPT-2's vocab.json lists it; it is a special token
        lib.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return lib


def _without_inserted_specials(text: str) -> str:
    """The JSON without a post-processor that adds tokens (a BOS, say): our ids never had them,
    and transformers adds them by default (``add_special_tokens=True``)."""
    lib = tokenizers.Tokenizer.from_str(text)
    post = lib.post_processor
    if post is None or post.num_special_tokens_to_add(False) == 0:
        return text
    lib.post_processor = None
    return lib.to_str()


def _tiktoken_json(enc: Any) -> str:
    """tiktoken's encoding as a byte-level BPE with the same ids, through its public API.

    tiktoken keeps ranks, not merges; each multi-byte token's merge is recovered by running BPE
    on its bytes with only the ranks below its own: the last two parts are what it merges.
    """
    ranks = {token: enc.encode_single_token(token) for token in enc.token_byte_values()}
    special = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
    merges = _merges_from_ranks(ranks)
    return _byte_level_json(ranks, use_regex=True, merges=merges, special=special)


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order (HF BPE's priority order)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"tiktoken token {rank} ({token!r}) is not one merge of two tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on ``token``'s bytes, using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pair_ranks = (ranks.get(a + b, max_rank) for a, b in zip(parts, parts[1:], strict=False))
        rank, i = min((rank, i) for i, rank in enumerate(pair_ranks))
        if rank >= max_rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _byte_level_json(
    vocab: dict[bytes, int],
    use_regex: bool,
    merges: Sequence[tuple[bytes, bytes]] = (),
    special: dict[str, int] | None = None,
) -> str:
    """A GPT-2-style byte-level BPE: tokens are byte strings spelt in GPT-2's byte alphabet."""
    spell = _bytes_to_unicode()

    def word(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    words = {word(token): i for token, i in vocab.items()}
    # The specials sit in the model's vocabulary too (as in GPT-2's own tokenizer.json), so their
    # ids are theirs and vocab.json lists them; no merge ever produces them from text.
    words.update(special or {})
    lib = tokenizers.Tokenizer(models.BPE(words, [(word(a), word(b)) for a, b in merges]))
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    lib.decoder = decoders.ByteLevel()
    lib.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special or {}])
    return lib.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: the alphabet of tokenizers' ByteLevel.

    tokenizers applies this mapping but does not expose it (ByteLevel.alphabet() is unordered).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    spelling = {b: chr(b) for b in printable}
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


def _special_tokens(tok: Tokenizer) -> dict[str, str]:
    """bos/eos (and GPT-2's unk) as transformers expects them; none for the byte tokenizer."""
    eot = tok.eot if isinstance(tok, HFTokenizer) else (EOT if tok.eot_id is not None else None)
    if eot is None:
        return {}
    special = {"bos_token": eot, "eos_token": eot}
    if eot == EOT:  # GPT-2's convention: one token for all three
        special["unk_token"] = eot
    return special


def _add_prefix_space(text: str) -> bool:
    """The JSON's own add_prefix_space: transformers 4.x rewrites the pre-tokenizer to match the
    config's value (False when unset), which would change the ids of a model that adds one."""
    pre = json.loads(text).get("pre_tokenizer") or {}
    return bool(pre.get("add_prefix_space", False))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
