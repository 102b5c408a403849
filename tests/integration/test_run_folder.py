"""A run folder belongs to one run: nothing a run wrote is overwritten by another process.

Every case runs ``train.py`` as a user would on a copy of one finished 20-step run, then checks
the exit, the one error line, and that the run's files are byte-identical when it was refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ALPHABET_LINE,
    ROOT,
    clean_env,
    last_logged_step,
    read_metrics,
    run_entry,
    tiny_train_args,
)
from tests.integration.test_bad_input import assert_one_line_error

pytestmark = pytest.mark.slow

STEPS = 20


def _args(corpus: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_train_args(
        corpus,
        run,
        cache,
        f"train.max_steps={STEPS}",
        "train.eval_every=10",
        "train.ckpt_every=10",
        "train.keep_last=5",
        "train.progress=lines",
        *extra,
    )


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder (the lock aside: it is there only while a run holds it)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(10):
        (folder / f"doc{i:02d}.txt").write_text(ALPHABET_LINE * 40)
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(corpus, run folder, cache) of one finished 20-step run, to copy for each case."""
    base = tmp_path_factory.mktemp("finished")
    corpus, run, cache = _corpus(base / "corpus"), base / "run", base / "cache"
    result = run_entry("train.py", *_args(corpus, run, cache), cwd=base)
    assert result.returncode == 0, result.stderr[-2000:]
    return corpus, run, cache


@pytest.fixture
def run_copy(finished: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    corpus, run, cache = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return corpus, copy, cache


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["resume=never"], ["already holds a run (completed at step 20)", "own hydra.run.dir"]),
        (["model.n_layer=3"], ["another shape", "model.n_layer=2 -> 3"]),
        (["model.d_model=32", "model.n_head=2"], ["model.d_model=64 -> 32"]),
        (["train.max_steps=10"], ["train.max_steps=10 is below step 20"]),
        (["resume=RUN/checkpoints/step_0000010.pt"], ["went on to step 20", "steps 11-20"]),
        (
            ["resume=RUN/checkpoints"],
            ["is a checkpoints folder; pass one of its checkpoints: resume=", "last.pt"],
        ),
    ],
    ids=["resume_never", "deeper", "wider", "fewer_steps", "rewind", "resume_folder"],
)
def test_what_would_write_over_a_run_is_refused_and_changes_nothing(
    run_copy: tuple[Path, Path, Path], extra: list[str], needles: list[str], tmp_path: Path
) -> None:
    corpus, run, cache = run_copy
    before = _files(run)
    extra = [e.replace("RUN", str(run)) for e in extra]
    result = run_entry("train.py", *_args(corpus, run, cache, *extra), cwd=tmp_path)
    assert_one_line_error(result, *needles)
    assert "resume=never" not in result.stderr.split("resume=never would")[-1]  # not advised
    assert _files(run) == before


