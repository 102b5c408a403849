"""Corpus -> datasets -> token memmap cache -> batch sampler.

:func:`prepare_corpus` turns a :class:`DataConfig` into two flat arrays of token ids (train, val),
stored once as numpy memmaps under ``<cache_dir>/<key>/`` where ``key`` hashes everything that
changes the tokens. Later runs (and every rank of a distributed run) just map those files.
:class:`BatchSampler` draws training windows statelessly from ``(seed, step)``, so resuming needs
only the step and the global batch does not depend on how it is split over ranks and micro-steps.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minigpt.config import ConfigError, DataConfig
from minigpt.tokenizer import Tokenizer, build_tokenizer, can_reach, tokenizer_from_state

if TYPE_CHECKING:
    # ``datasets`` (with pandas and pyarrow) takes about 1 s to import; a run whose token cache
    # is warm never needs it, so it is imported only where a cache is built.
    from datasets import Dataset

# Bump when the cache layout or tokenization changes, so old caches are not reused.
FORMAT_VERSION = 1
# Below this many documents, map's process start-up costs more than it saves (the stdlib,
# 671 files, tokenizes in 1.7 s with one process and 3.0 s with two).
SMALL_CORPUS_DOCS = 10_000
# Tokenizers without an end-of-text token (byte) separate documents with a blank line instead:
# the model still sees where one file ends, and decoded samples stay plain text.
DOC_SEPARATOR = "\n\n"
STDLIB_SKIP = ("idlelib", "site-packages", "dist-packages", "__pycache__")

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


def prepare_corpus(cfg: DataConfig, min_tokens: int = 2) -> Corpus:
    """Build the token cache for ``cfg`` unless it exists; check both splits hold ``min_tokens``.

    ``min_tokens`` is ``model.block_size + 1``: one training window.
    """
    files = _source_files(cfg)
    inputs = _key_inputs(cfg, files)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir).expanduser().resolve() / key
    corpus = None
    if (path / "meta.json").exists():
        try:
            corpus = load_corpus(path)
        except CacheDamaged as err:
            _set_aside(path, err)
    if corpus is None:
        _build_cache(cfg, files, inputs, path)
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
    return Corpus(train=train, val=val, tokenizer=tokenizer, cache_path=path, meta=meta)


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
    for split in ("train", "val"):
        n = len(getattr(corpus, split))
        if n < min_tokens:
            raise ConfigError(
                f"the {split} split has {n} tokens (corpus: {corpus.meta['tokens']}) but "
                f"model.block_size={min_tokens - 1} needs at least {min_tokens}; "
                "use a smaller model.block_size or more data"
            )


# ---- sources ---------------------------------------------------------------------------------


def _source_files(cfg: DataConfig) -> list[Path]:
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
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        found = [Path(m).resolve() for m in matches if os.path.isfile(m)]
        if not found:
            raise ConfigError(
                f"data.paths entry {pattern!r} matches no file (relative paths start at "
                f"{os.getcwd()}; for a folder use a glob such as 'notes/**/*.txt')"
            )
        files.update(dict.fromkeys(found))
    return list(files)


def _key_inputs(cfg: DataConfig, files: list[Path]) -> dict[str, Any]:
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
    if cfg.source == "hub":
        hub = ("name", "config", "split", "text_column")
        inputs.update({k: getattr(cfg, k) for k in hub})
    return inputs


def _load_documents(cfg: DataConfig, files: list[Path], work: Path) -> Dataset:
    """One row per document with a ``text`` column; empty documents dropped."""
    from datasets import Dataset

    if cfg.source == "hub":
        docs = _load_hub(cfg).filter(
            lambda batch: [bool(t) for t in batch["text"]],
            batched=True,
            cache_file_name=str(work / "docs.arrow"),
            new_fingerprint=uuid.uuid4().hex,
        )
    else:
        texts = {str(f): f.read_text(encoding="utf-8", errors="replace") for f in files}
        kept = {path: text for path, text in texts.items() if text}
        docs = Dataset.from_dict({"text": list(kept.values()), "path": list(kept)})
    if len(docs) == 0:
        raise ConfigError(_empty_corpus_message(cfg))
    return docs


def _empty_corpus_message(cfg: DataConfig) -> str:
    if cfg.source == "text":
        return f"data.paths={list(cfg.paths)} holds no text (every matched file is empty)"
    if cfg.source == "hub":
        return f"data.name={cfg.name} has no text in data.text_column={cfg.text_column!r}"
    return "data.source=stdlib found no .py files in this Python's standard library"


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
            "run once with network, or use data.source=text"
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


def split_documents(docs: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Disjoint (train, val) by whole documents, seeded; val gets at least one of >= 2 documents.

    A single document is cut by characters instead: its last ``val_fraction`` becomes val.
    """
    from datasets import Dataset

    n = len(docs)
    if n == 1:
        text = docs[0]["text"]
        cut = len(text) - max(1, round(len(text) * val_fraction))
        return Dataset.from_dict({"text": [text[:cut]]}), Dataset.from_dict({"text": [text[cut:]]})
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return docs.select(np.sort(order[n_val:])), docs.select(np.sort(order[:n_val]))


# ---- cache -----------------------------------------------------------------------------------


