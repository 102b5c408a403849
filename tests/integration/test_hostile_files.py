"""Hostile model files: every damaged or crafted checkpoint and export is refused in one line, found
before a model is allocated; and the export command never writes over what it should not.

100 seeded mutations (50 of a safetensors export, 50 of a .pt checkpoint) are loaded by one child
process whose address space is capped, so a file that claims a 48-layer model must fail on the
parameter count and never reach the allocator; a few also go through ``generate.py`` as users
run it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from minigpt import checkpoint, export, weights
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import BPETokenizer
from tests.conftest import ALPHABET_LINE, ROOT, Result, run_command, run_entry

TINY = GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=8, vocab_size=300)
SIZES = ("n_layer", "n_head", "d_model", "block_size", "vocab_size")
CASES = 50  # per format


@dataclass
class Parts:
    """What a model file holds, before it is written as a .pt checkpoint or a safetensors export."""

    model_config: Any
    tokenizer: Any
    tensors: Any  # name -> tensor; a .pt's "model" may be made anything else
    raw: dict[str, Any] = field(default_factory=dict)  # top-level values written as they are
    drop: set[str] = field(default_factory=set)  # top-level keys left out
    cut: float | None = None  # keep only this fraction of the file's bytes
    garbage: bytes | None = None  # the whole file, instead of a model


class Payload:
    """A pickle that would run code if loaded without weights_only."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("payload ran",))


# ---------------------------------------------------------------- mutations
# Each spoils the parts in one seeded way and returns what the error line must say.
Mutation = Callable[[random.Random, Parts, str], str]


def config_not_a_dict(rng: random.Random, p: Parts, fmt: str) -> str:
    p.model_config = rng.choice([[2, 2, 16], "tiny", 3, None, 2.5])
    return "model_config is "


