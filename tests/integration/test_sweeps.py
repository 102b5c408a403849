"""Sweeps without a cluster: named sweeps on Hydra's local launcher, and the SLURM dry run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from minigpt.config import register_configs, to_object
from tests.conftest import ROOT, run_entry, text_data_args

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


def test_the_named_sweeps_exist() -> None:
    assert {"model_size", "lr", "batch_size"} <= set(SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_sets_only_sweeper_params(sweep: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert params, f"sweeps/{sweep}.yaml sets no hydra.sweeper.params"
        plain = compose(config_name="config")
    # Nothing outside hydra.sweeper changes: the sweep only lists values.
    assert to_object(plain) == to_object(_without_hydra(cfg))


def _without_hydra(cfg):  # noqa: ANN001, ANN202
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _local_sweep(tmp_path: Path, corpus: Path, cache: Path, *overrides: str):  # noqa: ANN202
    """``train.py -m`` of tiny models on Hydra's basic launcher, into ``tmp_path/multirun``."""
    return run_entry(
        "train.py",
        "-m",
        "model=tiny",
        *text_data_args(corpus, cache),
        "train.device=cpu",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        *overrides,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_named_sweep_runs_on_the_local_launcher(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    sweep_dir = tmp_path / "multirun"
    result = _local_sweep(
        tmp_path,
        alphabet_corpus,
        cache_dir,
        "+sweep=lr",
        "optimizer.lr=1e-3,3e-3",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.eval_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lrs = [json.loads((sweep_dir / str(i) / "run.json").read_text()) for i in (0, 1)]
    assert [r["config"]["optimizer"]["lr"] for r in lrs] == [1e-3, 3e-3]
    assert all(r["status"] == "completed" and r["world_size"] == 1 for r in lrs)


def test_a_failing_job_of_a_local_sweep_does_not_stop_the_others(
    tmp_path: Path, alphabet_corpus: Path, cache_dir: Path
) -> None:
    """Job 0 is refused at start-up (tiny's width 64 has no 3 heads); job 1 must still run."""
    sweep_dir = tmp_path / "multirun"
    result = _local_sweep(
        tmp_path, alphabet_corpus, cache_dir, "model.n_head=3,2", "train.max_steps=3"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == "error: model.n_head=3 must divide model.d_model=64 (e.g. model.n_head=2)"
    assert errors[-1].startswith("error: a job of the sweep failed (model.n_head=3") and (
        len(errors) == 2
    )
    assert not (sweep_dir / "0").exists()  # the refused job's folder is taken back
    done = json.loads((sweep_dir / "1" / "run.json").read_text())
    assert done["status"] == "completed" and done["config"]["model"]["n_head"] == 2


def test_dry_run_prints_every_point_and_submits_nothing(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",
        "+sweep=model_size",
        "cluster=slurm_cpu",
        "hydra.launcher.dry_run=true",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "3 job(s) would be submitted" in out
    for i, model in enumerate(["mini", "small", "medium"]):
        assert f"#{i} model={model}" in out
    # slurm_cpu: 2 tasks per job, train.batch_size 16 -> global batch 32.
    assert out.count("world size 2, global batch 32 seq") == 3
    assert "3.26M params" in out and "10.84M params" in out
    assert "tasks_per_node=2" in out and "--kill-on-bad-exit=1" in out
    assert not sweep_dir.exists()  # no .submitit, no job folders, no multirun.yaml


def test_gpu_preset_asks_one_task_per_gpu(tmp_path: Path) -> None:
    result = run_entry(
        "train.py",
        "-m",
        "cluster=slurm",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.nodes=2",
        "hydra.launcher.dry_run=true",
        "model=gpt2-medium",
        "cluster.gpu_memory_gb=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nodes=2, tasks_per_node=4, gpus_per_node=4" in result.stdout
    assert "world size 8, global batch 128 seq" in result.stdout
    # The memory plan of both choices, and a warning for the chosen one past the declared GPU.
    assert re.search(
        r"memory per GPU, ddp: [0-9.]+ GiB/GPU .*; fsdp: [0-9.]+ GiB/GPU", result.stdout
    )
    assert "WARNING: train.parallel=ddp will not fit: ddp: " in result.stdout