def test_a_finished_run_run_again_says_so_and_changes_nothing(
    run_copy: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    corpus, run, cache = run_copy
    before = _files(run)
    result = run_entry("train.py", *_args(corpus, run, cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = json.loads((run / "run.json").read_text())["final_val_loss"]
    assert f"is complete: step 20/20, final val loss {recorded:.4f}" in result.stdout
    assert _files(run) == before


def test_raising_max_steps_continues_the_run(
    run_copy: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    corpus, run, cache = run_copy
    result = run_entry("train.py", *_args(corpus, run, cache, "train.max_steps=30"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "at step 20" in result.stdout
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 30
    steps = [e["step"] for e in read_metrics(run) if "train/loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_a_damaged_run_json_and_foreign_metrics_lines_do_not_stop_a_resume(
    run_copy: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    corpus, run, cache = run_copy
    (run / "run.json").write_text("[]")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('[1]\nnull\n"s"\n{"step": "x"}\n')
    result = run_entry("train.py", *_args(corpus, run, cache, "train.max_steps=30"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["steps"] == 30
    steps = [e["step"] for e in read_metrics(run) if "train/loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_without_last_pt_the_run_resumes_from_its_newest_step_file(
    run_copy: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    corpus, run, cache = run_copy
    (run / "checkpoints" / "last.pt").unlink()
    result = run_entry("train.py", *_args(corpus, run, cache, "train.max_steps=30"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "last.pt is missing: resuming from step_0000020.pt" in result.stdout
    assert json.loads((run / "run.json").read_text())["steps"] == 30


def test_files_added_under_the_byte_tokenizer_continue_the_run_and_are_recorded(
    finished: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, original, _ = finished
    corpus, run, cache = _corpus(tmp_path / "corpus"), tmp_path / "run", tmp_path / "cache"
    shutil.copytree(original, run)
    (corpus / "new.txt").write_text(ALPHABET_LINE * 80)
    result = run_entry("train.py", *_args(corpus, run, cache, "train.max_steps=30"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the data changed since the checkpoint (was 10 files" in result.stdout
    changed = json.loads((run / "run.json").read_text())["data_changed"]
    assert changed["from"]["files"]["count"] == 10 and changed["to"]["files"]["count"] == 11


def test_a_bpe_tokenizer_trained_again_on_changed_data_is_refused(tmp_path: Path) -> None:
    corpus, run, cache = _corpus(tmp_path / "corpus"), tmp_path / "run", tmp_path / "cache"
    (corpus / "extra.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 30)
    bpe = [
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "model.block_size=16",
        "data.val_fraction=0.2",
    ]
    assert run_entry("train.py", *_args(corpus, run, cache, *bpe), cwd=tmp_path).returncode == 0
    before = _files(run)
    (corpus / "added.txt").write_text("pack my box with five dozen liquor jugs\n" * 30)
    result = run_entry("train.py", *_args(corpus, run, cache, *bpe), cwd=tmp_path)
    assert_one_line_error(result, "another tokenizer", "bpe trained again on changed data")
    assert _files(run) == before


def test_a_byte_checkpoint_is_refused_by_a_bpe_run_of_the_same_vocabulary_size(
    tmp_path: Path,
) -> None:
    corpus, run, cache = _corpus(tmp_path / "corpus"), tmp_path / "run", tmp_path / "cache"
    pad = ["model.vocab_size=300", "train.max_steps=5", "model.block_size=16"]
    assert run_entry("train.py", *_args(corpus, run, cache, *pad), cwd=tmp_path).returncode == 0
    bpe = [*pad, "data.tokenizer=bpe", "data.vocab_size=300", "data.val_fraction=0.2"]
    result = run_entry("train.py", *_args(corpus, run, cache, *bpe), cwd=tmp_path)
    assert_one_line_error(result, "another tokenizer", "data.tokenizer was byte, now bpe")


def test_a_second_process_on_a_live_run_folder_is_refused_and_ctrl_c_saves(
    tmp_path: Path,
) -> None:
    """The first run holds the folder: the second is refused, naming it; then Ctrl-C stops
    the first at a step boundary with a checkpoint (exit 130, no traceback), and the same
    command resumes it."""
    corpus, run, cache = _corpus(tmp_path / "corpus"), tmp_path / "run", tmp_path / "cache"
    long_run = _args(corpus, run, cache, "train.max_steps=100000", "train.eval_every=0")
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *long_run],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while last_logged_step(run / "metrics.jsonl") < 5 and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        hydra_record = (run / ".hydra" / "overrides.yaml").read_bytes()
        second = run_entry("train.py", *long_run, "train.seed=7", cwd=tmp_path)
        assert_one_line_error(second, "is in use by another run", f"pid {first.pid}")
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == hydra_record
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGINT at step" in err
    assert "checkpoint saved" in out
    stopped = json.loads((run / "run.json").read_text())
    assert stopped["status"] == "interrupted"
    steps = [e["step"] for e in read_metrics(run) if "train/loss" in e]
    assert steps == sorted(set(steps))  # one writer: no step twice, none interleaved
    more = f"train.max_steps={stopped['steps'] + 10}"
    again = run_entry("train.py", *long_run[:-2], more, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {stopped['steps']}" in again.stdout


@pytest.fixture
def full_disk(tmp_path: Path):  # noqa: ANN201
    """A 64 KiB tmpfs, filled: a run folder on a disk that is full from the start."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)])
    if made.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    try:
        with contextlib.suppress(OSError):
            (mount / "fill").write_bytes(b"\0" * 65536)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)])


def test_a_run_folder_on_a_full_disk_is_one_line_and_leaves_no_temp_file(
    full_disk: Path, tmp_path: Path
) -> None:
    corpus, run = _corpus(tmp_path / "corpus"), full_disk / "run"
    result = run_entry("train.py", *_args(corpus, run, tmp_path / "cache"), cwd=tmp_path)
    assert_one_line_error(result, "No space left on device", f"into {run}")
    assert not run.exists()  # no lock, no temp file, and the empty folder it made taken back
