"""Start from a Hugging Face GPT-2, hand the result back: train.py, generate.py and the export as a
user runs them, with a transformers model saved to a temp folder standing for the Hub."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint, hf_tokenizers
from minigpt.tokenizer import BPETokenizer
from tests.conftest import ALPHABET_LINE, run_command, run_entry, run_torchrun, text_data_args

transformers = pytest.importorskip("transformers", reason="pip install -e '.[dev]'")

pytestmark = pytest.mark.slow

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def gpt2_folder(folder: Path, seed: int = 0, **config: object) -> Path:
    """A random GPT-2 of transformers (block 64) with a BPE tokenizer, saved as the Hub has it."""
    tok = BPETokenizer.train([ALPHABET_LINE * 50, "hello world, " * 50], vocab_size=300)
    torch.manual_seed(seed)
    settings = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 300}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    hf_tokenizers.write_tokenizer_files(tok, folder, 64)
    return folder


def train_args(init_from: str | Path, corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"init_from={init_from}",
        *text_data_args(corpus, run_dir.parent / "cache"),
        f"hydra.run.dir={run_dir}",
        "train.batch_size=4",
        "train.eval_every=5",
        "train.eval_steps=2",
        "train.device=cpu",
        "optimizer.warmup_steps=2",
        *extra,
    ]


def one_error_line(result, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_init_fine_tune_export_and_transformers_agree(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    source = gpt2_folder(tmp_path / "gpt2-tiny")
    run = tmp_path / "run"
    # A learning rate of 1e-12 moves no weight by more than ~1e-9: the run starts at the source.
    result = run_entry(
        "train.py",
        *train_args(source, alphabet_corpus, run, "train.max_steps=1", "optimizer.lr=1e-12"),
        "optimizer.min_lr=0",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised from" in (run / "train.log").read_text()
    trained = checkpoint.load(run / "checkpoints" / "last.pt")
    assert trained["train_state"]["step"] == 1 and trained["tokenizer"]["kind"] == "hf"
    theirs = transformers.GPT2LMHeadModel.from_pretrained(source).state_dict()
    wte = trained["model"]["transformer.wte.weight"]
    assert torch.allclose(wte, theirs["transformer.wte.weight"], atol=1e-6)
    c_fc = trained["model"]["transformer.h.1.mlp.c_fc.weight"]
    assert torch.allclose(c_fc, theirs["transformer.h.1.mlp.c_fc.weight"].t(), atol=1e-6)

    out = tmp_path / "export"
    exported = run_command(
        [sys.executable, "-m", "minigpt.export", str(run / "checkpoints" / "last.pt"), str(out)],
        cwd=tmp_path,
    )
    assert exported.returncode == 0 and exported.stdout.strip() == str(out), exported.stderr
    prompt = "abcdef"
    ours = run_entry(
        "generate.py", f"checkpoint={out}", f"prompt={prompt}", "max_tokens=20", "top_k=1",
        cwd=tmp_path,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-2000:]
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = pipe(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert ours.stdout == text + "\n"


def test_a_resumed_fine_tune_continues_its_own_weights(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    source = gpt2_folder(tmp_path / "src")
    run = tmp_path / "run"
    first = run_entry("train.py", *train_args(source, alphabet_corpus, run, "train.max_steps=5"),
                      cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    at_5 = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    again = run_entry("train.py", *train_args(source, alphabet_corpus, run, "train.max_steps=6"),
                      cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "initialised from" not in again.stdout
    at_6 = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    moved = (at_6["transformer.wte.weight"] - at_5["transformer.wte.weight"]).abs().max()
    assert 0 < moved < 0.01  # one more step from step 5, not from the source's weights


@pytest.mark.parametrize(
    ("config", "extra", "needles"),
    [
        # One of each kind through train.py; tests/unit/test_hf.py has every case of each.
        ({}, ["model=small"], ["model.n_layer=6 (model=small sets it) conflicts", "n_layer is 2"]),
        ({}, ["data.tokenizer=gpt2"], ["data.tokenizer=gpt2 conflicts", "tokenizer is hf"]),
        ({"activation_function": "relu"}, [], ["activation_function='relu' is not GPT-2's"]),
    ],
)
def test_what_the_source_cannot_be_is_refused_in_one_line(
    tmp_path: Path, alphabet_corpus: Path, config: dict, extra: list[str], needles: list[str]
) -> None:
    source = gpt2_folder(tmp_path / "src")
    if config:
        path = source / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    run = tmp_path / "run"
    result = run_entry("train.py", *train_args(source, alphabet_corpus, run, *extra), cwd=tmp_path)
    one_error_line(result, *needles)
    assert not run.exists()


def test_a_hub_name_resolves_from_the_local_cache_offline(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    """The Hub cache's layout (what a download leaves), read by name with HF_HUB_OFFLINE=1."""
    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-gpt2"
    gpt2_folder(repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    args = train_args("someone/tiny-gpt2", alphabet_corpus, run, "train.max_steps=2")
    result = run_entry("train.py", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "initialised from someone/tiny-gpt2" in result.stdout
    sample = run_entry(
        "generate.py", "checkpoint=someone/tiny-gpt2", "prompt=abc", "max_tokens=5",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert sample.returncode == 0 and sample.stdout.startswith("abc"), sample.stderr[-2000:]


def test_a_hub_name_absent_offline_is_one_error_line(tmp_path: Path, alphabet_corpus: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    result = run_entry(
        "train.py", *train_args("gpt2", alphabet_corpus, tmp_path / "run"), cwd=tmp_path, env=env
    )
    one_error_line(result, "init_from=gpt2", "not in the local Hugging Face cache")
    sample = run_entry("generate.py", "checkpoint=gpt2", cwd=tmp_path, env=env)
    one_error_line(sample, "checkpoint=gpt2", "not in the local Hugging Face cache")


def test_exporting_a_bias_free_model_is_refused(tmp_path: Path, alphabet_corpus: Path) -> None:
    run = tmp_path / "run"
    args = [
        "model=tiny",
        "model.bias=false",
        *text_data_args(alphabet_corpus, tmp_path / "cache"),
        f"hydra.run.dir={run}",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.eval_steps=1",
        "train.device=cpu",
    ]
    assert run_entry("train.py", *args, cwd=tmp_path).returncode == 0
    ckpt = run / "checkpoints" / "last.pt"
    result = run_command([sys.executable, "-m", "minigpt.export", str(ckpt)], cwd=tmp_path)
    one_error_line(result, "model.bias=false has no GPT-2 equivalent", "--format minigpt")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == sorted(
        p.name for p in ckpt.parent.iterdir() if p.suffix == ".pt"
    )
    ours = run_command(
        [sys.executable, "-m", "minigpt.export", str(ckpt), "--format", "minigpt"], cwd=tmp_path
    )
    assert ours.returncode == 0 and ours.stdout.strip().endswith("last.minigpt.safetensors")


@pytest.mark.distributed
def test_two_ranks_start_from_the_source_or_refuse_together(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    """Rank 0 reads init_from first and tells the others; each then loads it."""
    source = gpt2_folder(tmp_path / "src")
    run = tmp_path / "run"
    args = train_args(source, alphabet_corpus, run, "train.max_steps=2", "train.eval_every=0")
    result = run_torchrun(2, "train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "train.log").read_text().count("initialised from") == 1
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    bad_args = train_args(source, alphabet_corpus, tmp_path / "bad", "model.n_layer=3")
    bad = run_torchrun(2, "train.py", *bad_args, cwd=tmp_path)
    assert bad.returncode != 0, bad.stderr[-3000:]  # torchrun adds its own traceback
    assert "model.n_layer=3 (you set it) conflicts" in bad.stderr
    assert not (tmp_path / "bad").exists()
