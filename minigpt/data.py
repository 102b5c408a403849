"""Corpus -> token memmap cache: tokenize once, then every run and rank maps the files.

:func:`prepare_corpus` turns a :class:`DataConfig` into two flat arrays of token ids (train, val),
stored once as numpy memmaps under ``<cache_dir>/<key>/`` where ``key`` hashes everything that
changes the tokens. Later runs (and every rank of a distributed run) just map those files.
Files are read as bytes: the byte tokenizer sees each file's own bytes, valid UTF-8 or not, and
files that are not UTF-8 are reported (a log line and ``meta.json``), never silently changed.
Documents come from :mod:`minigpt.documents`; batches are drawn by :mod:`minigpt.batches`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt import documents
from minigpt.batches import too_short_fix
from minigpt.config import ConfigError, DataConfig
from minigpt.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_state

if TYPE_CHECKING:
    # ``datasets`` (with pandas and pyarrow) takes about 1 s to import; a run whose token cache
    # is warm never needs it, so it is imported only where a cache is built.
    from datasets import Dataset

# Bump when the cache layout or tokenization changes, so old caches are not reused.
FORMAT_VERSION = 2
# Below this many documents, map's process start-up costs more than it saves (the stdlib,
# 671 files, tokenizes in 1.7 s with one process and 3.0 s with two).
SMALL_CORPUS_DOCS = 10_000
# Tokenizers without an end-of-text token (byte) separate documents with a blank line instead:
# the model still sees where one file ends, and decoded samples stay plain text.
DOC_SEPARATOR = "\n\n"
# A build writes into ``.tmp-<key>-<host>-<pid>-<random>`` and renames it into place; a killed
# build leaves it behind. Ours are removed once the pid is gone; other hosts' after a day.
TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{16}-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
STALE_TEMP_SECONDS = 24 * 3600
# Writing the cache failed for want of room, not because of a bug (whatever file it was).
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

log = logging.getLogger(__name__)


class CacheDamaged(Exception):  # noqa: N818 - a state of the files, handled by rebuilding
    """A cache folder whose files do not match its meta.json (edited, truncated, half copied)."""


@dataclass
class Corpus:
    """The token ids of both splits, the tokenizer that made them, and where they are cached."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    cache_path: Path
    meta: dict[str, Any]


def prepare_corpus(
    cfg: DataConfig, min_tokens: int = 2, tokenizer: Tokenizer | None = None
) -> Corpus:
    """Build the token cache for ``cfg`` unless it exists; check both splits hold ``min_tokens``.

    ``min_tokens`` is ``model.block_size + 1``: one training window. ``tokenizer``: a given one
    (a pretrained model's, ``cfg.tokenizer`` naming its kind) instead of one built or trained.
    """
    files = documents.source_files(cfg)
    inputs = _key_inputs(cfg, files, tokenizer)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir).expanduser().resolve() / key
    remove_stale_temp_folders(path.parent)
    corpus = None
    if (path / "meta.json").exists():
        try:
            corpus = load_corpus(path)
        except CacheDamaged as err:
            _set_aside(path, err)
    if corpus is None:
        _build_cache(cfg, files, inputs, path, tokenizer)
        corpus = load_corpus(path)
    _check_lengths(corpus, min_tokens)
    return corpus


