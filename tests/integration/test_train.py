"""End-to-end: train.py and generate.py run as a user runs them, on a tiny corpus."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import ALPHABET_LINE, read_metrics, run_entry, tiny_train_args

pytestmark = pytest.mark.slow


def unigram_entropy(text: str) -> float:
    """Entropy in nats of the byte distribution: the loss of a model that ignores context."""
    counts = Counter(text.encode())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("trained")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(ALPHABET_LINE * 40)
    run_dir = tmp / "run"
    args = tiny_train_args(
        corpus,
        run_dir,
        tmp / "cache",
        "train.max_steps=150",
        "train.eval_every=50",
        "train.ckpt_every=50",
    )
    result = run_entry("train.py", *args, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_training_loss_falls_well_below_unigram_entropy(trained: Path) -> None:
    events = read_metrics(trained)
    val = [e["val/loss"] for e in events if "val/loss" in e]
    assert len(val) == 3
    assert val[-1] < 0.25 * unigram_entropy(ALPHABET_LINE)
    assert val[-1] < val[0]


def test_run_folder_holds_checkpoints_metrics_and_run_json(trained: Path) -> None:
    assert (trained / "checkpoints" / "last.pt").is_file()
    assert (trained / "checkpoints" / "best.pt").is_file()
    assert not list((trained / "checkpoints").glob("*.tmp"))
    events = read_metrics(trained)
    assert all("step" in e for e in events)
    train_events = [e for e in events if "train/loss" in e]
    for key in ("train/loss", "lr", "tokens_per_sec", "mfu"):
        assert all(math.isfinite(e[key]) for e in train_events), key
    assert [e["step"] for e in train_events] == list(range(5, 151, 5))
    info = json.loads((trained / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["world_size"] == 1
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["params"] > 0 and "torch" in info["versions"]
    assert info["config"]["model"]["name"] == "tiny"
    assert 0 < info["startup_s"] < info["wall_time_s"] + 30  # includes the imports before the clock
    assert info["config"]["model"]["vocab_size"] is None  # filled from the tokenizer in the model
    assert info["final_val_loss"] == pytest.approx(
        [e for e in events if "val/loss" in e][-1]["val/loss"]
    )


def test_checkpoint_is_self_contained_and_weights_only(trained: Path) -> None:
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "minigpt"
    assert state["model_config"]["vocab_size"] == 256
    assert state["tokenizer"]["kind"] == "byte"
    assert state["train_state"]["step"] == 150


def test_generate_reproduces_the_learned_pattern(trained: Path) -> None:
    ckpt = trained / "checkpoints" / "best.pt"
    result = run_entry(
        "generate.py",
        f"checkpoint={ckpt}",
        "prompt=abcdef",
        "max_tokens=60",
        "temperature=0.8",
        "top_k=1",
        cwd=trained,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("abcdef")
    assert "ghijklmnopqrstuvwxyz\nabcdefghijklmnopqrstuvwxyz" in result.stdout


def test_generate_same_seed_same_text_and_several_samples(trained: Path) -> None:
    ckpt = trained / "checkpoints" / "last.pt"
    args = [
        f"checkpoint={ckpt}",
        "prompt=klm",
        "max_tokens=30",
        "temperature=1.5",
        "top_p=0.95",
        "num_samples=2",
        "seed=7",
    ]
    first = run_entry("generate.py", *args, cwd=trained)
    second = run_entry("generate.py", *args, cwd=trained)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout
    assert first.stdout.count("klm") >= 2


def test_generate_reads_prompt_file(trained: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("uvw")
    result = run_entry(
        "generate.py",
        f"checkpoint={trained / 'checkpoints' / 'last.pt'}",
        f"prompt_file={prompt}",
        "max_tokens=10",
        "top_k=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("uvwxyz\nabcd")


def test_same_seed_gives_the_same_loss_curve(alphabet_corpus: Path, tmp_path: Path) -> None:
    curves = []
    for name in ("a", "b"):
        args = tiny_train_args(
            alphabet_corpus,
            tmp_path / name,
            tmp_path / "cache",
            "train.max_steps=20",
            "train.eval_every=10",
            "model.dropout=0.1",
        )
        result = run_entry("train.py", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        curves.append(
            [
                (e["step"], e.get("train/loss"), e.get("val/loss"))
                for e in read_metrics(tmp_path / name)
                if "sample" not in e
            ]
        )
    assert curves[0] == curves[1]


def test_resume_auto_continues_from_last_checkpoint(alphabet_corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = tiny_train_args(alphabet_corpus, run_dir, tmp_path / "cache", "train.eval_every=10")
    first = run_entry("train.py", *base, "train.max_steps=20", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_entry("train.py", *base, "train.max_steps=30", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    steps = [e["step"] for e in read_metrics(run_dir) if "train/loss" in e]
    assert steps == list(range(5, 31, 5))  # every step once, none repeated
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_state"]["step"] == 30
