"""Trackers: the logger group, metrics.jsonl, W&B offline, TensorBoard, job naming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigpt.cli import job_info
from minigpt.config import ConfigError, LoggerConfig, register_configs, to_object
from minigpt.tracking import (
    JobInfo,
    TensorBoardTracker,
    _wandb_mode_with_credentials,
    build_tracker,
    last_logged_step,
    wandb_mode,
)
from tests import wandb_offline
from tests.conftest import ROOT


def compose_logger(*overrides: str) -> LoggerConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose(config_name="config", overrides=list(overrides))).logger


# ---------------------------------------------------------------- the logger group
@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("logger=jsonl", (True, False, False)),
        ("logger=wandb", (True, True, False)),
        ("logger=tensorboard", (True, False, True)),
        ("logger=[wandb,tensorboard]", (True, True, True)),
        ("logger=[tensorboard,wandb]", (True, True, True)),
        ("logger=none", (False, False, False)),
    ],
)
def test_logger_options_combine_with_jsonl_always_underneath(
    choice: str, expected: tuple[bool, bool, bool]
) -> None:
    cfg = compose_logger(choice)
    assert (cfg.jsonl, cfg.wandb, cfg.tensorboard) == expected


def test_logger_group_keys_are_still_typed() -> None:
    with pytest.raises(ConfigError, match="logger.mode"):
        compose_logger("logger=wandb", "logger.mode=sometimes")


# ---------------------------------------------------------------- W&B mode
def test_wandb_mode_defaults_to_offline_so_nothing_waits_for_the_network() -> None:
    assert wandb_mode(LoggerConfig(wandb=True), environ={}) == "offline"


def test_wandb_mode_comes_from_wandb_mode_env_then_logger_mode() -> None:
    assert wandb_mode(LoggerConfig(), environ={"WANDB_MODE": "online"}) == "online"
    assert wandb_mode(LoggerConfig(), environ={"WANDB_MODE": "dryrun"}) == "offline"
    assert wandb_mode(LoggerConfig(mode="disabled"), environ={"WANDB_MODE": "online"}) == "disabled"


def test_bad_wandb_mode_env_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        wandb_mode(LoggerConfig(), environ={"WANDB_MODE": "sometimes"})


class _NoCredentials:
    """Stands in for the wandb module on a node without an API key."""

    def __init__(self) -> None:
        self.prompted: list[bool] = []

    def login(self, prompt: bool = True, verify: bool = True) -> bool:
        self.prompted.append(prompt)
        return False


def test_online_without_credentials_goes_offline_without_a_prompt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = _NoCredentials()
    assert _wandb_mode_with_credentials(LoggerConfig(mode="online"), fake) == "offline"
    assert fake.prompted == [False]
    assert "wandb sync" in capsys.readouterr().err


# ---------------------------------------------------------------- metrics.jsonl
def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_events_after_the_checkpoint_and_a_fresh_start_drops_all(
    tmp_path: Path,
) -> None:
    cfg = LoggerConfig()
    tracker = build_tracker(cfg, tmp_path, enabled=True, resume_step=None)
    for step in range(1, 8):
        tracker.log(step, {"train/loss": 1.0})
    tracker.finish("failed")
    assert last_logged_step(tmp_path / "metrics.jsonl") == 7

    resumed = build_tracker(cfg, tmp_path, enabled=True, resume_step=5)
    resumed.log(6, {"train/loss": 0.5})
    resumed.finish("completed")
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]

    fresh = build_tracker(cfg, tmp_path, enabled=True, resume_step=None)
    fresh.log(1, {"train/loss": 2.0})
    fresh.finish("completed")
    assert _steps(tmp_path / "metrics.jsonl") == [1]


def test_only_the_enabled_rank_writes(tmp_path: Path) -> None:
    cfg = LoggerConfig(wandb=True, tensorboard=True)
    tracker = build_tracker(cfg, tmp_path, enabled=False, resume_step=None)
    tracker.log(1, {"train/loss": 1.0})
    tracker.finish("completed")
    assert list(tmp_path.iterdir()) == []
    assert tracker.run_id is None


# ---------------------------------------------------------------- TensorBoard
def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_scalars_read_back_with_tensorboards_reader(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb", resume_step=0)
    for step in (10, 20):
        tracker.log(step, {"train/loss": 3.0 - step / 10, "val/loss": 2.5, "sample": "def f"})
    tracker.finish("completed")
    assert _scalars(tmp_path / "tb", "train/loss") == [(10, 2.0), (20, 1.0)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "sample/text_summary" in events.Tags()["tensors"]


def test_tensorboard_resume_shows_each_step_once(tmp_path: Path) -> None:
    first = TensorBoardTracker(tmp_path / "tb", resume_step=0)
    for step in range(1, 9):  # killed after step 8, last checkpoint at step 5
        first.log(step, {"train/loss": 1.0})
    first.finish("failed")
    second = TensorBoardTracker(tmp_path / "tb", resume_step=5)
    for step in range(6, 11):
        second.log(step, {"train/loss": 2.0})
    second.finish("completed")
    scalars = _scalars(tmp_path / "tb", "train/loss")
    assert [s for s, _ in scalars] == list(range(1, 11))
    assert [v for _, v in scalars] == [1.0] * 5 + [2.0] * 5


# ---------------------------------------------------------------- W&B offline, in process
@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """W&B offline, with its caches in tmp_path; torn down so each test sets it up afresh."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    yield
    wandb.teardown()


