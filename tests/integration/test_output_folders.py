"""A run that never starts leaves no folder behind, and never removes one it did not make.

Hydra makes the run folder (``outputs/DATE/TIME``), the sweep folder and each job's folder before
``train.py`` has read its config; a run refused at start-up takes back those it made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_entry

pytestmark = pytest.mark.slow


def assert_refused(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and needle in errors[0], result.stderr[-2000:]


def test_a_refused_run_leaves_no_run_folder(tmp_path: Path) -> None:
    result = run_entry("train.py", "model.n_head=5", cwd=tmp_path, timeout=120)
    assert_refused(result, "model.n_head=5 must divide model.d_model=256")
    assert list(tmp_path.iterdir()) == []  # neither outputs/DATE/TIME nor outputs/DATE


def test_a_run_refused_by_the_trainer_leaves_no_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"
    args = ["model=tiny", "train.device=cpu", f"hydra.run.dir={run_dir}"]
    result = run_entry("train.py", *args, "resume=/nonexistent/last.pt", cwd=tmp_path)
    assert_refused(result, "/nonexistent/last.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_removes_nothing_that_was_there(tmp_path: Path) -> None:
    day = tmp_path / "outputs" / "2026-01-01"
    (day / "earlier").mkdir(parents=True)
    (day / "earlier" / "run.json").write_text("{}\n")
    (tmp_path / "outputs" / "empty").mkdir()
    for run_dir in (day / "new", day / "earlier", tmp_path / "outputs" / "empty"):
        result = run_entry("train.py", "model.n_head=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert_refused(result, "model.n_head=5")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "outputs",
        "outputs/2026-01-01",
        "outputs/2026-01-01/earlier",
        "outputs/2026-01-01/earlier/run.json",
        "outputs/empty",
    ]
    assert (day / "earlier" / "run.json").read_text() == "{}\n"


def test_a_local_sweep_of_refused_jobs_leaves_no_sweep_folder(tmp_path: Path) -> None:
    result = run_entry("train.py", "-m", "model=tiny", "model.n_head=3,5", cwd=tmp_path)
    assert_refused(result, "model.n_head=3 must divide")
    assert "model.n_head=5 must divide" in result.stderr  # the second job ran too
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_leaves_no_sweep_folder(tmp_path: Path) -> None:
    args = ["-m", "+sweep=model_size", "cluster=slurm_cpu", "hydra.launcher.dry_run=true"]
    result = run_entry("train.py", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sweep folder: outputs/multirun/" in result.stdout
    assert "(a dry run leaves none)" in result.stdout
    assert list(tmp_path.iterdir()) == []
