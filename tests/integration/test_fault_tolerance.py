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
import stat
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
    free_port,
    kill_when,
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
        "model.dropout=0.1",  # reseeded from (seed, step, slice): a resume needs no RNG state
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


def _kill_after(
    argv: list[str], cwd: Path, run_dir: Path, after_step: int, env: dict[str, str] | None = None
) -> int:
    """SIGKILL the run once metrics.jsonl reaches ``after_step``; the last step logged before."""
    metrics = run_dir / "metrics.jsonl"
    kill_when(argv, cwd, lambda: last_logged_step(metrics) >= after_step, env)
    return last_logged_step(metrics)


def test_sigkill_at_several_steps_then_resume_is_bit_identical(
    tmp_path: Path, reference: tuple[Path, Path, Path]
) -> None:
    """Killed outright twice, each time resumed from the last periodic checkpoint (every 50
    steps): at most ``ckpt_every`` steps are redone, and the end is the uninterrupted run's."""
    ref_dir, corpus, cache = reference
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train.py"), *_args(corpus, run_dir, cache)]
    resumed_at = []
    for k in (65, 135):
        killed_at = _kill_after(argv, tmp_path, run_dir, k)
        saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["train_state"]["step"]
        assert saved % 50 == 0 and killed_at - 50 < saved <= killed_at
        assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
        resumed_at.append(saved)
    resumed = run_entry("train.py", *_args(corpus, run_dir, cache), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {resumed_at[-1]}" in resumed.stdout

    final, expected = _weights(run_dir), _weights(ref_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resume drifted"
    steps = [e["step"] for e in read_metrics(run_dir)]
    assert steps == [e["step"] for e in read_metrics(ref_dir)]  # redone steps logged once


def test_two_ranks_killed_then_resumed_on_one_rank_is_bit_identical(
    tmp_path: Path, reference: tuple[Path, Path, Path]
) -> None:
    """2 ranks x batch 4, SIGKILLed, finished on 1 rank x batch 4 x 2 accumulation steps: the
    same micro-batches, gradients averaged by powers of two (exact), dropout masks keyed by
    batch slice, not rank. One thread per process, as torchrun gives each rank, so each matmul
    runs the same kernel."""
    _, corpus, cache = reference
    # Long enough that the kill after step 30 always lands before the end, even on a busy CPU.
    short = ["train.max_steps=200", "train.ckpt_every=20", "train.eval_every=100"]
    one_rank = ["train.batch_size=4", "train.grad_accum=2"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    ref_dir = tmp_path / "ref"
    ref_args = _args(corpus, ref_dir, cache, *short, *one_rank)
    ref = run_entry("train.py", *ref_args, cwd=tmp_path, env=one_thread)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    two = _args(corpus, run_dir, cache, *short, "train.batch_size=4")
    _kill_after([*torchrun, str(ROOT / "train.py"), *two], tmp_path, run_dir, 30)
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["train_state"]["step"]
    assert 20 <= saved < 200  # killed midway: the one rank has steps left to do

    one = _args(corpus, run_dir, cache, *short, *one_rank)
    resumed = run_entry("train.py", *one, cwd=tmp_path, env=one_thread)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 1 and info["global_batch"] == 8 and info["resumed_from"]
    final, expected = _weights(run_dir), _weights(ref_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resume drifted"


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
        assert "rng" not in state  # no generator state: dropout is reseeded every micro-step
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
    assert all(torch.isfinite(w).all() for w in _weights(run_dir).values())


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


SAVE_WRAPPER = textwrap.dedent(
    """
    import os, runpy, sys, time
    from pathlib import Path
    from minigpt import checkpoint

    TARGET, MODE, MARKER, FULL = {target!r}, {mode!r}, {marker!r}, {full!r}
    original_save, original_replace = checkpoint.save, os.replace

    def paused_replace(src, dst):  # the temp file is written and fsynced, not yet renamed
        if str(dst).endswith(TARGET):
            Path(MARKER).write_text(str(src))
            time.sleep(600)
        return original_replace(src, dst)

    def save(state, path):
        if not str(path).endswith(TARGET):
            return original_save(state, path)
        real_fdopen = os.fdopen
        if MODE == "full":  # every write of this save goes to a full device: ENOSPC
            os.fdopen = lambda fd, mode: (os.close(fd), open(FULL, mode))[1]
        else:
            os.replace = paused_replace
        try:
            return original_save(state, path)
        finally:
            os.fdopen, os.replace = real_fdopen, original_replace

    checkpoint.save = save
    sys.argv[0] = {train!r}
    runpy.run_path({train!r}, run_name="__main__")
    """
)


def _full_device(folder: Path) -> str:
    """A device like /dev/full (every write: ENOSPC) of the test's own, where root may make one:
    a test that once clobbered /dev/full made every later run of this one pass for the wrong
    reason."""
    path = folder / "full"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except OSError:
        path = Path("/dev/full")
    assert path.is_char_device(), f"{path} is not the full device"
    return str(path)


def _save_wrapper(tmp_path: Path, target: str, mode: str) -> tuple[Path, Path]:
    wrapper, marker = tmp_path / f"save_{mode}.py", tmp_path / "in_save"
    text = SAVE_WRAPPER.format(
        target=target,
        mode=mode,
        marker=str(marker),
        full=_full_device(tmp_path),
        train=str(ROOT / "train.py"),
    )
    wrapper.write_text(text)
    return wrapper, marker


def test_a_full_disk_during_a_save_is_one_line_keeps_the_last_checkpoint_and_resumes(
    tmp_path: Path, reference: tuple[Path, Path, Path]
) -> None:
    ref_dir, corpus, cache = reference
    run_dir = tmp_path / "run"
    wrapper, _ = _save_wrapper(tmp_path, "step_0000100.pt", "full")
    full = run_entry(str(wrapper), *_args(corpus, run_dir, cache), cwd=tmp_path)
    assert full.returncode == 1
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    last_line = full.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: No space left on device writing "), last_line
    assert "step_0000100.pt" in last_line and "last.pt = step_0000050.pt, is intact" in last_line
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "step_0000050.pt"]
    assert checkpoint.load(folder / "last.pt")["train_state"]["step"] == 50
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"

    resumed = run_entry("train.py", *_args(corpus, run_dir, cache), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 50" in resumed.stdout
    final, expected = _weights(run_dir), _weights(ref_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resume drifted"


def test_sigkill_inside_a_save_keeps_the_previous_checkpoint_and_resumes(
    tmp_path: Path, reference: tuple[Path, Path, Path]
) -> None:
    """Killed with the new checkpoint fully written to its temp file but not renamed: last.pt is
    still the previous save, the resumed run cleans the temp file up and ends bit-identical."""
    ref_dir, corpus, cache = reference
    run_dir = tmp_path / "run"
    wrapper, marker = _save_wrapper(tmp_path, "step_0000100.pt", "pause")
    argv = [sys.executable, str(wrapper), *_args(corpus, run_dir, cache)]
    kill_when(argv, tmp_path, marker.exists)  # inside the save of step 100
    leftover = Path(marker.read_text())
    assert leftover.exists() and leftover.stat().st_size > 0  # the half-done save is there
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["train_state"]["step"] == 50

    resumed = run_entry("train.py", *_args(corpus, run_dir, cache), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 50" in resumed.stdout and f"removed {leftover.name}" in resumed.stdout
    assert not leftover.exists()
    final, expected = _weights(run_dir), _weights(ref_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resume drifted"


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
