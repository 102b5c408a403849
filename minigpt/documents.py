"""Where a corpus's documents come from, and how they split into train and val.

Sources: the running interpreter's standard library, local text files (read as bytes, so files
that are not UTF-8 are reported and the byte tokenizer sees their own bytes), or a Hugging Face
dataset. :func:`split_documents` gives val ``data.val_fraction`` of the tokens, cutting one
document when needed, whatever the documents' sizes.
"""

from __future__ import annotations

import glob
import logging
import os
import sysconfig
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt.config import ConfigError, DataConfig
from minigpt.tokenizer import can_reach

if TYPE_CHECKING:
    from datasets import Dataset

STDLIB_SKIP = ("idlelib", "site-packages", "dist-packages", "__pycache__")

log = logging.getLogger(__name__)


# pragma: no mutate start - loading files and the Hub; make mutation tests the split
def source_files(cfg: DataConfig) -> list[Path]:
    if cfg.source == "stdlib":
        return stdlib_files()
    if cfg.source == "text":
        return _resolve_paths(cfg.paths)
    return []


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, without tests and IDLE."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if not (d.startswith("test") or d in STDLIB_SKIP)]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def _resolve_paths(patterns: list[str]) -> list[Path]:
    files: dict[Path, None] = {}  # ordered set: a file named twice is read once
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        # A file that exists under this very name is meant literally ("notes[1].txt").
        literal = os.path.isfile(expanded)
        matches = [expanded] if literal else sorted(glob.glob(expanded, recursive=True))
        folder, name = os.path.split(expanded)
        if not matches and os.path.isdir(folder):  # "runs [2]/*.txt": a folder's real name
            matches = sorted(glob.glob(os.path.join(glob.escape(folder), name), recursive=True))
        found = [Path(m).resolve() for m in matches if os.path.isfile(m)]
        if not found:
            raise ConfigError(
                f"data.paths entry {pattern!r} matches no file (relative paths start at "
                f"{os.getcwd()}; for a folder use a glob such as 'notes/**/*.txt')"
            )
        files.update(dict.fromkeys(found))
    return list(files)


def keeps_bytes(cfg: DataConfig) -> bool:
    """Whether documents are stored as latin-1 text (one character per byte of the file), so the
    byte tokenizer reads the file's own bytes back with ``.encode("latin-1")``."""
    return cfg.tokenizer == "byte" and cfg.source != "hub"


def load_documents(cfg: DataConfig, files: list[Path]) -> tuple[Dataset, dict[str, Any] | None]:
    """One row per document with a ``text`` column (a hub dataset's rows may be empty); and the
    report on source files that are not valid UTF-8 (None when all are)."""
    from datasets import Dataset

    if cfg.source == "hub":
        return _load_hub(cfg), None
    texts, report = _read_files(files, latin1=keeps_bytes(cfg))
    return Dataset.from_dict({"text": list(texts.values()), "path": list(texts)}), report


def _read_files(files: list[Path], latin1: bool) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The text of each non-empty file by path, and a report on those that are not UTF-8.

    ``latin1``: byte n becomes character n, whatever the file holds; otherwise bytes that are not
    UTF-8 become U+FFFD. Either way the files that are not UTF-8 are logged in one warning.
    """
    texts: dict[str, str] = {}
    bad: list[tuple[str, int, bool]] = []  # path, bytes that are not UTF-8, holds NUL bytes
    for f in files:
        raw = f.read_bytes()
        if not (raw.isascii() or _is_utf8(raw)):
            bad.append((str(f), _invalid_utf8_bytes(raw), b"\0" in raw))
        text = raw.decode("latin-1") if latin1 else raw.decode("utf-8", errors="replace")
        if text:
            texts[str(f)] = text
    if not bad:
        return texts, None
    report = {
        "files": len(bad),
        "binary": sum(nul for _, _, nul in bad),  # text files hold no NUL bytes
        "invalid_bytes": sum(n for _, n, _ in bad),
        "kept_as_bytes": latin1,
        "examples": [path for path, _, _ in bad[:3]],
    }
    _warn_not_utf8(report, len(files))
    return texts, report


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _invalid_utf8_bytes(raw: bytes) -> int:
    # surrogateescape turns each invalid byte into one lone surrogate, which "ignore" then drops.
    return len(raw) - len(raw.decode("utf-8", "surrogateescape").encode("utf-8", "ignore"))


def _warn_not_utf8(report: dict[str, Any], n_files: int) -> None:
    binary = f" ({report['binary']} binary: NUL bytes)" if report["binary"] else ""
    fate = (
        "kept as they are (data.tokenizer=byte)"
        if report["kept_as_bytes"]
        else "replaced by U+FFFD (data.tokenizer=byte would keep them)"
    )
    more = ", ..." if report["files"] > len(report["examples"]) else ""
    log.warning(
        "%d of %d source files are not valid UTF-8%s; their %d invalid bytes are %s: %s%s",
        report["files"],
        n_files,
        binary,
        report["invalid_bytes"],
        fate,
        ", ".join(report["examples"]),
        more,
    )


def empty_corpus_message(cfg: DataConfig) -> str:
    if cfg.source == "text":
        return f"data.paths={list(cfg.paths)} holds no text (every matched file is empty)"
    if cfg.source == "hub":
        return f"data.name={cfg.name} has no text in data.text_column={cfg.text_column!r}"
    return "data=stdlib found no .py files in this Python's standard library"


def _load_hub(cfg: DataConfig) -> Dataset:
    """``load_dataset`` that fails in seconds, not after minutes of retries, without a network."""
    import datasets
    import huggingface_hub.constants as hf_constants

    offline = hf_constants.HF_HUB_OFFLINE or not can_reach(hf_constants.ENDPOINT)
    try:
        with _hub_offline(offline):
            ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split)
    except ConnectionError:
        raise ConfigError(
            f"data.name={cfg.name} is not in the local Hugging Face cache and "
            f"{hf_constants.ENDPOINT} cannot be reached (no network?); "
            "run once with network, or train on local files: data=text 'data.paths=[notes/*.txt]'"
        ) from None
    except datasets.exceptions.DatasetNotFoundError:
        raise ConfigError(f"data.name={cfg.name} was not found on the Hugging Face Hub") from None
    if cfg.text_column not in ds.column_names:
        raise ConfigError(
            f"data.text_column={cfg.text_column!r} is not a column of {cfg.name}; "
            f"use one of: {', '.join(ds.column_names)}"
        )
    return ds.select_columns([cfg.text_column]).rename_columns({cfg.text_column: "text"})


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Offline mode for one call: HF reads HF_HUB_OFFLINE at import, so the env var is too late.

    In offline mode a dataset already in the local cache still loads.
    """
    import datasets
    import huggingface_hub.constants as hf_constants

    saved = hf_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    if offline:
        hf_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# pragma: no mutate end
