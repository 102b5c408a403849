"""Interrupted runs, exact resume, checkpoint rotation, divergence and hostile checkpoints.

Interruptions are real signals sent to a real ``train.py`` process; the run stops at whatever
step it has reached, which is the point: the resumed run must end bit-identical to an
uninterrupted one whatever that step was.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint
from tests.conftest import (
    ROOT,
    clean_env,
    last_logged_step,
    read_metrics,
    run_entry,
    run_torchrun,
    tiny_train_args,
)

pytestmark = pytest.mark.slow

STEPS = 200


def _args(corpus: Path, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_train_args(
        corpus,
        run_dir,
        cache,
        f"train.max_steps={STEPS}",
        "train.batch_size=8",
        "train.eval_every=50",
        "train.log_every=5",
        "train.ckpt_every=50",
        "model.dropout=0.1",  # dropout draws from the torch RNG: its state must survive too
        "train.progress=lines",
        *extra,
    )


def _weights(run_dir: Path, name: str = checkpoint.LAST) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / name)["model"]


def _interrupt(argv: list[str], cwd: Path, run_dir: Path, sig: int, after_step: int) -> int:
    """Start ``argv``, send ``sig`` once metrics.jsonl reaches ``after_step``; its exit code."""
    proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last_logged_step(metrics) >= after_step:
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "checkpoint saved" in out, out[-2000:]
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An uninterrupted run, and the corpus and cache it used."""
    root = tmp_path_factory.mktemp("reference")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"line {i}: " + "the quick brown fox; " * 40 + "\n")
    run_dir = root / "run"
    result = run_entry("train.py", *_args(corpus, run_dir, root / "cache"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, corpus, root / "cache"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_interrupted_then_resumed_run_is_bit_identical(
    tmp_path: Path, reference: tuple[Path, Path, Path], sig: int
) -> None:
    ref_dir, corpus, cache = reference
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train.py"), *_args(corpus, run_dir, cache)]
    code = _interrupt(argv, tmp_path, run_dir, sig, after_step=30)
    assert code == 128 + sig
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "interrupted"
    stopped_at = info["steps"]
    assert 30 <= stopped_at < STEPS
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["train_state"]["step"] == stopped_at

    resumed = run_entry("train.py", *_args(corpus, run_dir, cache), cwd=tmp_path)  # resume=auto
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout

    final, expected = _weights(run_dir), _weights(ref_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resume drifted"
    events, ref_events = read_metrics(run_dir), read_metrics(ref_dir)
    assert [e["step"] for e in events] == [e["step"] for e in ref_events]  # each step once
    val = [(e["step"], e["val/loss"]) for e in events if "val/loss" in e]
    assert val == [(e["step"], e["val/loss"]) for e in ref_events if "val/loss" in e]
    done = json.loads((run_dir / "run.json").read_text())
    assert done["status"] == "completed" and done["resumed_from"]


def test_resume_on_two_ranks_continues_the_same_run(
    tmp_path: Path, reference: tuple[Path, Path, Path]
) -> None:
    """Stopped on 1 rank x batch 8, finished on 2 ranks x batch 4: the same global batches.

    Not bit-identical (2 ranks sum gradients in another order), but the same run to float
    rounding; dropout is off because a rank the first run did not have has no RNG state to resume.
    """
    _, corpus, cache = reference
    no_dropout = ["model.dropout=0.0", "train.max_steps=40"]
    ref_dir = tmp_path / "ref"
    ref = run_entry("train.py", *_args(corpus, ref_dir, cache, *no_dropout), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train.py"), *_args(corpus, run_dir, cache, *no_dropout)]
    assert _interrupt(argv, tmp_path, run_dir, signal.SIGUSR2, after_step=10) == 128 + 12
    two = _args(corpus, run_dir, cache, *no_dropout, "train.batch_size=4")
    resumed = run_torchrun(2, "train.py", *two, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 8 and info["resumed_from"]
    final, expected = _weights(run_dir), _weights(ref_dir)
    worst = max((final[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-4, f"largest parameter difference {worst:.2e}"


def test_checkpoints_rotate_and_all_load_weights_only(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_train_args(
        alphabet_corpus,
        run_dir,
        tmp_path / "cache",
        "train.max_steps=20",
        "train.ckpt_every=5",
        "train.eval_every=10",
        "train.keep_last=2",
    )
    result = run_entry("train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*.pt")) == [
        "step_0000015.pt",
        "step_0000020.pt",
    ]
    assert os.path.samefile(folder / "last.pt", folder / "step_0000020.pt")
    for path in folder.glob("*.pt"):
        state = torch.load(path, weights_only=True)  # explicit, as every loader here does
        assert state["format"] == "minigpt"
        assert len(state["rng"]["per_rank"]) == 1
    # A save killed half-way leaves a temp file behind: resume ignores it.
    (folder / ".step_0000025.pt.abc123.tmp").write_bytes(b"\x00" * 100)
    again = run_entry("train.py", *args, "train.max_steps=25", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 20" in again.stdout


NAN_WRAPPER = textwrap.dedent(
    """
    import runpy, sys
    import torch
    from minigpt import trainer

    BAD = {bad}  # (rank, step) pairs whose loss is made NaN
    original = trainer.Trainer._train_step

    def poisoned(self):
        if (self.dist.rank, self.state.step) in BAD:
            for p in self.model.parameters():  # NaN gradients on this rank only
                p.grad = torch.full_like(p, float("nan"))
        return original(self)

    trainer.Trainer._train_step = poisoned
    sys.argv[0] = {train!r}
    runpy.run_path({train!r}, run_name="__main__")
    """
)


def _finite(value: float | str) -> bool:
    return math.isfinite(float(value))  # metrics.jsonl writes non-finite floats as strings


def _nan_wrapper(tmp_path: Path, bad: list[tuple[int, int]]) -> Path:
    path = tmp_path / "nan_train.py"
    path.write_text(NAN_WRAPPER.format(bad=set(bad), train=str(ROOT / "train.py")))
    return path


def test_a_nan_on_one_rank_skips_the_step_on_all_ranks(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    wrapper = _nan_wrapper(tmp_path, [(1, 4), (1, 5)])
    run_dir = tmp_path / "run"
    args = tiny_train_args(
        alphabet_corpus, run_dir, tmp_path / "cache", "train.max_steps=12", "train.log_every=1"
    )
    result = run_torchrun(2, wrapper, *args, "train.batch_size=4", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer step skipped on every rank" in result.stdout
    events = [e for e in read_metrics(run_dir) if "train/loss" in e]
    assert [e["step"] for e in events] == list(range(1, 13))
    assert events[-1]["skipped_steps"] == 2
    # Steps 5 and 6 (state.step 4 and 5 when they ran) had NaN gradients; the others did not.
    assert [e["step"] for e in events if not _finite(e["grad_norm"])] == [5, 6]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_too_many_bad_steps_stop_the_run_keeping_the_last_good_checkpoint(
    tmp_path: Path, alphabet_corpus: Path
) -> None:
    wrapper = _nan_wrapper(tmp_path, [(0, s) for s in range(6, 100)])
    run_dir = tmp_path / "run"
    args = tiny_train_args(
        alphabet_corpus,
        run_dir,
        tmp_path / "cache",
        "train.max_steps=50",
        "train.ckpt_every=5",
        "train.max_bad_steps=3",
    )
    proc = subprocess.run(
        [sys.executable, str(wrapper), *args],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: 3 consecutive steps had a non-finite gradient"), last_line
    good = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert good["train_state"]["step"] == 5
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("entry", ["generate", "resume"])
def test_crafted_pickle_is_refused_and_its_payload_never_runs(
    tmp_path: Path, alphabet_corpus: Path, entry: str
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "minigpt", "version": 1, "model": _Payload(marker)}, evil)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # must not weaken an explicit weights_only
    if entry == "generate":
        result = run_entry("generate.py", f"checkpoint={evil}", "prompt=x", cwd=tmp_path, env=env)
    else:
        args = tiny_train_args(alphabet_corpus, tmp_path / "run", tmp_path / "cache")
        result = run_entry("train.py", *args, f"resume={evil}", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {evil} was refused")
    )
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)


def test_safetensors_export_shares_the_weights(tmp_path: Path, alphabet_corpus: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_train_args(alphabet_corpus, run_dir, tmp_path / "cache", "train.max_steps=30")
    assert run_entry("train.py", *args, cwd=tmp_path).returncode == 0
    ckpt = run_dir / "checkpoints" / "best.pt"
    out = tmp_path / "model.safetensors"
    export = subprocess.run(
        [sys.executable, "-m", "minigpt.export", str(ckpt), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr
    from safetensors.torch import load_file

    tensors = load_file(out)
    weights = checkpoint.load(ckpt)["model"]
    assert "lm_head.weight" not in tensors  # tied to the token embedding: stored once
    assert all(torch.equal(tensors[k], weights[k]) for k in tensors)
    same = [
        run_entry("generate.py", f"checkpoint={p}", "prompt=abc", "top_k=1", cwd=tmp_path).stdout
        for p in (ckpt, out)
    ]
    assert same[0] == same[1] and same[0].startswith("abcdefg")
