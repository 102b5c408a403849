"""The train/val split of documents, tested directly on small in-memory datasets (test_data.py
tests it through prepare_corpus): where the boundary falls, how the cut document is divided,
and how documents are measured."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, Features, Value

from minigpt.documents import _val_boundary, _with_row, document_sizes, split_documents


@pytest.mark.parametrize(
    ("sizes", "fraction", "separator", "expected"),
    [
        ([10, 10, 10, 10], 0.25, 0, (0, 10)),  # exactly the first document, whole
        ([10, 10, 10, 10], 0.3, 0, (1, 2)),  # one whole, 2 units of the second
        ([10, 10, 10, 10], 0.5, 0, (1, 10)),  # two whole: the second ends exactly at 20
        ([9, 9, 9, 9], 0.3, 1, (1, 1)),  # target 0.3 * 41 = 12.3: 10 + a separator + 1
        ([9, 9, 9, 9], 0.5, 1, (2, 0)),  # 20.5: two documents and their separators
        ([5, 5], 0.01, 0, (0, 1)),  # val is never empty
        ([5, 5], 0.99, 0, (1, 4)),  # nor is train: the last document keeps a unit
        ([5, 5], 0.99, 1, (1, 4)),  # the target lies past the last end
        ([3, 1, 4], 0.5, 0, (1, 1)),  # uneven sizes: 4 of 8 = 3 + 1
    ],
)
def test_the_boundary_gives_val_its_fraction_of_units(sizes, fraction, separator, expected):
    assert _val_boundary(np.array(sizes), fraction, separator) == expected


def texts(split: Dataset) -> list[str]:
    return list(split["text"])


def test_the_cut_document_ends_both_splits_head_in_train_tail_in_val():
    docs = Dataset.from_dict({"text": ["aaaa", "bbbb", "cccc", "dddd", "eeee"], "id": range(5)})
    train, val = split_documents(docs, 0.3, seed=0)  # 6 of 20 units: one whole and 2 of another
    assert len(train) == 4 and len(val) == 2
    cut = train[-1]["id"]
    assert val[-1]["id"] == cut
    assert (len(train[-1]["text"]), len(val[-1]["text"])) == (2, 2)
    assert train[-1]["text"] + val[-1]["text"] == docs[cut]["text"]
    assert sorted(set(train["id"][:-1]) | set(val["id"][:-1]) | {cut}) == list(range(5))
    assert train["id"][:-1] == sorted(train["id"][:-1])  # the whole ones keep corpus order


def test_a_cut_inside_a_character_rounds_the_head_down_to_whole_characters():
    docs = Dataset.from_dict({"text": ["ééééé"]})  # 10 UTF-8 bytes
    train, val = split_documents(docs, 0.3, seed=0)  # 3 bytes for val: 7 left, 3.5 characters
    assert (texts(train), texts(val)) == (["ééé"], ["éé"])


def test_latin1_documents_are_measured_and_cut_in_characters():
    docs = Dataset.from_dict({"text": ["ééééé"]})  # 5 characters, one byte each in the file
    train, val = split_documents(docs, 0.2, seed=0, latin1=True)
    assert (texts(train), texts(val)) == (["éééé"], ["é"])


def test_separators_count_towards_the_share():
    docs = Dataset.from_dict({"text": ["a" * 9] * 4})
    train, val = split_documents(docs, 0.3, seed=0, separator=1)  # (1, 1): see the table above
    assert sorted(len(t) for t in texts(val)) == [1, 9]
    assert sorted(len(t) for t in texts(train)) == [8, 9, 9]


def test_given_sizes_are_used_instead_of_measuring():
    docs = Dataset.from_dict({"text": ["abcd", "efgh"]})
    _, val = split_documents(docs, 0.5, seed=0, sizes=np.array([0, 4]))  # the first "empty"
    _, measured = split_documents(docs, 0.5, seed=0)
    assert "abcd" not in "".join(texts(val)) and len("".join(texts(val))) == 2
    assert len(texts(measured)) == 1


@pytest.mark.parametrize(("latin1", "expected"), [(False, [3, 0, 0, 1]), (True, [2, 0, 0, 1])])
def test_documents_are_measured_in_bytes_or_characters_and_none_is_empty(latin1, expected):
    docs = Dataset.from_dict({"text": ["aé", None, "", "z"]})
    sizes = document_sizes(docs, latin1)
    assert sizes.tolist() == expected and sizes.dtype == np.int64


def test_no_documents_measure_as_an_empty_array():
    sizes = document_sizes(Dataset.from_dict({"text": []}), latin1=False)
    assert sizes.shape == (0,) and sizes.dtype == np.int64


def test_a_row_is_appended_last_unless_its_text_is_empty():
    features = Features({"text": Value("string"), "id": Value("int32")})  # not what 3 infers
    docs = Dataset.from_dict({"text": ["x", "y"], "id": [1, 2]}, features=features)
    grown = _with_row(docs, {"text": "z", "id": 3})
    assert (texts(grown), grown["id"]) == (["x", "y", "z"], [1, 2, 3])
    assert grown.features == docs.features
    assert _with_row(docs, {"text": "", "id": 4}) is docs


def test_by_default_documents_are_utf8_bytes_without_separators():
    docs = Dataset.from_dict({"text": ["é" * 7, "a" * 5, "ü" * 3, "b" * 9, "c" * 4]})

    def split(**kwargs) -> tuple[list[str], list[str]]:
        train, val = split_documents(docs, 0.37, seed=0, **kwargs)
        return texts(train), texts(val)

    default = split()
    assert default == split(latin1=False, separator=0)
    assert default != split(latin1=True) and default != split(separator=1)