def split_documents(
    docs: Dataset,
    val_fraction: float,
    seed: int,
    *,
    latin1: bool = False,
    separator: int = 0,
    sizes: np.ndarray | None = None,
) -> tuple[Dataset, Dataset]:
    """Disjoint (train, val) with ``val_fraction`` of the corpus's size in val, seeded.

    Documents are shuffled with ``seed`` and fill val in that order; the one that crosses
    ``val_fraction`` of the total is cut in two: its head ends train, its tail ends val. Sizes
    are UTF-8 bytes (``latin1``: characters, one per byte of the file) plus ``separator`` per
    document. Those are the byte tokenizer's tokens, so with it val holds ``val_fraction`` of all
    tokens within 4 tokens, whatever the document sizes. For BPE and GPT-2, bytes stand in for
    tokens, as files differ in tokens per byte: on the stdlib corpus, data.tokenizer=bpe and
    val_fraction 0.05 give val 4.83% of the tokens. Both splits are non-empty for any corpus of
    at least 2 bytes. Empty documents go to neither. ``sizes``: :func:`document_sizes`, if known.
    """
    sizes = document_sizes(docs, latin1) if sizes is None else sizes
    kept = np.flatnonzero(sizes)
    order = kept[np.random.default_rng(seed).permutation(len(kept))]
    k, tail = _val_boundary(sizes[order], val_fraction, separator)
    cut = int(order[k])
    head_row, tail_row = _cut_document(docs[cut], int(sizes[cut]) - tail, latin1)
    train = _with_row(docs.select(np.sort(order[k + 1 :])), head_row)
    val = _with_row(docs.select(np.sort(order[:k])), tail_row)
    return train, val


def document_sizes(docs: Dataset, latin1: bool) -> np.ndarray:
    """Each document's size in UTF-8 bytes (``latin1``: in characters), by arrow kernels over
    batches: no Python per row. (A ``select``-ed dataset is slower: it is read row by row.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(docs) == 0:
        return np.zeros(0, dtype=np.int64)
    length = pc.utf8_length if latin1 else pc.binary_length  # characters : UTF-8 bytes
    sizes = docs.with_format("arrow").map(
        lambda batch: pa.table({"size": pc.fill_null(length(batch["text"]), 0)}),  # None: 0
        batched=True,
        batch_size=100_000,
        remove_columns=docs.column_names,
        keep_in_memory=True,  # 8 bytes a document
        new_fingerprint=uuid.uuid4().hex,
        desc="measure documents",
    )
    return sizes.data.column("size").to_numpy().astype(np.int64)


def _val_boundary(sizes: np.ndarray, val_fraction: float, separator: int) -> tuple[int, int]:
    """(k, tail): val gets the first k documents whole and the last ``tail`` units of the k-th
    (0-based), so that it holds ``val_fraction`` of all units, separators included."""
    ends = np.cumsum(sizes + separator)
    target = val_fraction * (ends[-1] + separator)  # the cut document gains a second separator
    k = min(int(np.searchsorted(ends, target)), len(sizes) - 1)
    before = ends[k - 1] if k else 0
    tail = min(max(round(target - before - separator), 0), int(sizes[k]))
    if k == 0:
        tail = max(tail, 1)  # val is never empty
    if k == len(sizes) - 1:
        tail = min(tail, int(sizes[k]) - 1)  # nor is train
    return k, tail


def _cut_document(row: dict[str, Any], at: int, latin1: bool) -> tuple[dict, dict]:
    """The row's head (its first ``at`` bytes, rounded down to a whole character) and tail."""
    text = row["text"]
    if not latin1:
        at = len(text.encode("utf-8")[:at].decode("utf-8", errors="ignore"))
    return {**row, "text": text[:at]}, {**row, "text": text[at:]}


def _with_row(docs: Dataset, row: dict[str, Any]) -> Dataset:
    """``docs`` and then ``row`` (unless its text is empty), as one dataset."""
    from datasets import Dataset, concatenate_datasets

    if not row["text"]:
        return docs
    piece = Dataset.from_dict({k: [v] for k, v in row.items()}, features=docs.features)
    return concatenate_datasets([docs, piece])