def _build_cache(cfg: DataConfig, files: list[Path], inputs: dict[str, Any], path: Path) -> None:
    """Write the cache into a hidden temp folder and rename it into place: all or nothing."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (tmp / "hf").mkdir(parents=True)
    try:
        meta = _write_tokens(cfg, files, tmp)
        shutil.rmtree(tmp / "hf")
        # meta.json travels into run.json, so it names the file list's size; the list itself
        # (path, size, mtime_ns of each file) goes to key_inputs.json.
        files_summary = {"count": len(files), "bytes": sum(size for _, size, _ in inputs["files"])}
        meta["key"], meta["key_inputs"] = path.name, {**inputs, "files": files_summary}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "key_inputs.json").write_text(json.dumps(inputs, indent=1))
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path) -> None:
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path / "meta.json").exists():
            raise
        # Another process (e.g. another rank) published the same key first: same content.


def _write_tokens(cfg: DataConfig, files: list[Path], folder: Path) -> dict[str, Any]:
    """Load, split, (train the tokenizer,) tokenize; write ``{train,val}.bin`` and the tokenizer."""
    docs = _load_documents(cfg, files, folder / "hf")
    train, val = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    texts = (batch["text"] for batch in train.iter(batch_size=256))
    tokenizer = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size)  # only BPE reads texts
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    num_proc = _map_procs(len(docs), cfg.num_proc, tokenizer)
    tokens = {}
    for split, ds in (("train", train), ("val", val)):
        ids = _tokenize(ds, tokenizer, num_proc, folder / "hf" / f"{split}.arrow")
        tokens[split] = _save_ids(ids, folder / f"{split}.bin", dtype)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer.state()))
    return {
        "format": FORMAT_VERSION,
        "tokens": tokens,
        "docs": {"train": len(train), "val": len(val)},
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
    }


def _map_procs(n_docs: int, num_proc: int, tokenizer: Tokenizer) -> int:
    """Processes for ``map``: BPE and GPT-2 already batch-encode on native threads (and HF
    tokenizers warns when forked after using them), so only the byte tokenizer forks."""
    if n_docs < SMALL_CORPUS_DOCS or tokenizer.name != "byte":
        return 1
    return num_proc


def _tokenize(ds: Dataset, tokenizer: Tokenizer, num_proc: int, cache_file: Path) -> Dataset:
    """A dataset with one ``ids`` row per document, each ending with the document separator."""
    from datasets import Features, List, Value

    sep = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode(DOC_SEPARATOR)
    return ds.map(
        partial(_encode_batch, tokenizer=tokenizer, sep=sep),
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        features=Features({"ids": List(Value("int32"))}),
        cache_file_name=str(cache_file),
        new_fingerprint=uuid.uuid4().hex,  # skips hashing the tokenizer; the file is ours
        desc=f"tokenize {cache_file.stem}",
    )


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer, sep: list[int]) -> dict:
    return {"ids": [ids + sep for ids in tokenizer.encode_batch(batch["text"])]}


def _save_ids(ids: Dataset, path: Path, dtype: np.dtype) -> int:
    """Append every document's ids to one flat binary file; returns the token count."""
    n = 0
    with open(path, "wb") as f:
        for chunk in ids.data.column("ids").chunks:
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            flat.astype(dtype).tofile(f)
            n += len(flat)
    return n


# ---- batches ---------------------------------------------------------------------------------


def _windows(data: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, ...]:
    """(x, y) for windows starting at ``offsets``: one vectorised gather, y is x shifted by one."""
    rows = np.asarray(data[offsets[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    xy = torch.from_numpy(rows)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def _n_windows(data: np.ndarray, block_size: int) -> int:
    if len(data) < block_size + 1:
        raise ConfigError(
            f"the corpus split has {len(data)} tokens but model.block_size={block_size} needs at "
            f"least {block_size + 1}; use a smaller model.block_size or more data"
        )
    return len(data) - block_size


class BatchSampler:
    """Random windows of block_size+1 tokens; the sequence of GLOBAL batches depends only on
    (seed, step, global_batch) — never on world size or micro-step split."""

    def __init__(self, data: np.ndarray, block_size: int, global_batch: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        self.global_batch = global_batch
        self.seed = seed
        self._n_windows = _n_windows(data, block_size)

    def global_offsets(self, step: int) -> np.ndarray:
        """Window starts of the whole step's batch, from a generator seeded by (seed, step)."""
        rng = np.random.default_rng([self.seed % 2**64, step])
        return rng.integers(0, self._n_windows, size=self.global_batch)

    def batch(
        self, step: int, rank: int, world_size: int, micro: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch: the global batch is split rank-major, then by micro-step."""
        parts = world_size * grad_accum
        if self.global_batch % parts:
            raise ValueError(
                f"global batch {self.global_batch} does not split into {world_size} ranks "
                f"x {grad_accum} micro-steps"
            )
        size = self.global_batch // parts
        start = (rank * grad_accum + micro) * size
        return _windows(self.data, self.global_offsets(step)[start : start + size], self.block_size)

    def state_dict(self) -> dict[str, int]:
        """What resuming needs besides the step (plain ints, checkpoint-safe)."""
        return {"seed": self.seed, "global_batch": self.global_batch, "block_size": self.block_size}

    def load_state_dict(self, d: dict[str, int]) -> None:
        """Take the checkpoint's seed; the batch shape must match or the data order would fork."""
        if (d["global_batch"], d["block_size"]) != (self.global_batch, self.block_size):
            raise ConfigError(
                f"the checkpoint was trained with global batch {d['global_batch']} and "
                f"model.block_size={d['block_size']}, this run has {self.global_batch} and "
                f"{self.block_size}; keep train.batch_size x ranks x train.grad_accum and "
                "model.block_size when resuming, or start a new run (resume=never)"
            )
        self.seed = int(d["seed"])


def eval_batches(
    data: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches, the same at every eval, so losses are comparable over time."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, _n_windows(data, block_size), size=(n_batches, batch_size))
    return [_windows(data, row, block_size) for row in offsets]