def config_missing_key(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(sorted(p.model_config))
    del p.model_config[key]
    return f"model_config lacks {key}"


def config_unknown_key(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(["name", "n_layers", "rope_theta", "d_ff", ""])
    p.model_config[key] = rng.choice([1, "x", None])
    return f"model_config.{key} is not a model setting"


def config_wrong_type(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(sorted(p.model_config))
    if key in SIZES:
        bad = [str(p.model_config[key]), True, float(p.model_config[key]), None, [4]]
    elif key == "dropout":
        bad = ["0.0", False, None, [0.0]]
    else:  # bias, grad_checkpointing
        bad = [1, 0, "true", None]
    p.model_config[key] = rng.choice(bad)
    return f"model_config.{key}="


def n_head_not_dividing(rng: random.Random, p: Parts, fmt: str) -> str:
    p.model_config["n_head"] = n_head = rng.choice([3, 5, 6, 7, 9, 10, 12, 15])
    return f"model_config.n_head={n_head} must divide model_config.d_model=16"


def huge_claim(rng: random.Random, p: Parts, fmt: str) -> str:
    n_layer, d_model = rng.choice([48, 96, 10_000]), rng.choice([4096, 8192, 12288])
    p.model_config.update(n_layer=n_layer, d_model=d_model, n_head=rng.choice([32, 64]))
    return "parameters but the file holds"


def huge_random_size(rng: random.Random, p: Parts, fmt: str) -> str:
    p.model_config[rng.choice(SIZES)] = rng.randint(10**6, 10**15)
    return "parameters but the file holds"


def size_not_positive(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(SIZES)
    p.model_config[key] = value = rng.choice([0, -1, -rng.randint(2, 10**9)])
    return f"model_config.{key}={value} must be >= 1"


def dropout_out_of_range(rng: random.Random, p: Parts, fmt: str) -> str:
    p.model_config["dropout"] = rng.choice([1.0, 1.5, -0.1, math.nan, math.inf])
    return "model_config.dropout="


def config_disagrees_with_tensors(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(["n_layer", "d_model", "block_size", "vocab_size"])
    p.model_config[key] += rng.choice([1, 2, 16])
    return f"parameters but the file holds {GPT.param_count_formula(TINY):,}"


def tokenizer_unknown_kind(rng: random.Random, p: Parts, fmt: str) -> str:
    p.tokenizer = {"kind": rng.choice(["sentencepiece", "wordpiece", "", "BYTE", 7, None])}
    return "unknown tokenizer state kind"


def tokenizer_not_a_dict(rng: random.Random, p: Parts, fmt: str) -> str:
    p.tokenizer = rng.choice(["byte", ["bpe"], 5, None])
    return "tokenizer is "


def bpe_json_broken(rng: random.Random, p: Parts, fmt: str) -> str:
    text = p.tokenizer["json"]
    cut = text[: rng.randint(0, len(text) - 1)]
    p.tokenizer["json"] = rng.choice([cut, cut, "{}", "[]", "not json", '{"model": 5}'])
    return "tokenizer: the saved BPE tokenizer does not load"


def bpe_json_not_a_string(rng: random.Random, p: Parts, fmt: str) -> str:
    p.tokenizer["json"] = rng.choice([5, None, {"model": {}}, ["a"]])
    return "tokenizer.json must be the BPE tokenizer's JSON text"


def bpe_json_missing(rng: random.Random, p: Parts, fmt: str) -> str:
    del p.tokenizer["json"]
    return "tokenizer.json must be the BPE tokenizer's JSON text"


def tokenizer_bigger_than_model(rng: random.Random, p: Parts, fmt: str) -> str:
    """A vocabulary cut below the tokenizer's, tensors and all: only the tokenizer check sees it."""
    vocab = BPE_VOCAB - rng.randint(1, 20)
    p.model_config["vocab_size"] = vocab
    for name in ("transformer.wte.weight", weights.TIED):
        if name in p.tensors:
            p.tensors[name] = p.tensors[name][:vocab].clone()
    return f"the tokenizer has {BPE_VOCAB} tokens but model_config.vocab_size={vocab}"


def tensor_missing(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(sorted(p.tensors))
    del p.tensors[name]
    return f"tensor {name} is missing" if name == weights.TIED else "parameters but the file"


def tensor_extra(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(["transformer.h.2.ln_1.weight", "extra", "lm_head.bias", "h.0.scale"])
    p.tensors[name] = torch.zeros(rng.randint(1, 64))
    return "parameters but the file holds"


def tensor_renamed(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(sorted(k for k in p.tensors if k != weights.TIED))
    p.tensors[name + rng.choice([".orig", "_", "x"])] = p.tensors.pop(name)
    return f"tensor {name} is missing"


def tensor_extra_empty(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(["extra", "transformer.h.5.attn.c_attn.weight"])
    p.tensors[name] = torch.zeros(0, rng.randint(1, 8))
    return f"tensor {name} is not part of the model"


def tensor_wrong_shape(rng: random.Random, p: Parts, fmt: str) -> str:
    """Same number of elements, another shape: the count passes, the shape check must not."""
    name = rng.choice(sorted(k for k in p.tensors if k != weights.TIED))
    t = p.tensors[name]
    shapes = [(1, *t.shape), (*t.shape, 1), (t.numel(),) if t.dim() > 1 else (t.numel(), 1)]
    if t.dim() == 2 and t.shape[0] != t.shape[1]:
        shapes.append((t.shape[1], t.shape[0]))
    p.tensors[name] = t.reshape(rng.choice(shapes)).clone()
    if name == "transformer.wte.weight" and weights.TIED in p.tensors:
        p.tensors[weights.TIED] = p.tensors[name]
    return f"tensor {name} has shape"


def tensor_not_floating(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(sorted(k for k in p.tensors if k != weights.TIED))
    dtype = rng.choice([torch.int32, torch.int64, torch.int8, torch.bool])
    p.tensors[name] = p.tensors[name].to(dtype)
    return f"tensor {name} is not floating point"


def file_truncated(rng: random.Random, p: Parts, fmt: str) -> str:
    p.cut = rng.uniform(0.0, 0.95)
    return "truncated or corrupted" if fmt == "pt" else "is not a readable safetensors file"


COMMON: list[Mutation] = [
    huge_claim,
    config_not_a_dict,
    config_missing_key,
    config_unknown_key,
    config_wrong_type,
    n_head_not_dividing,
    huge_random_size,
    size_not_positive,
    dropout_out_of_range,
    config_disagrees_with_tensors,
    tokenizer_unknown_kind,
    tokenizer_not_a_dict,
    bpe_json_broken,
    bpe_json_not_a_string,
    bpe_json_missing,
    tokenizer_bigger_than_model,
    tensor_missing,
    tensor_extra,
    tensor_renamed,
    tensor_extra_empty,
    tensor_wrong_shape,
    tensor_not_floating,
    file_truncated,
]


def st_metadata_not_json(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(["model_config", "tokenizer"])
    good = json.dumps(getattr(p, key))
    p.raw[key] = rng.choice(["", "{", good[:-1], "n_layer=2", "{'kind': 'byte'}", good + "}"])
    return f"metadata {key} is not JSON"


def st_metadata_missing(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(["model_config", "tokenizer"])
    p.drop.add(key)
    return f"metadata lacks {key}"


def st_not_our_format(rng: random.Random, p: Parts, fmt: str) -> str:
    if rng.random() < 0.3:
        p.drop.add("format")
    else:
        p.raw["format"] = rng.choice(["", "minigpt", "pt", "minigpt-safetensors-v2"])
    return "is not a minigpt safetensors export"


def st_head_stored_twice(rng: random.Random, p: Parts, fmt: str) -> str:
    p.tensors[weights.TIED] = p.tensors["transformer.wte.weight"].clone()
    return f"holds {weights.TIED}, which an export stores once"


def st_not_safetensors(rng: random.Random, p: Parts, fmt: str) -> str:
    p.garbage = rng.randbytes(rng.randint(0, 4096))
    return "is not a readable safetensors file"


def st_header_claims_huge_tensor(rng: random.Random, p: Parts, fmt: str) -> str:
    """A header whose shapes promise gigabytes the file does not have."""
    header = {"__metadata__": {"format": weights.SAFETENSORS_FORMAT}}
    header["transformer.wte.weight"] = {
        "dtype": "F32",
        "shape": [rng.randint(10**5, 10**9), 4096],
        "data_offsets": [0, 64],
    }
    blob = json.dumps(header).encode()
    p.garbage = len(blob).to_bytes(8, "little") + blob + bytes(64)
    return "is not a readable safetensors file"


def pt_model_not_a_dict(rng: random.Random, p: Parts, fmt: str) -> str:
    p.tensors = rng.choice([list(p.tensors.values()), torch.zeros(3), None, "weights"])
    return ", not a dict of tensors"


def pt_value_not_a_tensor(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(sorted(p.tensors))
    p.tensors[name] = rng.choice([[1.0, 2.0], 3, "w", None])
    return f"model[{name!r}] is not a tensor"


def pt_key_missing(rng: random.Random, p: Parts, fmt: str) -> str:
    key = rng.choice(["model", "model_config", "tokenizer"])
    p.drop.add(key)
    return f"{key} is None, not a dict"


def pt_tensor_without_data(rng: random.Random, p: Parts, fmt: str) -> str:
    name = rng.choice(sorted(p.tensors))
    p.tensors[name] = rng.choice([p.tensors[name].to("meta"), p.tensors[name].to_sparse()])
    return f"tensor {name} is sparse or holds no data"


def pt_not_ours(rng: random.Random, p: Parts, fmt: str) -> str:
    if rng.random() < 0.5:
        p.raw["format"] = rng.choice(["nanogpt", "", None])
        return "is not a minigpt checkpoint"
    p.raw["version"] = rng.choice([0, 2, "1", None])
    return "has format version"


def pt_not_a_checkpoint(rng: random.Random, p: Parts, fmt: str) -> str:
    p.garbage = rng.randbytes(rng.randint(0, 4096))
    return "truncated or corrupted"


def pt_pickle_payload(rng: random.Random, p: Parts, fmt: str) -> str:
    p.raw[rng.choice(["model_config", "extra"])] = Payload()
    return "was refused"


MUTATIONS = {
    "safetensors": [
        *COMMON,
        st_metadata_not_json,
        st_metadata_missing,
        st_not_our_format,
        st_head_stored_twice,
        st_not_safetensors,
        st_header_claims_huge_tensor,
    ],
    "pt": [
        *COMMON,
        pt_model_not_a_dict,
        pt_value_not_a_tensor,
        pt_key_missing,
        pt_tensor_without_data,
        pt_not_ours,
        pt_not_a_checkpoint,
        pt_pickle_payload,
    ],
}
# Seeded: a failure names a case that replays exactly. The huge claims come first in COMMON, so
# each format meets them more than once.
CASE_IDS = [
    f"{fmt}-{i:02d}-{MUTATIONS[fmt][i % len(MUTATIONS[fmt])].__name__}"
    for fmt in MUTATIONS
    for i in range(CASES)
]


# ---------------------------------------------------------------- the files
def _tokenizer() -> BPETokenizer:
    return BPETokenizer.train([ALPHABET_LINE * 20, "the quick brown fox\n" * 20], vocab_size=300)


BPE_VOCAB = _tokenizer().vocab_size


def _parts(fmt: str) -> Parts:
    torch.manual_seed(0)
    tensors = GPT(TINY).state_dict()
    if fmt == "safetensors":
        tensors.pop(weights.TIED)  # stored once, as the token embedding
    tokenizer = _tokenizer().state()
    return Parts(asdict(TINY), tokenizer, {k: v.clone() for k, v in tensors.items()})


def _write(p: Parts, path: Path, fmt: str) -> None:
    if p.garbage is not None:
        path.write_bytes(p.garbage)
        return
    if fmt == "safetensors":
        metadata = {
            "format": weights.SAFETENSORS_FORMAT,
            "model_config": json.dumps(p.model_config),
            "tokenizer": json.dumps(p.tokenizer),
            **p.raw,
        }
        metadata = {k: v for k, v in metadata.items() if k not in p.drop}
        save_file({k: v.contiguous() for k, v in p.tensors.items()}, path, metadata=metadata)
    else:
        state = {
            "model": p.tensors,
            "model_config": p.model_config,
            "tokenizer": p.tokenizer,
            "train_state": {"step": 40},
            **p.raw,
        }
        checkpoint.save({k: v for k, v in state.items() if k not in p.drop}, path)
    if p.cut is not None:
        path.write_bytes(path.read_bytes()[: int(p.cut * path.stat().st_size)])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every case's file and the words its error line must hold."""
    folder = tmp_path_factory.mktemp("hostile")
    base = {fmt: _parts(fmt) for fmt in MUTATIONS}
    cases = {}
    for case in CASE_IDS:
        fmt, number, name = case.split("-", 2)
        parts = copy.deepcopy(base[fmt])
        mutation = MUTATIONS[fmt][int(number) % len(MUTATIONS[fmt])]
        expected = mutation(random.Random(f"{case}"), parts, fmt)
        suffix = ".safetensors" if fmt == "safetensors" else ".pt"
        path = folder / f"{case}{suffix}"
        _write(parts, path, fmt)
        cases[case] = (path, expected)
    return cases


# One child loads every case with its address space capped at what its imports mapped plus
# 1 GiB: a 48-layer, 4096-wide claim (~38 GB of float32) cannot be allocated, even lazily.
LOADER = textwrap.dedent(
    """
    import json, resource, sys, traceback
    import torch
    from minigpt import weights
    from minigpt.checkpoint import CheckpointError

    def vm_size():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    limit = vm_size() + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    outcomes = {}
    for path in json.loads(sys.argv[1]):
        try:
            weights.load_model(path)
            outcomes[path] = ["loaded", ""]
        except CheckpointError as err:
            outcomes[path] = ["CheckpointError", str(err)]
        except BaseException as err:
            outcomes[path] = [type(err).__name__, traceback.format_exc()]
    try:  # the cap is real: an allocation a huge claim would need fails under it
        torch.empty(2**31, dtype=torch.float32)  # 8 GiB, untouched: no harm without a cap
        bites = False
    except (RuntimeError, MemoryError):
        bites = True
    print(json.dumps({"outcomes": outcomes, "cap_bites": bites}))
    """
)


@pytest.fixture(scope="module")
def outcomes(hostile: dict[str, tuple[Path, str]]) -> dict[str, list[str]]:
    paths = json.dumps([str(path) for path, _ in hostile.values()])
    result = run_command([sys.executable, "-c", LOADER, paths], cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cap_bites"], "the address-space cap did not stop a 38 GB allocation"
    return report["outcomes"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_hostile_file_is_one_checkpoint_error_within_bounded_memory(
    case: str, hostile: dict[str, tuple[Path, str]], outcomes: dict[str, list[str]]
) -> None:
    path, expected = hostile[case]
    kind, message = outcomes[str(path)]
    assert kind == "CheckpointError", message
    assert "\n" not in message and len(message) < 600
    assert str(path) in message  # names the file
    assert expected in message


def _assert_one_error_line(result: Result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


def first_case(fmt: str, mutation: Mutation) -> str:
    return next(c for c in CASE_IDS if c.startswith(f"{fmt}-") and c.endswith(mutation.__name__))


@pytest.mark.parametrize(
    "case",
    [
        first_case("safetensors", huge_claim),
        first_case("pt", bpe_json_broken),
        first_case("safetensors", tensor_wrong_shape),
    ],
)
def test_generate_refuses_a_hostile_file_in_one_line(
    case: str, hostile: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    path, expected = hostile[case]
    result = run_entry("generate.py", f"checkpoint={path}", "max_tokens=1", cwd=tmp_path)
    _assert_one_error_line(result, str(path), expected)
    assert result.stdout == ""


# ---------------------------------------------------------------- the export never clobbers
@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A trained-looking checkpoint in a run's checkpoints folder, BPE tokenizer and all."""
    p = _parts("pt")
    path = tmp_path / "checkpoints" / "step_0000040.pt"
    _write(p, path, "pt")
    return path


def _export(*args: str | Path) -> Result:
    """``python -m minigpt.export ...`` as a user runs it."""
    argv = [sys.executable, "-m", "minigpt.export", *map(str, args)]
    return run_command(argv, cwd=ROOT, timeout=120)


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = export.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_export_never_writes_over_its_input_even_with_force(ckpt: Path) -> None:
    before = ckpt.read_bytes()
    result = _export(ckpt, ckpt, "--force")
    _assert_one_error_line(result, "never writes over its input")
    assert ckpt.read_bytes() == before


def test_export_refuses_a_hard_link_of_its_input(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ckpt.read_bytes()
    for name in ("last.pt", "best.pt"):  # as save_step makes them
        os.link(ckpt, ckpt.with_name(name))
        code, err = _main(capsys, ckpt.with_name(name), ckpt, "--force")
        assert code == 2 and "a hard link of it" in err and len(err.splitlines()) == 1
    assert ckpt.read_bytes() == before and ckpt.stat().st_nlink == 3
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt", "last.pt", ckpt.name]


def test_export_never_replaces_a_device_or_fifo_even_with_force(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Renaming over /dev/full would replace the device itself (seen once, by hand)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, err = _main(capsys, ckpt, fifo, "--force")
    assert code == 2 and "is not a regular file" in err and len(err.splitlines()) == 1
    assert fifo.is_fifo()


def test_export_replaces_an_existing_file_only_with_force(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.safetensors"
    assert _main(capsys, ckpt, out) == (0, "")
    out.write_bytes(b"someone else's file")
    code, err = _main(capsys, ckpt, out)
    assert (code, err) == (2, f"error: {out} exists; pass --force to replace it\n")
    assert out.read_bytes() == b"someone else's file"
    assert _main(capsys, ckpt, out, "--force") == (0, "")
    model, tokenizer, _ = weights.load_model(out)
    assert tokenizer.vocab_size == BPE_VOCAB and model.config == TINY


def test_export_beside_the_checkpoint_needs_force_the_second_time(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ckpt.with_name(f"{ckpt.stem}.minigpt.safetensors")
    assert _main(capsys, ckpt, "--format", "minigpt") == (0, "")
    first = out.read_bytes()
    code, err = _main(capsys, ckpt, "--format", "minigpt")
    assert code == 2 and err == f"error: {out} exists; pass --force to replace it\n"
    assert out.read_bytes() == first
    assert _main(capsys, ckpt, "--format", "minigpt", "--force") == (0, "")


def test_export_makes_missing_folders_and_refuses_a_folder(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "share" / "v1" / "model.safetensors"
    assert _main(capsys, ckpt, out) == (0, "")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors"]
    code, err = _main(capsys, ckpt, out.parent, "--force")
    assert code == 2 and "is a folder" in err and len(err.splitlines()) == 1
    code, err = _main(capsys, ckpt, out / "model.safetensors")
    assert (
        code == 2
        and err == f"error: cannot write {out}/model.safetensors: {out} is a file, not a folder\n"
    )


@pytest.mark.parametrize(
    ("failure", "code", "words"),
    [
        (OSError(28, "No space left on device"), 1, "No space left on device"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_a_failed_export_leaves_no_temp_file(
    ckpt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: BaseException,
    code: int,
    words: str,
) -> None:
    def half_then_fail(tensors: dict[str, torch.Tensor], path: str, **_: Any) -> None:
        Path(path).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr("safetensors.torch.save_file", half_then_fail)
    out = tmp_path / "share" / "model.safetensors"
    got, err = _main(capsys, ckpt, out)
    assert got == code and words in err and len(err.splitlines()) == 1
    assert list(out.parent.iterdir()) == []


def test_a_damaged_checkpoint_is_not_exported(
    hostile: dict[str, tuple[Path, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, expected = hostile[first_case("pt", n_head_not_dividing)]
    out = tmp_path / "model.safetensors"
    code, err = _main(capsys, src, out)
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_without_arguments_is_an_error_line_then_the_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        export.main([])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err[0].startswith("error: ") and err[1].startswith("usage:")