def load_corpus(cache_path: str | Path) -> Corpus:
    """Open a cache folder written by :func:`prepare_corpus` (memory-mapped, read-only).

    Caches are published whole, so a damaged one was changed afterwards (a disk error, a partial
    copy between machines): it raises :class:`CacheDamaged` rather than training on garbage.
    """
    path = Path(cache_path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        tokenizer = tokenizer_from_state(json.loads((path / "tokenizer.json").read_text()))
        dtype = np.dtype(meta["dtype"])
        train, val = (
            _open_tokens(path / f"{split}.bin", dtype, meta["tokens"][split])
            for split in ("train", "val")
        )
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CacheDamaged(f"{type(err).__name__}: {err}") from err
    for split, ids in (("train", train), ("val", val)):
        _check_ids(split, ids, tokenizer.vocab_size)
    return Corpus(train=train, val=val, tokenizer=tokenizer, cache_path=path, meta=meta)


def _check_ids(split: str, ids: np.ndarray, vocab_size: int) -> None:
    """Every id must have a row in the embedding: a file of the right size but changed bytes
    would otherwise fail deep in the model, or train on ids of nothing. One pass over the
    file (about 1 s a GB from the page cache), read in chunks to stay small."""
    chunk = 1 << 26
    for start in range(0, len(ids), chunk):
        top = int(ids[start : start + chunk].max())
        if top >= vocab_size:
            raise CacheDamaged(f"{split}.bin holds id {top}, the tokenizer has {vocab_size} ids")


def _open_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    size = path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        raise CacheDamaged(f"{path.name} holds {size} bytes, meta.json says {n_tokens} tokens")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r")


def _set_aside(path: Path, err: CacheDamaged) -> None:
    """Move a damaged cache out of the way (kept, for a look) so that it is built again."""
    aside = path.with_name(f".damaged-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process set it aside first
    log.warning("token cache %s is damaged (%s): moved to %s, rebuilding it", path, err, aside)


def _check_lengths(corpus: Corpus, min_tokens: int) -> None:
    total = len(corpus.train) + len(corpus.val)
    val_fraction = corpus.meta["key_inputs"]["val_fraction"]
    for split in ("train", "val"):
        n = len(getattr(corpus, split))
        if n < min_tokens:
            raise ConfigError(
                f"the {split} split has {n} tokens (data.val_fraction={val_fraction} of "
                f"{total} tokens in all) but model.block_size={min_tokens - 1} needs at least "
                f"{min_tokens}; {too_short_fix(split)}"
            )


def _key_inputs(
    cfg: DataConfig, files: list[Path], tokenizer: Tokenizer | None = None
) -> dict[str, Any]:
    """Everything that changes the tokens; files by path, size and mtime (no content hashing)."""
    inputs: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
    }
    if tokenizer is not None and tokenizer.name in ("bpe", "hf"):  # given, not trained here
        state = json.dumps(tokenizer.state(), sort_keys=True).encode()
        inputs["tokenizer_sha256"] = hashlib.sha256(state).hexdigest()
        inputs["vocab_size"] = None
    if cfg.source == "hub":
        hub = ("name", "config", "split", "text_column")
        inputs.update({k: getattr(cfg, k) for k in hub})
    return inputs


# ---- cache -----------------------------------------------------------------------------------


def _build_cache(
    cfg: DataConfig,
    files: list[Path],
    inputs: dict[str, Any],
    path: Path,
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write the cache into a hidden temp folder and rename it into place: all or nothing."""
    tmp = path.parent / f".tmp-{path.name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "hf").mkdir(parents=True)
    except OSError as err:
        raise _cache_dir_error(cfg, path.parent, err) from None
    try:
        meta = _write_tokens(cfg, files, tmp, tokenizer)
        shutil.rmtree(tmp / "hf")
        # meta.json travels into run.json, so it names the file list's size; the list itself
        # (path, size, mtime_ns of each file) goes to key_inputs.json.
        files_summary = {"count": len(files), "bytes": sum(size for _, size, _ in inputs["files"])}
        meta["key"], meta["key_inputs"] = path.name, {**inputs, "files": files_summary}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "key_inputs.json").write_text(json.dumps(inputs, indent=1))
        _publish(tmp, path)
    except OSError as err:
        if not _is_cache_write_error(err, tmp):
            raise
        raise _cache_dir_error(cfg, path.parent, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_cache_write_error(err: OSError, tmp: Path) -> bool:
    """Whether writing the cache failed (no room, no rights), rather than reading a source."""
    in_cache = err.filename is not None and str(err.filename).startswith(str(tmp))
    # pyarrow reports a full disk as an OSError without errno, its message naming the reason.
    no_room = err.errno in NO_ROOM_ERRNOS or os.strerror(errno.ENOSPC) in str(err)
    return in_cache or no_room


def _cache_dir_error(cfg: DataConfig, folder: Path, err: OSError) -> ConfigError:
    reason = err.strerror or str(err)
    return ConfigError(
        f"data.cache_dir={cfg.cache_dir} cannot hold the token cache: {folder}: {reason}; "
        "set data.cache_dir (or the MINIGPT_CACHE_DIR environment variable) to a writable "
        "folder with free space"
    )


def _host() -> str:
    """This machine's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"


def remove_stale_temp_folders(cache_dir: Path) -> None:
    """Remove the temp folders that killed builds left in ``cache_dir``.

    A folder of this host goes once its process is gone; one of another host (whose processes
    we cannot see) once nothing in it changed for a day. A live process's folder is kept.
    """
    try:
        temps = [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    except OSError:
        return  # no cache yet, or not a folder: building reports that
    for folder in temps:
        try:
            if _is_stale(folder):
                shutil.rmtree(folder)
                log.info("removed %s, left behind by a killed cache build", folder)
        except FileNotFoundError:
            continue  # removed meanwhile, by its own build or another cleaner
        except OSError as err:
            log.info("could not remove the stale temp folder %s: %s", folder, err)


def _is_stale(folder: Path) -> bool:
    match = TEMP_NAME.fullmatch(folder.name)
    if match and match["host"] == _host():
        return not _pid_alive(int(match["pid"]))
    return time.time() - _last_change(folder) > STALE_TEMP_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False  # not a pid at all
    return True


def _last_change(folder: Path) -> float:
    """The newest mtime of ``folder`` and what it holds two levels down (hf/*.arrow)."""
    paths = [folder, *folder.iterdir()]
    paths += [inner for p in paths[1:] if p.is_dir() for inner in p.iterdir()]
    return max(p.stat().st_mtime for p in paths)


def _publish(tmp: Path, path: Path) -> None:
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path / "meta.json").exists():
            raise
        # Another process (e.g. another rank) published the same key first: same content.


def _write_tokens(
    cfg: DataConfig, files: list[Path], folder: Path, given: Tokenizer | None = None
) -> dict[str, Any]:
    """Load, split, (train the tokenizer,) tokenize; write ``{train,val}.bin`` and the tokenizer."""
    latin1 = documents.keeps_bytes(cfg)
    docs, not_utf8 = documents.load_documents(cfg, files)
    sizes = documents.document_sizes(docs, latin1)
    if not sizes.any():
        raise ConfigError(documents.empty_corpus_message(cfg))
    separator = len(DOC_SEPARATOR) if cfg.tokenizer == "byte" else 1  # else an end-of-text id
    train, val = documents.split_documents(
        docs, cfg.val_fraction, cfg.split_seed, latin1=latin1, separator=separator, sizes=sizes
    )
    texts = (batch["text"] for batch in train.iter(batch_size=256))
    # Only BPE reads texts; a given tokenizer (a pretrained model's) is used as it is.
    tokenizer = given or build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size)
    encode = _latin1_bytes if latin1 else tokenizer.encode_batch
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    num_proc = _map_procs(len(docs), cfg.num_proc, tokenizer)
    tokens = {}
    for split, ds in (("train", train), ("val", val)):
        ids = _tokenize(ds, tokenizer, encode, num_proc, folder / "hf" / f"{split}.arrow")
        tokens[split] = _save_ids(ids, folder / f"{split}.bin", dtype)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer.state()))
    meta = {
        "format": FORMAT_VERSION,
        "tokens": tokens,
        "docs": {"train": len(train), "val": len(val)},
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
    }
    if not_utf8:
        meta["non_utf8"] = not_utf8
    return meta


