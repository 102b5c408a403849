"""Corpus preparation (sources, split, token cache) and the batch sampler."""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset

from minigpt import data
from minigpt import documents as sources
from minigpt.batches import BatchSampler, EvalBatches, eval_batches
from minigpt.config import ConfigError, DataConfig
from minigpt.data import prepare_corpus
from minigpt.documents import split_documents, stdlib_files
from minigpt.tokenizer import EOT


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """12 small, distinct code-like documents."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(
            f"# document {i}\ndef f{i}(x):\n    return x * {i}\n"
        )
    return folder


def text_config(folder: Path, cache: Path, **overrides) -> DataConfig:
    args = {"source": "text", "paths": [f"{folder}/*.txt"], "cache_dir": str(cache), "num_proc": 1}
    return DataConfig(**{**args, **overrides})


def documents(corpus: data.Corpus, split: str) -> list[str]:
    """The documents of a split of a tokenizer with an end-of-text token (BPE), in order."""
    text = corpus.tokenizer.decode(getattr(corpus, split).tolist())
    return text.split(EOT)[:-1]


def assert_holds_exactly(corpus: data.Corpus, docs: list[str]) -> None:
    """Both splits together are ``docs``, each piece followed by the byte tokenizer's separator;
    at most one document is cut in two: its head ends train and its tail ends val."""
    sep = data.DOC_SEPARATOR
    train, val = (corpus.tokenizer.decode(getattr(corpus, s).tolist()) for s in ("train", "val"))
    cut = [d for d in docs if d + sep not in train and d + sep not in val]
    assert len(cut) <= 1
    assert len(train) + len(val) == sum(len(d) + len(sep) for d in docs) + len(sep) * len(cut)
    for d in cut:
        assert any(
            train.endswith(d[:i] + sep) and val.endswith(d[i:] + sep) for i in range(1, len(d))
        )


def assert_val_share(corpus: data.Corpus, val_fraction: float) -> None:
    """The split's promise for the byte tokenizer: val holds val_fraction of the tokens, within 4
    tokens, and neither split is empty."""
    total = len(corpus.train) + len(corpus.val)
    assert len(corpus.train) > 0 and len(corpus.val) > 0
    assert abs(len(corpus.val) - val_fraction * total) <= 4, (len(corpus.val), total)


# ---- corpus and cache -----------------------------------------------------------------------

CACHE_FILES = {"train.bin", "val.bin", "tokenizer.json", "meta.json", "key_inputs.json"}


def test_text_corpus_is_tokenized_into_a_memmap_cache(corpus_dir, tmp_path) -> None:
    corpus = prepare_corpus(text_config(corpus_dir, tmp_path / "cache"))
    assert corpus.cache_path.parent == tmp_path / "cache"
    assert {p.name for p in corpus.cache_path.iterdir()} == CACHE_FILES
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert corpus.meta["docs"] == {"train": 12, "val": 1}  # 5% of 12 small files: part of one
    assert corpus.meta["tokens"] == {"train": len(corpus.train), "val": len(corpus.val)}
    assert_holds_exactly(corpus, [p.read_text() for p in corpus_dir.iterdir()])
    assert_val_share(corpus, 0.05)
    assert "non_utf8" not in corpus.meta


def test_second_prepare_reuses_the_cache_without_tokenizing(corpus_dir, tmp_path, monkeypatch):
    cfg = text_config(corpus_dir, tmp_path / "cache")
    first = prepare_corpus(cfg)
    monkeypatch.setattr(data, "_tokenize", pytest.fail)
    monkeypatch.setattr(data, "build_tokenizer", pytest.fail)
    second = prepare_corpus(cfg)
    assert second.cache_path == first.cache_path
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)


def test_changing_a_source_file_makes_a_new_cache(corpus_dir, tmp_path) -> None:
    cfg = text_config(corpus_dir, tmp_path / "cache")
    before = prepare_corpus(cfg)
    changed = corpus_dir / "doc03.txt"
    changed.write_text("# rewritten\n")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    after = prepare_corpus(cfg)
    assert after.cache_path != before.cache_path
    assert_holds_exactly(after, [p.read_text() for p in corpus_dir.iterdir()])


def test_only_settings_that_change_tokens_change_the_key(corpus_dir, tmp_path) -> None:
    def key(**overrides) -> Path:
        return prepare_corpus(text_config(corpus_dir, tmp_path / "c", **overrides)).cache_path

    base = key()
    assert key(num_proc=2) == base and key(vocab_size=999) == base  # vocab_size: bpe only
    assert len({base, key(split_seed=7), key(val_fraction=0.3), key(tokenizer="bpe")}) == 4


def test_a_failed_build_leaves_no_cache_folder_behind(corpus_dir, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(data, "_save_ids", crash)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_corpus(text_config(corpus_dir, cache))
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert len(prepare_corpus(text_config(corpus_dir, cache)).train) > 0


def test_a_cache_published_meanwhile_by_another_process_is_kept(corpus_dir, tmp_path) -> None:
    cfg = text_config(corpus_dir, tmp_path / "cache")
    corpus = prepare_corpus(cfg)
    files = sources.source_files(cfg)
    data._build_cache(cfg, files, data._key_inputs(cfg, files), corpus.cache_path)  # loses race
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [corpus.cache_path.name]
    assert np.array_equal(prepare_corpus(cfg).train, corpus.train)


@pytest.mark.parametrize(
    ("damaged", "tokenizer"),
    [
        ("meta.json", "byte"),
        ("tokenizer.json", "byte"),
        ("train.bin", "byte"),
        ("val.bin", "byte"),
        ("meta.json:tokens", "byte"),  # valid JSON that no longer matches the files
        ("tokenizer.json:json", "bpe"),  # valid JSON around a broken BPE model
        ("train.bin:ids", "byte"),  # the right size, but ids no tokenizer of 256 has
    ],
)
def test_a_damaged_cache_is_set_aside_and_rebuilt(
    corpus_dir, tmp_path, caplog, damaged: str, tokenizer: str
) -> None:
    cfg = text_config(corpus_dir, tmp_path / "cache", tokenizer=tokenizer, vocab_size=300)
    good = prepare_corpus(cfg)
    train, val = np.array(good.train), np.array(good.val)  # copies: the memmaps see the damage
    name, _, key = damaged.partition(":")
    target = good.cache_path / name
    if key == "ids":
        target.write_bytes(b"\xff" * target.stat().st_size)
    elif key:
        content = json.loads(target.read_text())
        content[key] = {"train": 3, "val": 1} if key == "tokens" else '{"model": 1'
        target.write_text(json.dumps(content))
    else:
        target.write_bytes(target.read_bytes()[:7])
    damaged_bytes = target.read_bytes()
    rebuilt = prepare_corpus(cfg)
    assert np.array_equal(rebuilt.train, train) and np.array_equal(rebuilt.val, val)
    assert rebuilt.tokenizer.encode("def f(x):") == good.tokenizer.encode("def f(x):")
    (aside,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".damaged-")]
    assert (aside / name).read_bytes() == damaged_bytes  # kept as it was found, for a look
    assert f"{good.cache_path} is damaged" in caplog.text


def texts(split: Dataset) -> list[str]:
    return list(split["text"])


def test_split_is_deterministic_seeded_and_cuts_one_document() -> None:
    docs = Dataset.from_dict({"text": [f"doc {i:02d}" for i in range(40)]})  # 6 bytes each
    train, val = split_documents(docs, val_fraction=0.1, seed=3)
    again_train, again_val = split_documents(docs, val_fraction=0.1, seed=3)
    assert (texts(train), texts(val)) == (texts(again_train), texts(again_val))
    assert texts(split_documents(docs, 0.1, seed=4)[1]) != texts(val)
    # 24 of 240 bytes: 4 whole documents, or 3 and the tail of a fourth whose head stays behind
    assert sum(len(t) for t in texts(val)) == 24
    whole_train, whole_val = (
        set(texts(train)) & set(texts(docs)),
        set(texts(val)) & set(texts(docs)),
    )
    assert not whole_train & whole_val
    pieces = [t for t in texts(train) + texts(val) if t not in whole_train | whole_val]
    assert sorted([*whole_train, *whole_val, *(["".join(pieces)] if pieces else [])]) == sorted(
        texts(docs)
    )


def test_two_one_byte_documents_give_validation_one() -> None:
    train, val = split_documents(Dataset.from_dict({"text": ["a", "b"]}), 0.05, seed=0)
    assert (len(train), len(val)) == (1, 1)


def test_empty_documents_go_to_neither_split() -> None:
    docs = Dataset.from_dict({"text": ["", "the first document", None, "the second one", ""]})
    train, val = split_documents(docs, val_fraction=0.3, seed=0)
    assert not {"", None} & set(texts(train) + texts(val))
    assert sum(len(t) for t in texts(train) + texts(val)) == len("the first documentthe second one")


def test_a_single_document_is_cut_in_two(tmp_path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "only.txt").write_text(text)
    cfg = DataConfig(source="text", paths=[str(tmp_path / "only.txt")], cache_dir=str(tmp_path))
    corpus = prepare_corpus(cfg)
    train, val = (corpus.tokenizer.decode(getattr(corpus, s).tolist()) for s in ("train", "val"))
    sep = data.DOC_SEPARATOR
    assert train.endswith(sep) and val.endswith(sep)
    assert train.removesuffix(sep) + val.removesuffix(sep) == text  # head in train, tail in val
    assert_val_share(corpus, cfg.val_fraction)


def write_files(folder: Path, sizes: list[int]) -> Path:
    """One file per size in a new folder, each of distinct lines (and distinct first bytes)."""
    folder.mkdir()
    for i, size in enumerate(sizes):
        line = f"{i:03x} " + "abcdefghijklmnopqrstuvwxyz" * 3 + "\n"
        (folder / f"f{i:04d}.txt").write_text((line * (size // len(line) + 1))[:size])
    return folder


def test_a_tiny_and_a_large_file_split_by_tokens_not_by_count(tmp_path) -> None:
    """Issue 10: an 80-byte and a 6 KB file used to put 98.7% of the tokens into val."""
    files = write_files(tmp_path / "corpus", [80, 6000])
    corpus = prepare_corpus(text_config(files, tmp_path / "cache"))
    assert_val_share(corpus, 0.05)
    assert_holds_exactly(corpus, [p.read_text() for p in sorted(files.iterdir())])


SIZE_MIXES = {
    "one document": [5000],
    "two documents": [300, 200],
    "many tiny and one huge": [3] * 200 + [50_000],
    "one tiny and many large": [1] + [2000] * 20,
    "all equal": [300] * 30,
}


@pytest.mark.parametrize("sizes", SIZE_MIXES.values(), ids=SIZE_MIXES)
@pytest.mark.parametrize("val_fraction", [0.01, 0.05, 0.3, 0.49])
def test_val_holds_val_fraction_of_tokens_whatever_the_document_sizes(
    tmp_path, sizes: list[int], val_fraction: float
) -> None:
    files = write_files(tmp_path / "corpus", sizes)
    corpus = prepare_corpus(text_config(files, tmp_path / "cache", val_fraction=val_fraction))
    assert_val_share(corpus, val_fraction)
    assert_holds_exactly(corpus, [p.read_text() for p in sorted(files.iterdir())])


def test_bpe_split_holds_about_val_fraction_of_tokens(tmp_path) -> None:
    """Bytes stand in for BPE tokens, so the share is close, not exact (40 stdlib files give
    5.2-5.8% for 5%; the whole stdlib 4.83%)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, f in enumerate(stdlib_files()[:40]):
        shutil.copy(f, folder / f"{i:02d}.txt")
    cfg = text_config(folder, tmp_path / "cache", tokenizer="bpe", vocab_size=1000)
    corpus = prepare_corpus(cfg)
    share = len(corpus.val) / (len(corpus.train) + len(corpus.val))
    assert abs(share - 0.05) < 0.25 * 0.05


