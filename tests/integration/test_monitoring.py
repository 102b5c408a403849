"""End-to-end monitoring: train.py with logger=wandb/tensorboard, offline, and the sweep report.

Every W&B run here is offline (WANDB_MODE=offline from run_entry's environment) and read back with
wandb's own reader (tests/wandb_offline.py); nothing needs the network or a login.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests import wandb_offline
from tests.conftest import ROOT, read_metrics, run_command, run_entry, tiny_train_args

pytestmark = pytest.mark.slow


def wandb_home(tmp: Path) -> dict[str, str]:
    """Keep W&B's caches (staged tables, settings) out of the home folder."""
    return {var: str(tmp / "wandb-home") for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR")}


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run with logger=wandb, evaluated twice."""
    tmp = tmp_path_factory.mktemp("wandb_run")
    corpus = _corpus(tmp)
    run_dir = tmp / "run"
    args = tiny_train_args(
        corpus, run_dir, tmp / "cache", "logger=wandb", "train.max_steps=20", "train.eval_every=10"
    )
    result = run_entry("train.py", *args, cwd=tmp, env=wandb_home(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _corpus(tmp: Path) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text("abcdefghijklmnopqrstuvwxyz\n" * 40)
    return corpus


def test_offline_wandb_run_holds_val_loss_and_the_resolved_config(wandb_run: Path) -> None:
    (run,) = wandb_offline.offline_runs(wandb_run)
    rows = wandb_offline.history(run)
    val = [(r["_step"], r["val/loss"]) for r in rows if "val/loss" in r]
    jsonl = [(e["step"], e["val/loss"]) for e in read_metrics(wandb_run) if "val/loss" in e]
    assert val == jsonl and [s for s, _ in val] == [10, 20]
    summary = wandb_offline.summary(run)
    config = summary["config"]
    assert config["model"]["n_layer"] == 2 and config["model"]["name"] == "tiny"
    assert config["train"]["max_steps"] == 20 and config["logger"]["wandb"] is True
    assert config["params"] == json.loads((wandb_run / "run.json").read_text())["params"]
    assert (summary["state"], summary["exit_code"]) == ("finished", 0)
    assert wandb_offline.run_record(run)["job_type"] == "train"


def test_every_metric_and_a_samples_table_per_evaluation_reach_wandb(wandb_run: Path) -> None:
    (run,) = wandb_offline.offline_runs(wandb_run)
    rows = {r["_step"]: r for r in wandb_offline.history(run)}
    keys = {"train/loss", "val/perplexity", "lr", "grad_norm", "tokens_per_sec", "step_time_ms"}
    assert keys | {"mfu", "memory/rss_gb", "tokens_seen"} <= set(rows[20])
    assert [rows[s].get("samples.nrows") for s in (10, 20)] == [1, 2]


def test_run_id_is_stored_in_the_checkpoint_and_run_json(wandb_run: Path) -> None:
    (run,) = wandb_offline.offline_runs(wandb_run)
    run_id = wandb_offline.run_record(run)["run_id"]
    ckpt = torch.load(wandb_run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["logger_run_id"] == run_id
    assert json.loads((wandb_run / "run.json").read_text())["logger_run_id"] == run_id


def test_resumed_run_continues_the_same_wandb_run_and_tensorboard_run(
    alphabet_corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    base = tiny_train_args(
        alphabet_corpus, run_dir, tmp_path / "cache", "logger=[wandb,tensorboard]"
    )
    for steps in (10, 20):  # the second run is a requeue: resume=auto finds checkpoints/last.pt
        args = [*base, f"train.max_steps={steps}", "train.eval_every=10"]
        result = run_entry("train.py", *args, cwd=tmp_path, env=wandb_home(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]

    first, second = wandb_offline.offline_runs(run_dir)
    ids = {wandb_offline.run_record(r)["run_id"] for r in (first, second)}
    assert len(ids) == 1
    steps = [[row["_step"] for row in wandb_offline.history(r)] for r in (first, second)]
    assert steps == [[5, 10], [15, 20]]  # each step once, none missing
    assert wandb_offline.run_record(second)["resume"] is True
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]


def test_tensorboard_logger_writes_scalars_under_the_run_folder(
    alphabet_corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_train_args(
        alphabet_corpus,
        run_dir,
        tmp_path / "cache",
        "logger=tensorboard",
        "train.max_steps=10",
        "train.eval_every=5",
    )
    result = run_entry("train.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / "wandb").exists()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    val = [(e.step, e.value) for e in events.Scalars("val/loss")]
    jsonl = [(e["step"], e["val/loss"]) for e in read_metrics(run_dir) if "val/loss" in e]
    assert [s for s, _ in val] == [s for s, _ in jsonl] == [5, 10]
    assert [v for _, v in val] == pytest.approx([v for _, v in jsonl])  # no nested approx (9.2)


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 2-job multirun on Hydra's basic launcher; job 1's learning rate makes it fail."""
    tmp = tmp_path_factory.mktemp("sweep")
    corpus = _corpus(tmp)
    sweep_dir = tmp / "multirun"
    args = tiny_train_args(corpus, tmp / "unused", tmp / "cache", "train.max_steps=10")
    args = [a for a in args if not a.startswith(("hydra.run.dir", "train.log_every"))]
    result = run_entry(
        "train.py",
        "-m",
        *args,
        "train.log_every=1",  # the failed job logs its one step
        "logger=wandb",
        "optimizer.lr=1e-3,1e30",
        "train.max_bad_steps=1",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp,
        env=wandb_home(tmp),
    )
    assert "non-finite gradient" in result.stderr, result.stderr[-3000:]
    return sweep_dir, result.returncode


def test_the_jobs_of_a_multirun_are_two_runs_in_one_group(
    failed_sweep: tuple[Path, int],
) -> None:
    sweep_dir, _ = failed_sweep
    runs = [wandb_offline.offline_runs(sweep_dir / str(job)) for job in (0, 1)]
    assert [len(r) for r in runs] == [1, 1]
    records = [wandb_offline.run_record(r[0]) for r in runs]
    assert records[0]["run_id"] != records[1]["run_id"]
    assert {r["run_group"] for r in records} == {"multirun"}  # the sweep folder, from its parent
    assert [r["display_name"] for r in records] == ["optimizer.lr=0.001", "optimizer.lr=1e+30"]


def test_a_failed_job_exits_non_zero_and_its_wandb_run_is_failed(
    failed_sweep: tuple[Path, int],
) -> None:
    sweep_dir, returncode = failed_sweep
    assert returncode != 0
    runs = [wandb_offline.offline_runs(sweep_dir / str(j))[0] for j in (0, 1)]
    states = [wandb_offline.summary(run) for run in runs]
    assert [(s["state"], s["exit_code"]) for s in states] == [("finished", 0), ("failed", 1)]
    statuses = [json.loads((sweep_dir / str(j) / "run.json").read_text())["status"] for j in (0, 1)]
    assert statuses == ["completed", "failed"]


def test_report_over_the_sweep_marks_the_failed_job_and_draws_the_plots(
    failed_sweep: tuple[Path, int], tmp_path: Path
) -> None:
    sweep_dir, _ = failed_sweep
    result = run_command([sys.executable, "-m", "minigpt.report", str(sweep_dir)], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (sweep_dir / "report.md").read_text()
    assert "| 0 | `optimizer.lr=0.001` | completed | 10/10 |" in markdown
    assert "| 1 | `optimizer.lr=1e+30` | **failed** | 1/10 |" in markdown
    for png in ("loss_vs_step.png", "lr_vs_step.png"):
        assert (sweep_dir / png).stat().st_size > 10_000
        assert f"]({png})" in markdown
    assert not (sweep_dir / "val_loss_vs_params.png").exists()  # one model size only
    assert not (sweep_dir / "loss_vs_tokens.png").exists()  # the same tokens per step
    assert "Loss vs tokens is not drawn: every job sees" in markdown
    assert "**failed**" in result.stdout