def _latin1_bytes(texts: list[str]) -> list[list[int]]:
    """The byte tokenizer's ids of documents stored one character per byte: the file's bytes."""
    return [list(text.encode("latin-1")) for text in texts]


def _map_procs(n_docs: int, num_proc: int, tokenizer: Tokenizer) -> int:
    """Processes for ``map``: BPE and GPT-2 already batch-encode on native threads (and HF
    tokenizers warns when forked after using them), so only the byte tokenizer forks."""
    if n_docs < SMALL_CORPUS_DOCS or tokenizer.name != "byte":
        return 1
    return num_proc


def _tokenize(
    ds: Dataset,
    tokenizer: Tokenizer,
    encode: Callable[[list[str]], list[list[int]]],
    num_proc: int,
    cache_file: Path,
) -> Dataset:
    """A dataset with one ``ids`` row per document, each ending with the document separator."""
    from datasets import Features, List, Value

    sep = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode(DOC_SEPARATOR)
    return ds.map(
        partial(_encode_batch, encode=encode, sep=sep),
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        features=Features({"ids": List(Value("int32"))}),
        cache_file_name=str(cache_file),
        new_fingerprint=uuid.uuid4().hex,  # skips hashing the tokenizer; the file is ours
        desc=f"tokenize {cache_file.stem}",
    )


def _encode_batch(
    batch: dict[str, list], encode: Callable[[list[str]], list[list[int]]], sep: list[int]
) -> dict:
    return {"ids": [ids + sep for ids in encode(batch["text"])]}


def _save_ids(ids: Dataset, path: Path, dtype: np.dtype) -> int:
    """Append every document's ids to one flat binary file; returns the token count."""
    n = 0
    with open(path, "wb") as f:
        for chunk in ids.data.column("ids").chunks:
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            flat.astype(dtype).tofile(f)
            n += len(flat)
    return n