def test_bpe_is_trained_on_the_training_split_only(corpus_dir, tmp_path, monkeypatch) -> None:
    seen: list[str] = []
    real_build = data.build_tokenizer

    def spy(kind, texts, vocab_size):
        seen.extend(t for batch in texts for t in batch)
        return real_build(kind, seen, vocab_size)

    monkeypatch.setattr(data, "build_tokenizer", spy)
    corpus = prepare_corpus(text_config(corpus_dir, tmp_path / "cache", tokenizer="bpe"))
    assert sorted(seen) == sorted(documents(corpus, "train"))
    assert not set(seen) & set(documents(corpus, "val"))
    eots = int((corpus.train == corpus.tokenizer.eot_id).sum() + (corpus.val == 0).sum())
    assert eots == 13  # one end-of-text after each document, and after both halves of the cut one


def test_relative_paths_and_home_are_expanded(corpus_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    relative = prepare_corpus(text_config(Path("corpus"), Path("~/cache")))
    assert relative.cache_path.parent == tmp_path / "cache"
    home = prepare_corpus(DataConfig(source="text", paths=["~/corpus/*.txt"], cache_dir="~/cache"))
    assert home.cache_path == relative.cache_path


def test_a_file_whose_name_looks_like_a_glob_is_read_as_named(tmp_path) -> None:
    (tmp_path / "notes[1].txt").write_text("the bracketed one\n")
    (tmp_path / "notes1.txt").write_text("what the glob class [1] would match\n")
    (tmp_path / "a=b.txt").write_text("an equals sign\n")
    cfg = DataConfig(
        source="text",
        paths=[str(tmp_path / "notes[1].txt"), str(tmp_path / "a=b.txt")],
        cache_dir=str(tmp_path / "cache"),
    )
    assert sources.source_files(cfg) == [tmp_path / "notes[1].txt", tmp_path / "a=b.txt"]
    assert_holds_exactly(prepare_corpus(cfg), ["the bracketed one\n", "an equals sign\n"])
    globbed = DataConfig(source="text", paths=[str(tmp_path / "notes[0-9].txt")])
    assert sources.source_files(globbed) == [tmp_path / "notes1.txt"]  # still a glob otherwise


def test_a_folder_whose_name_looks_like_a_glob_is_searched_as_named(tmp_path) -> None:
    folder = tmp_path / "my [c],x=1 d"
    folder.mkdir()
    (folder / "a.txt").write_text("in the bracketed folder\n")
    cfg = DataConfig(source="text", paths=[f"{folder}/*.txt"], cache_dir=str(tmp_path / "c"))
    assert sources.source_files(cfg) == [folder / "a.txt"]


def test_a_path_that_matches_nothing_is_a_config_error_naming_it(tmp_path) -> None:
    cfg = DataConfig(source="text", paths=["missing/*.txt"], cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.paths entry 'missing/\*.txt' matches no file"):
        prepare_corpus(cfg)


def test_an_empty_corpus_is_a_config_error(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ConfigError, match="data.paths=.* holds no text"):
        prepare_corpus(text_config(tmp_path, tmp_path / "cache"))


def test_a_corpus_shorter_than_one_window_is_a_config_error(corpus_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"split has \d+ tokens .* model.block_size=4096"):
        prepare_corpus(text_config(corpus_dir, tmp_path / "cache"), min_tokens=4097)


def test_a_too_short_val_split_blames_val_fraction(tmp_path) -> None:
    files = write_files(tmp_path / "corpus", [1000, 1000])  # 2006 tokens, val about 100
    with pytest.raises(ConfigError) as err:
        prepare_corpus(text_config(files, tmp_path / "cache"), min_tokens=129)
    assert re.fullmatch(
        r"the val split has 10\d tokens \(data.val_fraction=0.05 of 2006 tokens in all\) but "
        r"model.block_size=128 needs at least 129; raise data.val_fraction, use a smaller "
        r"model.block_size or more data",
        str(err.value),
    )


def test_stdlib_corpus_holds_the_standard_library_without_tests(tmp_path) -> None:
    files = stdlib_files()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    parts = {part for f in files for part in f.parts}
    assert not {"idlelib", "site-packages", "__pycache__", "test", "tests"} & parts
    corpus = prepare_corpus(DataConfig(source="stdlib", cache_dir=str(tmp_path)), min_tokens=257)
    non_empty = sum(1 for f in files if f.stat().st_size > 0)  # empty __init__.py files drop out
    assert corpus.meta["docs"]["train"] + corpus.meta["docs"]["val"] == non_empty + 1  # one cut
    assert len(corpus.train) > 1_000_000 and "import" in corpus.tokenizer.decode(corpus.val[:5000])
    assert_val_share(corpus, 0.05)


# ---- files that are not UTF-8 ----------------------------------------------------------------

LATIN1 = "café, naïve\n".encode("latin-1")  # 2 bytes that are not UTF-8
BINARY = bytes(range(256)) * 4  # NUL bytes, and 128 * 4 bytes that are not UTF-8
UTF8 = "ünïcödé 😀 text\n".encode()


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, content in [("a_latin1.txt", LATIN1), ("b_blob.bin", BINARY), ("c_utf8.txt", UTF8)]:
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_files_that_are_not_utf8_are_reported_once(mixed_dir, tmp_path, caplog, tokenizer):
    cfg = text_config(mixed_dir, tmp_path / "cache", tokenizer=tokenizer, vocab_size=300)
    cfg.paths = [f"{mixed_dir}/*"]
    with caplog.at_level(logging.WARNING, logger="minigpt.documents"):
        corpus = prepare_corpus(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    fate = {
        "byte": "kept as they are (data.tokenizer=byte)",
        "bpe": "replaced by U+FFFD (data.tokenizer=byte would keep them)",
    }[tokenizer]
    assert warning == (
        "2 of 3 source files are not valid UTF-8 (1 binary: NUL bytes); their 514 invalid bytes "
        f"are {fate}: {mixed_dir / 'a_latin1.txt'}, {mixed_dir / 'b_blob.bin'}"
    )
    assert corpus.meta["non_utf8"] == {
        "files": 2,
        "binary": 1,
        "invalid_bytes": 514,
        "kept_as_bytes": tokenizer == "byte",
        "examples": [str(mixed_dir / "a_latin1.txt"), str(mixed_dir / "b_blob.bin")],
    }
    ids = corpus.train.tolist() + corpus.val.tolist()
    if tokenizer == "byte":
        assert {0x00, 0xE9, 0xFF} <= set(ids)  # NUL, latin-1 "é", 0xFF: the files' own bytes
    else:
        assert corpus.tokenizer.decode(ids).count("\ufffd") >= 2 + 128 * 4


@pytest.mark.parametrize("content", [LATIN1, BINARY, UTF8], ids=["latin1", "binary", "utf8"])
def test_the_byte_tokenizer_sees_the_files_own_bytes(tmp_path, content: bytes) -> None:
    (tmp_path / "only.txt").write_bytes(content)
    cfg = DataConfig(source="text", paths=[str(tmp_path / "only.txt")], cache_dir=str(tmp_path))
    corpus = prepare_corpus(cfg)
    sep = len(data.DOC_SEPARATOR)
    assert bytes(corpus.train[:-sep].tolist()) + bytes(corpus.val[:-sep].tolist()) == content
    assert ("non_utf8" in corpus.meta) == (content != UTF8)


# ---- cache folder ---------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_build_names_its_temp_folder_after_host_and_pid(corpus_dir, tmp_path, monkeypatch):
    seen: list[str] = []

    def killed(ids, path, dtype):
        seen.append(path.parent.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_save_ids", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(text_config(corpus_dir, tmp_path / "cache"))
    match = data.TEMP_NAME.fullmatch(seen[0])
    assert match and match["host"] == data._host() and int(match["pid"]) == os.getpid()


def test_temp_folders_of_killed_builds_are_removed_and_live_ones_kept(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    host, key = data._host(), "0123456789abcdef"
    day_ago = time.time() - 25 * 3600
    folders = {
        "dead": f".tmp-{key}-{host}-{dead_pid()}-aaaaaaaa",
        "live": f".tmp-{key}-{host}-{os.getpid()}-bbbbbbbb",
        "live, old": f".tmp-{key}-{host}-{os.getppid()}-cccccccc",
        "other host": f".tmp-{key}-elsewhere-1-dddddddd",
        "other host, old": f".tmp-{key}-elsewhere-2-eeeeeeee",
        "old format, old": f".tmp-{key}-12345-ffffffff",
    }
    for label, name in folders.items():
        (cache / name / "hf").mkdir(parents=True)
        (cache / name / "hf" / "train.arrow").write_bytes(b"partial")
        if label.endswith("old"):
            for p in (cache / name, cache / name / "hf", cache / name / "hf" / "train.arrow"):
                os.utime(p, (day_ago, day_ago))
    prepare_corpus(text_config(corpus_dir, cache))
    left = {label for label, name in folders.items() if (cache / name).exists()}
    assert left == {"live", "live, old", "other host"}


def test_a_temp_folder_removed_meanwhile_is_no_error(tmp_path, monkeypatch) -> None:
    stale = tmp_path / f".tmp-0123456789abcdef-{data._host()}-{dead_pid()}-aaaaaaaa"
    stale.mkdir()

    def removed_by_another_process(folder: Path) -> bool:
        shutil.rmtree(folder)
        return True

    monkeypatch.setattr(data, "_is_stale", removed_by_another_process)
    data.remove_stale_temp_folders(tmp_path)
    assert not stale.exists()


@pytest.mark.parametrize("where", ["under a file", "a file", "under /proc"])
def test_an_unusable_cache_dir_is_one_config_error_naming_it(corpus_dir, tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    cache_dir = {
        "under a file": tmp_path / "file" / "cache",
        "a file": tmp_path / "file",
        "under /proc": Path("/proc/minigpt-cache"),
    }[where]
    with pytest.raises(ConfigError) as err:
        prepare_corpus(text_config(corpus_dir, cache_dir))
    message = str(err.value)
    assert message.startswith(f"data.cache_dir={cache_dir} cannot hold the token cache: ")
    reason = "No such file or directory" if where == "under /proc" else "Not a directory"
    assert f"{cache_dir}: {reason}; " in message
    assert "data.cache_dir (or the MINIGPT_CACHE_DIR environment variable)" in message


def test_a_full_disk_is_a_config_error_and_leaves_nothing(corpus_dir, tmp_path, monkeypatch):
    def full(ids, path, dtype):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(data, "_save_ids", full)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=f"data.cache_dir={cache} .*: No space left on device; "):
        prepare_corpus(text_config(corpus_dir, cache))
    assert list(cache.iterdir()) == []


def test_an_unreadable_source_file_is_not_blamed_on_the_cache_dir(
    corpus_dir, tmp_path, monkeypatch
):
    def unreadable(files, latin1):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(files[0]))

    monkeypatch.setattr(sources, "_read_files", unreadable)
    with pytest.raises(PermissionError):
        prepare_corpus(text_config(corpus_dir, tmp_path / "cache"))


def test_an_empty_minigpt_cache_dir_counts_as_unset(monkeypatch) -> None:
    from hydra import compose, initialize_config_dir

    from minigpt.config import register_configs, to_object

    register_configs()
    conf = str(Path(__file__).resolve().parents[2] / "conf")

    paths = {"stdlib": [], "text": ["data.paths=[x]"]}  # only data=text reads data.paths

    def cache_dir(data_group: str) -> str:
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose(
                config_name="config", overrides=[f"data={data_group}", *paths[data_group]]
            )
        return to_object(cfg).data.cache_dir

    monkeypatch.setenv("MINIGPT_CACHE_DIR", "")
    assert cache_dir("stdlib") == cache_dir("text") == "~/.cache/minigpt"
    monkeypatch.setenv("MINIGPT_CACHE_DIR", "/data/cache")
    assert cache_dir("stdlib") == "/data/cache"
    monkeypatch.delenv("MINIGPT_CACHE_DIR")
    assert cache_dir("stdlib") == "~/.cache/minigpt"


# ---- Hugging Face Hub -----------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache, so nothing the machine has cached can answer."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_hub_without_network_is_a_config_error(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "can_reach", lambda url, timeout=3.0: False)
    cfg = DataConfig(source="hub", name="roneneldan/TinyStories", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.name=roneneldan/TinyStories is not in the local"):
        prepare_corpus(cfg)


def test_hub_is_a_config_error_on_this_machine_with_the_real_probe(hf_cache, tmp_path) -> None:
    """No network: offline error; network: the made-up dataset is not found. Either way a
    ConfigError (how long it takes: benchmarks/fail_fast.py)."""
    cfg = DataConfig(source="hub", name="minigpt-tests/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.name=minigpt-tests/no-such-dataset"):
        prepare_corpus(cfg)


def test_hub_dataset_in_the_local_cache_loads_offline(hf_cache, tmp_path, monkeypatch) -> None:
    _fake_hub_cache(hf_cache, "someone/stories", tmp_path)
    monkeypatch.setattr(sources, "can_reach", lambda url, timeout=3.0: False)
    cfg = DataConfig(
        source="hub", name="someone/stories", text_column="story", cache_dir=str(tmp_path / "c")
    )
    corpus = prepare_corpus(cfg)
    assert_holds_exactly(corpus, [f"story number {i}" for i in range(6)])
    with pytest.raises(ConfigError, match="data.text_column='text' is not a column"):
        prepare_corpus(DataConfig(source="hub", name="someone/stories", cache_dir=str(tmp_path)))


def _fake_hub_cache(cache: Path, name: str, tmp_path: Path) -> None:
    """Lay out a dataset the way ``datasets`` caches a Hub download (``<ns>___<name>/default``)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"story": f"story number {i}"}) + "\n" for i in range(6)))
    datasets.load_dataset("json", data_files=str(rows), split="train", cache_dir=str(cache))
    built = Path(glob.glob(str(cache / "json" / "*"))[0])
    target = cache / name.replace("/", "___") / "default"
    shutil.copytree(built, target)
    for arrow in target.glob("*/*/json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", name.split("/")[1] + "-")))


# ---- batches --------------------------------------------------------------------------------


@pytest.fixture
def ramp() -> np.ndarray:
    """Token i is i, so a window's first token is its offset."""
    return np.arange(5000, dtype=np.uint16)


def test_same_seed_gives_the_same_batches(ramp) -> None:
    a, b = BatchSampler(ramp, 16, 8, seed=1), BatchSampler(ramp, 16, 8, seed=1)
    for step in range(3):
        assert all(
            torch.equal(u, v)
            for u, v in zip(a.batch(step, 0, 1, 0, 1), b.batch(step, 0, 1, 0, 1), strict=True)
        )
    assert not torch.equal(
        a.batch(0, 0, 1, 0, 1)[0], BatchSampler(ramp, 16, 8, 2).batch(0, 0, 1, 0, 1)[0]
    )
    assert not torch.equal(a.batch(0, 0, 1, 0, 1)[0], a.batch(1, 0, 1, 0, 1)[0])


def test_targets_are_inputs_shifted_by_one(ramp) -> None:
    x, y = BatchSampler(ramp, 16, 8, seed=0).batch(0, 0, 1, 0, 1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows of the corpus


@pytest.mark.parametrize("step", [0, 1, 17])
def test_global_batch_is_the_same_however_it_is_split(ramp, step: int) -> None:
    sampler = BatchSampler(ramp, 16, global_batch=8, seed=5)

    def windows(world: int, accum: int) -> list[int]:
        return [
            int(start)
            for rank in range(world)
            for micro in range(accum)
            for start in sampler.batch(step, rank, world, micro, accum)[0][:, 0]
        ]

    expected = sampler.global_offsets(step).tolist()
    assert windows(world=2, accum=1) == windows(world=1, accum=1) == windows(1, 2) == expected


def test_sampler_state_resumes_the_same_stream(ramp) -> None:
    original = BatchSampler(ramp, 16, 8, seed=11)
    state = original.state_dict()
    assert all(type(v) is int for v in state.values())
    resumed = BatchSampler(ramp, 16, 8, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.batch(42, 0, 1, 0, 1)[0], original.batch(42, 0, 1, 0, 1)[0])
    with pytest.raises(ConfigError, match="global batch 8"):
        BatchSampler(ramp, 16, 16, seed=0).load_state_dict(state)


def test_uneven_batch_split_and_too_short_data_are_rejected(ramp) -> None:
    with pytest.raises(ValueError, match="does not split"):
        BatchSampler(ramp, 16, 6, seed=0).batch(0, 0, 4, 0, 1)
    with pytest.raises(ConfigError, match="model.block_size=5000"):
        BatchSampler(ramp, 5000, 8, seed=0)


def test_a_resume_with_another_batch_shape_says_what_to_keep(ramp) -> None:
    state = BatchSampler(ramp, 16, 8, seed=11).state_dict()
    with pytest.raises(ConfigError) as err:
        BatchSampler(ramp, 32, 16, seed=0).load_state_dict(state)
    assert str(err.value) == (
        "the checkpoint was trained with global batch 8 and model.block_size=16, this run has 16 "
        "and 32; keep train.batch_size x ranks x train.grad_accum and model.block_size when "
        "resuming, or start a new run in its own hydra.run.dir"
    )


@pytest.mark.parametrize(
    ("split", "fix"),
    [
        ("train", "use a smaller model.block_size or more data"),
        ("val", "raise data.val_fraction, use a smaller model.block_size or more data"),
    ],
)
def test_a_split_one_token_short_of_a_window_is_a_config_error_naming_the_fix(
    split: str, fix: str
) -> None:
    short = np.arange(16, dtype=np.uint16)
    with pytest.raises(ConfigError) as err:
        if split == "train":
            BatchSampler(short, 16, 4, seed=0)
        else:
            eval_batches(short, 16, batch_size=4, n_batches=1)
    assert str(err.value) == (
        f"the {split} split has 16 tokens but model.block_size=16 needs at least 17; {fix}"
    )


def test_a_split_of_exactly_one_window_always_draws_that_window() -> None:
    """block_size + 1 tokens are enough: one window, starting at offset 0, for train and val."""
    one = np.arange(17, dtype=np.uint16)
    window = torch.arange(16).expand(4, 16)
    for x, y in (
        BatchSampler(one, 16, 4, seed=0).batch(0, 0, 1, 0, 1),
        eval_batches(one, 16, batch_size=4, n_batches=1)[0],
    ):
        assert torch.equal(x, window) and torch.equal(y, window + 1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_seeds_are_taken_modulo_2_to_the_64(ramp, split: str) -> None:
    """numpy seeds only from non-negative ints: -1 draws as 2**64 - 1; seeds 1 and 3 differ."""

    def starts(seed: int) -> list[int]:
        if split == "train":
            return BatchSampler(ramp, 16, 8, seed).global_offsets(3).tolist()
        return eval_batches(ramp, 16, 8, 4, seed)[3][0][:, 0].tolist()

    assert starts(-1) == starts(2**64 - 1)
    assert starts(1) != starts(3)


def test_eval_batches_default_to_seed_0(ramp) -> None:
    """The trainer passes no seed: every run's val batches are seed 0's, so losses compare."""
    default, seed_0 = eval_batches(ramp, 16, 4, 2), EvalBatches(ramp, 16, 4, 2, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(default, seed_0, strict=True))
    assert not torch.equal(default[0][0], EvalBatches(ramp, 16, 4, 2, seed=1)[0][0])


@pytest.mark.parametrize(("i", "shown"), [(3, 3), (-4, -1)])
def test_an_eval_batch_out_of_range_is_an_index_error_naming_it(ramp, i: int, shown: int) -> None:
    with pytest.raises(IndexError, match=rf"^batch {shown} of 3$"):
        eval_batches(ramp, 16, batch_size=4, n_batches=3)[i]


def test_eval_batches_are_built_on_demand_whatever_their_number(ramp) -> None:
    tracemalloc.start()
    batches = eval_batches(ramp, 16, batch_size=64, n_batches=10**6)
    last = batches[10**6 - 1]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000  # all of them: 1 GB of int64
    assert len(batches) == 10**6 and last[0].shape == (64, 16)
    assert torch.equal(batches[-1][0], last[0]) and torch.equal(last[1], last[0] + 1)
    with pytest.raises(IndexError):
        batches[10**6]


def test_eval_batches_are_the_same_every_time(ramp) -> None:
    first = eval_batches(ramp, 16, batch_size=4, n_batches=3)
    again = eval_batches(ramp, 16, batch_size=4, n_batches=3)
    assert len(first) == 3 and first[0][0].shape == (4, 16)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