def test_wandb_offline_run_holds_config_history_samples_and_status(
    tmp_path: Path, wandb_env: None
) -> None:
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(wandb=True, jsonl=False, tags=["unit"])
    job = JobInfo(name="model=tiny", group="outputs/multirun/x")
    tracker = build_tracker(
        cfg, run_dir, enabled=True, resume_step=None, config={"model": {"n_layer": 2}}, job=job
    )
    tracker.log(10, {"train/loss": 2.0, "val/loss": 2.5})
    tracker.log(10, {"sample": "def f(): pass"})
    tracker.log(20, {"train/loss": 1.0, "val/loss": 1.5})
    tracker.finish("failed")

    (run,) = wandb_offline.offline_runs(run_dir)
    assert run.name.endswith(tracker.run_id)
    rows = wandb_offline.history(run)
    assert [(r["_step"], r["val/loss"]) for r in rows] == [(10, 2.5), (20, 1.5)]
    assert (rows[0]["samples._type"], rows[0]["samples.nrows"]) == ("table-file", 1)
    record = wandb_offline.run_record(run)
    assert (record["run_group"], record["display_name"], record["job_type"]) == (
        "outputs/multirun/x",
        "model=tiny",
        "train",
    )
    summary = wandb_offline.summary(run)
    assert summary["config"]["model"] == {"n_layer": 2}
    assert summary["tags"] == ["unit"]
    assert (summary["state"], summary["exit_code"]) == ("failed", 1)


def test_wandb_resume_keeps_the_id_and_sends_no_step_twice(tmp_path: Path, wandb_env: None) -> None:
    cfg = LoggerConfig(wandb=True)
    first = build_tracker(cfg, tmp_path, enabled=True, resume_step=None)
    for step in range(1, 9):  # killed after step 8; the checkpoint is at step 5
        first.log(step, {"train/loss": float(step)})
    first.finish("failed")
    second = build_tracker(cfg, tmp_path, enabled=True, resume_step=5, run_id=first.run_id)
    for step in range(6, 11):
        second.log(step, {"train/loss": float(step)})
    second.finish("completed")

    assert second.run_id == first.run_id
    runs = wandb_offline.offline_runs(tmp_path)
    # wandb names the folder by start second and id, adding "-1" when both runs start in the same
    # second, so the id is read from each run's own record.
    assert [wandb_offline.run_record(r)["run_id"] for r in runs] == [first.run_id] * 2
    steps = [[row["_step"] for row in wandb_offline.history(r)] for r in runs]
    assert steps == [list(range(1, 9)), [9, 10]]
    assert wandb_offline.summary(runs[1])["state"] == "finished"
    assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 11))


def test_wandb_samples_table_of_a_resumed_run_keeps_the_rows_logged_before(
    tmp_path: Path, wandb_env: None
) -> None:
    cfg = LoggerConfig(wandb=True)
    first = build_tracker(cfg, tmp_path, enabled=True, resume_step=None)
    for step in range(1, 9):  # killed after step 8; the checkpoint is at step 5
        first.log(step, {"train/loss": float(step)})
        if step % 2 == 0:
            first.log(step, {"sample": f"text of step {step}"})
    first.finish("failed")
    second = build_tracker(cfg, tmp_path, enabled=True, resume_step=5, run_id=first.run_id)
    for step in range(6, 11):
        second.log(step, {"train/loss": float(step)})
        if step % 2 == 0:
            second.log(step, {"sample": f"text of step {step}"})
    second.finish("completed")

    runs = wandb_offline.offline_runs(tmp_path)
    tables = [[r.get("samples.nrows") for r in wandb_offline.history(run)] for run in runs]
    assert [n for n in tables[0] if n] == [1, 2, 3, 4]  # steps 2, 4, 6, 8
    assert [n for n in tables[1] if n] == [5]  # 2, 4, 6, 8 again, and 10: none lost, none twice


def test_wandb_run_stopped_for_a_requeue_is_marked_preempting(
    tmp_path: Path, wandb_env: None
) -> None:
    tracker = build_tracker(LoggerConfig(wandb=True), tmp_path, enabled=True, resume_step=None)
    tracker.log(1, {"train/loss": 1.0})
    tracker.finish("interrupted")
    (run,) = wandb_offline.offline_runs(tmp_path)
    assert "preempting" in {r["type"] for r in wandb_offline.records(run)}


# ---------------------------------------------------------------- job naming
def _hydra_job(sweep_dir: Path, num: int, task: list[str], params: dict | None = None):  # noqa: ANN202
    return OmegaConf.create(
        {
            "mode": RunMode.MULTIRUN,
            "sweep": {"dir": str(sweep_dir)},
            "job": {"num": num},
            "overrides": {"task": task},
            "sweeper": {"params": params},
        }
    )


def test_multirun_jobs_are_grouped_by_sweep_and_named_by_swept_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "outputs" / "multirun" / "2026-11-25" / "14-03-07"
    sweep_dir.mkdir(parents=True)
    saved = {"hydra": {"overrides": {"task": ["model=tiny", "model.n_layer=1,2", "+sweep=lr"]}}}
    OmegaConf.save(OmegaConf.create(saved), sweep_dir / "multirun.yaml")
    task = ["model=tiny", "model.n_layer=2", "+sweep=lr", "optimizer.lr=0.003"]
    info = job_info(_hydra_job(sweep_dir, 1, task, params={"optimizer.lr": "1e-3,3e-3"}))
    assert info == JobInfo(
        name="model.n_layer=2 optimizer.lr=0.003",
        group="outputs/multirun/2026-11-25/14-03-07",
        job_type="train",
    )


def test_single_run_is_named_by_its_overrides() -> None:
    hydra_cfg = OmegaConf.create(
        {"mode": RunMode.RUN, "overrides": {"task": ["model=small", "hydra.run.dir=x"]}}
    )
    assert job_info(hydra_cfg) == JobInfo(name="model=small", group=None)
