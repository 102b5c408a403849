"""A run folder has one holder at a time; a dead holder never blocks it; nothing is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint, runfolder, runlock
from minigpt.runlock import RunFolderError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _rewrite_holder(run: Path, **changes: object) -> None:
    path = run / runlock.LOCK_FILE
    holder = json.loads(path.read_text())
    path.write_text(json.dumps({**holder, **changes}))


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    lock = runlock.acquire(tmp_path)
    with pytest.raises(
        RunFolderError, match=rf"in use by another run \(host .*, pid {os.getpid()}"
    ):
        runlock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / runlock.LOCK_FILE).exists()
    runlock.acquire(tmp_path).release()  # free again
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file left behind


@pytest.mark.parametrize(
    "dead",
    [
        {"pid": "DEAD"},  # killed with SIGKILL: the lock file stays, its process does not
        {"pid_start": 1},  # the pid was given to another process since
        {"host": "elsewhere", "AGE": runlock.STALE_AFTER_S + 5},  # no heartbeat for too long
        {"slurm_job_id": "42", "slurm_restart_count": 0, "ME": ("42", 1)},  # SLURM requeued it
    ],
    ids=["pid_gone", "pid_reused", "stale_heartbeat", "requeued_job"],
)
def test_a_dead_holder_does_not_block_the_folder(tmp_path: Path, dead: dict) -> None:
    runlock.acquire(tmp_path)._stop.set()  # a holder that stops beating, as if killed
    changes = {k: v for k, v in dead.items() if k not in ("AGE", "ME")}
    if changes.get("pid") == "DEAD":
        changes["pid"] = _dead_pid()
    _rewrite_holder(tmp_path, **changes)
    if "AGE" in dead:
        old = time.time() - dead["AGE"]
        os.utime(tmp_path / runlock.LOCK_FILE, (old, old))
    job, restarts = dead.get("ME", (None, 0))
    lock = runlock.acquire(tmp_path, job, restarts)
    assert runlock.read_holder(tmp_path / runlock.LOCK_FILE) == lock.holder
    lock.release()


@pytest.mark.parametrize(
    "alive",
    [{"host": "elsewhere"}, {"slurm_job_id": "42", "slurm_restart_count": 1, "ME": ("42", 1)}],
    ids=["other_host_beating", "same_allocation_same_attempt"],
)
def test_a_live_holder_elsewhere_blocks_the_folder(tmp_path: Path, alive: dict) -> None:
    runlock.acquire(tmp_path)._stop.set()
    _rewrite_holder(tmp_path, **{k: v for k, v in alive.items() if k != "ME"})
    job, restarts = alive.get("ME", (None, 0))
    with pytest.raises(RunFolderError, match="in use by another run"):
        runlock.acquire(tmp_path, job, restarts)


def test_the_holder_beats_and_the_report_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = runlock.acquire(tmp_path)
    path = tmp_path / runlock.LOCK_FILE
    os.utime(path, (1, 1))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    assert runlock.holder_of(tmp_path) == lock.holder
    lock.release()
    assert runlock.holder_of(tmp_path) is None


def test_breaking_a_stale_lock_never_removes_a_live_one_that_replaced_it(tmp_path: Path) -> None:
    lock = runlock.acquire(tmp_path)
    stale = runlock.Holder(**{**asdict(lock.holder), "token": "gone"})
    runlock._break(tmp_path / runlock.LOCK_FILE, stale)  # judged stale, but it was replaced
    assert runlock.read_holder(tmp_path / runlock.LOCK_FILE) == lock.holder
    lock.release()


# ------------------------------------------------------- which checkpoint a run starts from
def _save(run: Path, step: int, *, last: bool = True) -> Path:
    folder = checkpoint.checkpoint_dir(run)
    state = {"train_state": {"step": step}, "w": torch.tensor([float(step)])}
    path = checkpoint.save_step(state, folder, step, keep_last=10, best=False)
    if not last:
        (folder / checkpoint.LAST).unlink()
    return path


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_a_new_folder_starts_fresh_whatever_resume_says(tmp_path: Path) -> None:
    for resume in ("auto", "never"):
        assert runfolder.start_from(resume, tmp_path, print) == (None, None)


def test_resume_never_over_a_run_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    (tmp_path / "run.json").write_text('{"status": "completed", "steps": 10}')
    before = _files(tmp_path)
    with pytest.raises(RunFolderError, match="already holds a run .completed at step 10"):
        runfolder.start_from("never", tmp_path, print)
    assert _files(tmp_path) == before


def test_without_last_pt_auto_resumes_from_the_newest_step_that_loads(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    _save(tmp_path, 20, last=False)
    newest = _save(tmp_path, 30, last=False)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash
    said: list[str] = []
    path, state = runfolder.start_from("auto", tmp_path, said.append)
    assert path.name == "step_0000020.pt" and state["train_state"]["step"] == 20
    assert "last.pt is missing" in said[0] and "step_0000030.pt" in said[0]


def test_a_run_whose_checkpoints_all_fail_to_load_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, 10)
    path.write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match="none of its checkpoints loads"):
        runfolder.start_from("auto", tmp_path, print)


def test_a_run_that_saved_no_checkpoint_is_kept_aside_before_it_starts_over(
    tmp_path: Path,
) -> None:
    (tmp_path / "run.json").write_text('{"status": "running", "steps": 0}')
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    said: list[str] = []
    assert runfolder.start_from("auto", tmp_path, said.append) == (None, None)
    (aside,) = tmp_path.glob("earlier-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 5}\n'
    assert aside.name in said[0] and "starts at step 0" in said[0]


def test_resume_path_may_not_rewind_or_mix_runs(tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    early = _save(run, 10)
    _save(run, 20)
    with pytest.raises(RunFolderError, match="went on to step 20.*over steps 11-20"):
        runfolder.start_from(str(early), run, print)
    assert runfolder.start_from(str(run / "checkpoints/last.pt"), run, print)[0] is not None
    foreign = _save(other, 5)
    with pytest.raises(RunFolderError, match="already holds a run"):
        runfolder.start_from(str(foreign), run, print)
    assert runfolder.start_from(str(foreign), tmp_path / "new", print)[0] == foreign
    with pytest.raises(RunFolderError, match=r"is a run folder; pass one of its checkpoints: "):
        runfolder.start_from(str(run), tmp_path / "new", print)
    with pytest.raises(RunFolderError, match=r"resume=.*checkpoints/last\.pt \(checkpoints/ hold"):
        runfolder.start_from(str(run / "checkpoints"), tmp_path / "new", print)


def test_a_checkpoint_of_another_shape_or_tokenizer_cannot_be_continued() -> None:
    model = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16, "vocab_size": 256}
    state = {"model_config": {**model, "dropout": 0.0}, "tokenizer": {"kind": "byte"}}
    runfolder.check_resumable(state, Path("c.pt"), {**model, "dropout": 0.1}, {"kind": "byte"})
    with pytest.raises(RunFolderError, match=r"model.n_layer=2 -> 3\)"):
        runfolder.check_resumable(state, Path("c.pt"), {**model, "n_layer": 3}, {"kind": "byte"})
    with pytest.raises(RunFolderError, match="data.tokenizer was byte, now bpe"):
        runfolder.check_resumable(state, Path("c.pt"), model, {"kind": "bpe", "json": "{}"})


def test_resume_notes_name_changed_options_and_data() -> None:
    state = {
        "config": {"optimizer": {"lr": 0.001}, "resume": "auto"},
        "data": {"key": "a", "files": {"count": 2, "bytes": 10}, "tokens": {"train": 9}},
    }
    config = {"optimizer": {"lr": 0.002}, "resume": "never"}
    data = {"key": "b", "files": {"count": 3, "bytes": 15}, "tokens": {"train": 14}}
    notes, change = runfolder.resume_notes(state, config, data)
    assert notes[0] == "resuming with changed options: optimizer.lr: 0.001 -> 0.002"
    assert "was 2 files, 10 bytes" in notes[1] and "now 3 files, 15 bytes" in notes[1]
    assert change == {"from": state["data"], "to": data}


def test_resume_notes_say_how_raising_max_steps_moves_the_lr() -> None:
    optimizer = {"lr": 5e-4, "min_lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.1}
    old = {"optimizer": optimizer, "train": {"max_steps": 60}}
    state = {"config": old, "train_state": {"step": 60}}
    notes, _ = runfolder.resume_notes(state, {**old, "train": {"max_steps": 200}}, {})
    assert "train.max_steps: 60 -> 200" in notes[0]
    assert notes[1] == (
        "the learning-rate schedule changed (train.max_steps 60 -> 200): the lr at the resumed "
        "step 60 is 0.000435, where the checkpoint's schedule had 0.0001"
    )


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda run: (run / "checkpoints/last.pt").mkdir(parents=True), "last.pt is not a file"),
        (lambda run: (run / "checkpoints").write_text("mine"), "checkpoints is not a folder"),
        (lambda run: (run / "run.json").mkdir(parents=True), "run.json is not a file"),
        (lambda run: (run / "metrics.jsonl").mkdir(parents=True), "metrics.jsonl is not a file"),
    ],
    ids=["last_pt_folder", "checkpoints_file", "run_json_folder", "metrics_folder"],
)
def test_a_folder_where_a_run_keeps_a_file_is_refused_before_anything_changes(
    tmp_path: Path, make, needle: str
) -> None:
    make(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(RunFolderError, match=needle):
        runfolder.start_from("auto", tmp_path, print)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
