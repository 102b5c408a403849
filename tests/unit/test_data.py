"""Corpus preparation (sources, split, token cache) and the batch sampler."""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset

from minigpt import data
from minigpt.config import ConfigError, DataConfig
from minigpt.data import BatchSampler, eval_batches, prepare_corpus, split_documents, stdlib_files
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
    """Both splits together are ``docs``, each followed by the byte tokenizer's separator."""
    text = corpus.tokenizer.decode(corpus.train.tolist() + corpus.val.tolist())
    assert len(text) == sum(len(d) + len(data.DOC_SEPARATOR) for d in docs)
    assert all(d + data.DOC_SEPARATOR in text for d in docs)


# ---- corpus and cache -----------------------------------------------------------------------

CACHE_FILES = {"train.bin", "val.bin", "tokenizer.json", "meta.json", "key_inputs.json"}


def test_text_corpus_is_tokenized_into_a_memmap_cache(corpus_dir, tmp_path) -> None:
    corpus = prepare_corpus(text_config(corpus_dir, tmp_path / "cache"))
    assert corpus.cache_path.parent == tmp_path / "cache"
    assert {p.name for p in corpus.cache_path.iterdir()} == CACHE_FILES
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert corpus.meta["docs"] == {"train": 11, "val": 1}
    assert corpus.meta["tokens"] == {"train": len(corpus.train), "val": len(corpus.val)}
    assert_holds_exactly(corpus, [p.read_text() for p in corpus_dir.iterdir()])


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
    files = data._source_files(cfg)
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
    if key:
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


def test_split_is_by_document_deterministic_and_disjoint() -> None:
    docs = Dataset.from_dict({"text": [f"doc {i}" for i in range(40)]})

    def texts(split: Dataset) -> list[str]:
        return list(split["text"])

    train, val = split_documents(docs, val_fraction=0.1, seed=3)
    again_train, again_val = split_documents(docs, val_fraction=0.1, seed=3)
    assert (texts(train), texts(val)) == (texts(again_train), texts(again_val))
    assert len(val) == 4 and not set(texts(train)) & set(texts(val))
    assert sorted(texts(train) + texts(val)) == sorted(texts(docs))
    assert texts(split_documents(docs, 0.1, seed=4)[1]) != texts(val)


def test_two_documents_still_give_validation_one() -> None:
    train, val = split_documents(Dataset.from_dict({"text": ["a", "b"]}), 0.05, seed=0)
    assert (len(train), len(val)) == (1, 1)


def test_a_single_document_is_split_by_characters(tmp_path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "only.txt").write_text(text)
    cfg = DataConfig(source="text", paths=[str(tmp_path / "only.txt")], cache_dir=str(tmp_path))
    corpus = prepare_corpus(cfg)
    cut = len(text) - round(len(text) * cfg.val_fraction)
    assert corpus.tokenizer.decode(corpus.train.tolist()) == text[:cut] + data.DOC_SEPARATOR
    assert corpus.tokenizer.decode(corpus.val.tolist()) == text[cut:] + data.DOC_SEPARATOR


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
    assert eots == 12  # one end-of-text after each document


def test_relative_paths_and_home_are_expanded(corpus_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    relative = prepare_corpus(text_config(Path("corpus"), Path("~/cache")))
    assert relative.cache_path.parent == tmp_path / "cache"
    home = prepare_corpus(DataConfig(source="text", paths=["~/corpus/*.txt"], cache_dir="~/cache"))
    assert home.cache_path == relative.cache_path


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


def test_stdlib_corpus_holds_the_standard_library_without_tests(tmp_path) -> None:
    files = stdlib_files()
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    parts = {part for f in files for part in f.parts}
    assert not {"idlelib", "site-packages", "__pycache__", "test", "tests"} & parts
    start = time.monotonic()
    corpus = prepare_corpus(DataConfig(source="stdlib", cache_dir=str(tmp_path)), min_tokens=257)
    assert time.monotonic() - start < 20
    non_empty = sum(1 for f in files if f.stat().st_size > 0)  # empty __init__.py files drop out
    assert corpus.meta["docs"]["train"] + corpus.meta["docs"]["val"] == non_empty
    assert len(corpus.train) > 1_000_000 and "import" in corpus.tokenizer.decode(corpus.val[:5000])


# ---- Hugging Face Hub -----------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache, so nothing the machine has cached can answer."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_hub_without_network_fails_fast_with_a_config_error(hf_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "can_reach", lambda url, timeout=3.0: False)
    cfg = DataConfig(source="hub", name="roneneldan/TinyStories", cache_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="data.name=roneneldan/TinyStories is not in the local"):
        prepare_corpus(cfg)
    assert time.monotonic() - start < 10


def test_hub_fails_fast_on_this_machine_with_the_real_probe(hf_cache, tmp_path) -> None:
    """No network: offline error; network: the made-up dataset is not found. Either way, fast."""
    cfg = DataConfig(source="hub", name="minigpt-tests/no-such-dataset", cache_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="data.name=minigpt-tests/no-such-dataset"):
        prepare_corpus(cfg)
    assert time.monotonic() - start < 10


def test_hub_dataset_in_the_local_cache_loads_offline(hf_cache, tmp_path, monkeypatch) -> None:
    _fake_hub_cache(hf_cache, "someone/stories", tmp_path)
    monkeypatch.setattr(data, "can_reach", lambda url, timeout=3.0: False)
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


def test_eval_batches_are_the_same_every_time(ramp) -> None:
    first = eval_batches(ramp, 16, batch_size=4, n_batches=3)
    again = eval_batches(ramp, 16, batch_size=4, n_batches=3)
    assert len(first) == 3 and first[0][0].shape == (4, 16)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
