"""The sweep report over run folders written by hand: finished, failed, running and pending jobs."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import matplotlib.image
import pytest
from omegaconf import OmegaConf

from minigpt import jobs, plots, report, runlock


def write_job(
    folder: Path,
    *,
    overrides: list[str],
    params: int | None = None,
    status: str | None = "completed",
    steps: int = 40,
    loss_scale: float = 1.0,
    max_steps: int = 40,
    tokens_per_step: int = 512,
    lr: float | None = None,
    warmup_steps: int = 20,
) -> None:
    """A job folder as the trainer leaves it: run.json (unless status is None) and metrics
    (with the learning rate, warming up linearly, when ``lr`` is given)."""
    folder.mkdir(parents=True)
    events = []
    for step in range(10, steps + 1, 10):
        event = {"step": step, "train/loss": loss_scale * 5 / step**0.5, "tokens_per_sec": 1e4}
        event["tokens_seen"] = step * tokens_per_step
        if lr is not None:
            event["lr"] = lr * min(1.0, step / warmup_steps)
        if step % 20 == 0:
            event["val/loss"] = loss_scale * 5.5 / step**0.5
        events.append(event)
    if status == "failed":
        events.append({"step": steps + 1, "train/loss": "nan"})
    lines = [json.dumps(e) for e in events]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "train/lo')
    if status in (None, "running"):
        runlock.acquire(folder)  # its process is alive: this one holds the folder
    if status is None:
        return
    info = {
        "status": status,
        "overrides": overrides,
        "config": {"train": {"max_steps": max_steps}},
        "params": params,
        "steps": steps,
        "tokens_seen": steps * tokens_per_step,
        "best_val_loss": min((e["val/loss"] for e in events if "val/loss" in e), default=None),
        "wall_time_s": 83.0,
    }
    if status == "completed":
        info["final_val_loss"] = events[-1].get("val/loss")
    (folder / "run.json").write_text(json.dumps(info))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A model-size sweep: two finished sizes, one failed, one running, one not started."""
    root = tmp_path / "multirun"
    common = ["data=text", "train.max_steps=40"]
    write_job(root / "0", overrides=["model.n_layer=1", *common], params=70_000)
    write_job(root / "1", overrides=["model.n_layer=2", *common], params=120_000, loss_scale=0.9)
    write_job(root / "2", overrides=["model.n_layer=3", *common], params=170_000, status="failed")
    write_job(root / "3", overrides=[], status=None, steps=20)
    (root / "3" / ".hydra").mkdir()
    (root / "3" / ".hydra" / "overrides.yaml").write_text(
        "- model.n_layer=4\n- data=text\n- train.max_steps=40\n- hydra.job.chdir=false\n"
    )
    submitted = [{"job": 4, "job_id": "77_4", "overrides": ["model.n_layer=5", *common]}]
    (root / "submitted.json").write_text(json.dumps(submitted))
    return root


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[2:]}


@pytest.fixture(autouse=True)
def queue(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The SLURM queue the report sees: job 77_4 of the sweep is still waiting in it."""
    queued = {"77_4"}
    monkeypatch.setattr(jobs, "slurm_queue", lambda ids: queued & set(ids))
    return queued


def test_table_has_one_row_per_job_with_its_status(sweep: Path) -> None:
    jobs, written = report.write_report(sweep)
    markdown = (sweep / "report.md").read_text()
    assert written[0] == sweep / "report.md"
    assert markdown.count("| job | overrides | status | steps |") == 1
    rows = _rows(markdown)
    assert list(rows) == ["0", "1", "2", "3", "4"]
    statuses = [rows[j][2] for j in rows]
    assert statuses == ["completed", "completed", "**failed**", "running", "pending"]
    assert rows["1"][1] == "`model.n_layer=2`"  # what sets the job apart; the rest said once
    assert "Every job also had: `data=text` `train.max_steps=40`" in markdown
    assert rows["1"][3:] == ["40/40", "0.7827", "0.7827", "10,000", "120.0k", "0:01:23"]
    assert rows["2"][5] == "—"  # a failed run has no final val loss
    assert rows["3"][1] == "`model.n_layer=4`" and rows["3"][3] == "20"
    assert rows["4"][1] == "`model.n_layer=5`"


@pytest.mark.parametrize("run_json", ["none", "running"])
def test_a_slurm_job_that_left_the_queue_unfinished_is_failed_with_its_error(
    sweep: Path, queue: set[str], run_json: str
) -> None:
    """Crashed before run.json, or killed outright (out of memory) with run.json at running."""
    if run_json == "running":
        write_job(sweep / "4", overrides=["model.n_layer=5"], status="running", steps=10)
    logs = sweep / ".submitit" / "77_4"
    logs.mkdir(parents=True)
    (logs / "77_4_0_log.err").write_text(
        "submitit WARNING: sacct error\nTraceback (most recent call last):\n  File x\n"
        "RuntimeError: CUDA out of memory\nsrun: error: vm: task 0: Exited with exit code 1\n"
    )
    queue.clear()
    report.write_report(sweep)
    markdown = (sweep / "report.md").read_text()
    assert _rows(markdown)["4"][2] == "**failed**"
    assert "Job 4 (SLURM 77_4) left the queue unfinished: RuntimeError: CUDA out of memory" in (
        markdown
    )


def test_without_squeue_statuses_are_as_the_folders_say(
    sweep: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real slurm_queue, with no squeue on the PATH
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert report.slurm_queue(["77_4"]) is None
    jobs = report.load_jobs(sweep)
    assert [j.status for j in jobs][-1] == "pending"


def test_plots_are_written_for_every_job_and_for_the_size_sweep(sweep: Path) -> None:
    _, written = report.write_report(sweep)
    names = sorted(p.name for p in written[1:])
    swept = "val_loss_vs_model_n_layer.png"
    assert names == sorted([report.LOSS_VS_STEP, swept, report.VAL_LOSS_VS_PARAMS])
    markdown = (sweep / "report.md").read_text()
    for path in written[1:]:
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 600 and height > 400
        assert f"]({path.name})" in markdown
    assert "## Final and best val loss vs `model.n_layer`\n\n![" in markdown


def test_an_lr_sweep_gets_loss_vs_lr_and_lr_curves_and_one_loss_plot(tmp_path: Path) -> None:
    root = tmp_path / "lr"
    for i, lr in enumerate((1e-4, 1e-3, 1e-2)):
        warmup = 1000 if lr == 1e-2 else 20  # stuck in warm-up: its lr never reaches 1e-2
        write_job(
            root / str(i),
            overrides=[f"optimizer.lr={lr:g}", "train.max_steps=40"],
            params=70_000,
            loss_scale=1.0 - 0.1 * i,
            lr=lr,
            warmup_steps=warmup,
        )
    _, written = report.write_report(root)
    assert [p.name for p in written] == [
        report.REPORT_FILE,
        report.LOSS_VS_STEP,
        report.LR_VS_STEP,
        "val_loss_vs_optimizer_lr.png",
    ]
    markdown = (root / "report.md").read_text()
    assert "## Final and best val loss vs `optimizer.lr`" in markdown
    assert "## Learning rate vs step" in markdown and "## Loss vs step" in markdown
    assert (
        "Loss vs tokens is not drawn: every job sees 512 tokens per step, so it would repeat "
        "loss vs step (whose top axis counts the tokens)."
    ) in markdown
    for path in written[1:]:
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 600 and height > 400


def test_the_loss_vs_value_plot_shows_each_jobs_final_loss_on_a_log_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    for i, lr in enumerate(("1e-4", "1e-3", "1e-2")):
        write_job(tmp_path / str(i), overrides=[f"optimizer.lr={lr}"], loss_scale=1.0 - 0.1 * i)
    read = report.load_jobs(tmp_path)
    values = jobs.swept_numbers(read)
    assert values == {"optimizer.lr": {"0": 1e-4, "1": 1e-3, "2": 1e-2}}
    kept: list[plt.Figure] = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to look into it
    plots.plot_val_loss_vs_swept(read, tmp_path, "optimizer.lr", values["optimizer.lr"])
    (ax,) = kept[0].axes
    assert ax.get_xscale() == "log"  # the values span 100x
    (final,) = [line for line in ax.get_lines() if line.get_label().startswith("final")]
    assert list(final.get_xdata()) == [1e-4, 1e-3, 1e-2]
    assert list(final.get_ydata()) == pytest.approx([5.5 / 40**0.5 * k for k in (1, 0.9, 0.8)])
    monkeypatch.undo()
    plt.close(kept[0])


def test_a_batch_size_sweep_draws_loss_vs_tokens_too(tmp_path: Path) -> None:
    for i, batch in enumerate((8, 32)):
        write_job(
            tmp_path / str(i), overrides=[f"train.batch_size={batch}"], tokens_per_step=batch * 64
        )
    _, written = report.write_report(tmp_path)
    assert [p.name for p in written[1:]] == [
        report.LOSS_VS_STEP,
        report.LOSS_VS_TOKENS,
        "val_loss_vs_train_batch_size.png",
    ]
    assert "Loss vs tokens is not drawn" not in (tmp_path / "report.md").read_text()


def test_keys_that_are_not_numbers_or_not_swept_get_no_plot(tmp_path: Path) -> None:
    write_job(tmp_path / "0", overrides=["model=tiny", "optimizer.lr=1e-3", "seed=1"])
    write_job(tmp_path / "1", overrides=["model=small", "optimizer.lr=1e-3", "seed=2"])
    assert jobs.swept_numbers(report.load_jobs(tmp_path)) == {"seed": {"0": 1.0, "1": 2.0}}


def test_a_single_run_folder_is_a_report_of_one(tmp_path: Path) -> None:
    run = tmp_path / "2026-11-25" / "14-03-07"
    write_job(run, overrides=["model=tiny"], params=70_000, status="running", steps=30)
    out = tmp_path / "report"
    jobs, written = report.write_report(run, out)
    assert [(j.label, j.status, j.steps) for j in jobs] == [("14-03-07", "running", 30)]
    assert written[0] == out / "report.md" and (out / report.LOSS_VS_STEP).exists()


def test_a_run_whose_process_was_killed_outright_is_dead_not_running(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_job(run, overrides=["model=tiny"], status="running", steps=30)
    (run / runlock.LOCK_FILE).unlink()
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock = runlock.acquire(run)  # written as the holder; then replaced by a killed one
        lock.release()
        holder = {**asdict(lock.holder), "pid": dead.pid, "pid_start": None}
        (run / runlock.LOCK_FILE).write_text(json.dumps(holder))
        assert report.load_jobs(run)[0].status == "running"  # its pid is alive
        dead.kill()
        dead.wait()
        assert report.load_jobs(run)[0].status == "dead"  # SIGKILL: the lock stays, its pid not
    finally:
        dead.kill()


def test_a_run_json_of_the_wrong_shape_is_read_as_far_as_it_makes_sense(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_job(run, overrides=["model=tiny"], steps=30)
    (run / "run.json").write_text(json.dumps({"status": 5, "steps": "abc", "config": 1}))
    (job,) = report.load_jobs(run)
    assert (job.status, job.steps, job.max_steps) == ("dead", 30, None)  # metrics, no holder
    assert report.table([job]).count("\n") == 2


def test_metrics_reader_skips_a_cut_line_and_reads_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": "nan"}\n{"step": 2, "tr')
    (event,) = report.read_events(path)
    assert event["step"] == 1 and event["train/loss"] != event["train/loss"]


def test_command_line_prints_the_table_and_fails_on_a_folder_without_runs(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 2 | `model.n_layer=3` | **failed** |" in out and "loss_vs_step.png" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert "holds no run" in capsys.readouterr().err


def _only_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_report_out_creates_missing_folders_and_writes_only_report_files(sweep: Path) -> None:
    out = sweep.parent / "reports" / "size" / "v1"
    report.write_report(sweep, out)
    report.write_report(sweep, out)  # its own report.md is replaced without --force
    drawn = {report.REPORT_FILE, report.LOSS_VS_STEP, report.VAL_LOSS_VS_PARAMS}
    drawn.add("val_loss_vs_model_n_layer.png")
    assert {p.name for p in out.iterdir()} == drawn  # no temp folder left, nothing else written
    assert (out / report.REPORT_FILE).read_text().startswith(f"# Report: {sweep}")


def test_report_into_a_run_folder_leaves_the_runs_own_files_untouched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_job(run, overrides=["model=tiny"], params=70_000)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    report.write_report(run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in before} == before


def test_report_out_that_is_a_file_is_one_error_line(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert report.main([str(sweep), "--out", str(out)]) == 2
    assert "is a file" in _only_error_line(capsys.readouterr().err)
    assert out.read_text() == "mine"
    assert report.main([str(sweep), "--out", str(out / "sub")]) == 2  # cannot be made
    assert "cannot write the report" in _only_error_line(capsys.readouterr().err)


def test_report_md_not_written_by_a_report_needs_force(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "paper"
    out.mkdir()
    (out / "report.md").write_text("# My thesis notes\n")
    assert report.main([str(sweep), "--out", str(out)]) == 2
    assert "pass --force" in _only_error_line(capsys.readouterr().err)
    assert (out / "report.md").read_text() == "# My thesis notes\n"
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert report.main([str(sweep), "--out", str(out), "--force"]) == 0
    assert (out / "report.md").read_text().startswith("# Report:")


def test_a_failed_report_leaves_no_half_written_file(
    sweep: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def disk_full(jobs: list[report.Job], out: Path) -> Path:
        (out / report.VAL_LOSS_VS_PARAMS).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device", str(out / report.VAL_LOSS_VS_PARAMS))

    monkeypatch.setattr(plots, "plot_val_loss_vs_params", disk_full)
    out = sweep.parent / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 2
    assert "No space left on device" in _only_error_line(capsys.readouterr().err)
    assert list(out.iterdir()) == []


def test_a_command_line_mistake_is_an_error_line_then_the_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        report.main([])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and err[0].startswith("error: ") and err[1].startswith("usage:")


def test_a_grid_over_two_keys_draws_one_line_per_value_of_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    grid = [(lr, batch) for batch in (8, 16) for lr in ("1e-4", "1e-3", "1e-2")]
    for i, (lr, batch) in enumerate(grid):
        overrides = [f"optimizer.lr={lr}", f"train.batch_size={batch}"]
        write_job(tmp_path / str(i), overrides=overrides, loss_scale=1 - 0.05 * i)
    read = report.load_jobs(tmp_path)
    values = jobs.swept_numbers(read)
    kept: list[plt.Figure] = []
    monkeypatch.setattr(plt, "close", kept.append)
    plots.plot_val_loss_vs_swept(read, tmp_path, "optimizer.lr", values["optimizer.lr"])
    monkeypatch.undo()
    (ax,) = kept[0].axes
    finals = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    finals = {label: xs for label, xs in finals.items() if label.startswith("final")}
    assert finals == {
        "final, train.batch_size=8": [1e-4, 1e-3, 1e-2],
        "final, train.batch_size=16": [1e-4, 1e-3, 1e-2],
    }
    plt.close(kept[0])


def write_sized_job(
    folder: Path, *, d_model: int, max_steps: int, loss: float, n_layer: int = 2
) -> int:
    """A completed job of a tiny model of width ``d_model`` with the run.json figures a scaling
    fit reads (sizes, tokens seen, final loss); returns its non-embedding parameter count."""
    write_job(folder, overrides=[f"model.d_model={d_model}", f"train.max_steps={max_steps}"])
    vocab, block = 256, 64
    blocks = n_layer * (12 * d_model**2 + 13 * d_model) + 2 * d_model
    info = json.loads((folder / "run.json").read_text())
    info |= {
        "config": {
            "model": {"d_model": d_model, "block_size": block, "vocab_size": None},
            "train": {"max_steps": max_steps},
        },
        "data": {"vocab_size": vocab},
        "params": blocks + (vocab + block) * d_model,
        "params_non_embedding": blocks + vocab * d_model,
        "tokens_seen": max_steps * 1024,
        "final_val_loss": loss,
    }
    (folder / "run.json").write_text(json.dumps(info))
    return blocks


def test_a_size_ladder_gets_fitted_scaling_laws_with_an_extrapolation(tmp_path: Path) -> None:
    for i, d_model in enumerate((32, 64, 96, 128, 160)):
        n = 2 * (12 * d_model**2 + 13 * d_model) + 2 * d_model
        write_sized_job(tmp_path / str(i), d_model=d_model, max_steps=200, loss=1.5 + 40 * n**-0.3)
    _, written = report.write_report(tmp_path)
    names = [p.name for p in written]
    assert names[-2:] == [plots.SCALING_VS_PARAMS, plots.SCALING_VS_COMPUTE]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Scaling-law fits" in markdown and "### L(N) = E + A·N^(-α)" in markdown
    alpha = next(line for line in markdown.splitlines() if line.startswith("| α |"))
    assert float(alpha.split("|")[2]) == pytest.approx(0.3, abs=1e-3)
    assert "Extrapolated one decade out (not measured): L(6.19e+06) = " in markdown
    assert f"![scaling_loss_vs_params]({plots.SCALING_VS_PARAMS})" in markdown
    for path in written[-2:]:
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 600 and height > 400


def test_a_ladder_of_three_sizes_says_it_is_too_few_to_fit_and_draws_no_curve(
    tmp_path: Path,
) -> None:
    for i, (d_model, loss) in enumerate(((32, 3.0), (64, 2.7), (96, 2.5))):
        write_sized_job(tmp_path / str(i), d_model=d_model, max_steps=200, loss=loss)
    _, written = report.write_report(tmp_path)
    assert plots.SCALING_VS_PARAMS not in [p.name for p in written]
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "No fit of L(N): 3 distinct N value(s); fitting E, A and α with an uncertainty needs "
        "at least 4."
    ) in markdown


def test_an_isoflop_grid_reports_the_optimal_size_per_budget(tmp_path: Path) -> None:
    """Widths doubling in parameters and steps halving: three sizes share each budget."""
    i = 0
    for budget in (1, 2, 4):
        for d_model, size in ((32, 1), (45, 2), (64, 4)):
            steps = 400 * budget // size
            loss = 2.0 + 0.3 * (size - 2) ** 2 / budget + 0.5 / budget
            write_sized_job(tmp_path / str(i), d_model=d_model, max_steps=steps, loss=loss)
            i += 1
    _, written = report.write_report(tmp_path)
    assert plots.ISOFLOP in [p.name for p in written]
    markdown = (tmp_path / "report.md").read_text()
    assert "### IsoFLOP: the loss-optimal size per compute budget" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "e+" in line]
    assert len(rows) == 3 and all(row.split(" | ")[1] == "3" for row in rows)
    assert "No fit of L(N): the jobs saw different numbers of tokens" in markdown


# ---------------------------------------------------------------- a Bayesian search
LR_SPACE = "tag(log, interval(1e-4, 1e-2))"
SEARCH_COMMON = ["+sweep=search_lr", "data=text", "data.paths=[my corpus/*.txt]"]


def write_search(root: Path, study: bool = True) -> Path:
    """A search folder as hydra/sweeper=search leaves it: trials 0-2 completed (trial 1 best),
    trial 3 refused before its folder was made (in the study only), trial 4 still running;
    the space in multirun.yaml (lr from the sweep file, model.n_head from the command line)."""
    trials = [(3e-4, 1.0), (2e-3, 0.8), (8e-3, 0.9)]
    for i, (lr, scale) in enumerate(trials):
        overrides = [*SEARCH_COMMON, f"optimizer.lr={lr!r}", "model.n_head=2"]
        write_job(root / str(i), overrides=overrides, loss_scale=scale)
    running = [*SEARCH_COMMON, "optimizer.lr=0.005", "model.n_head=2"]
    write_job(root / "4", overrides=running, status="running", steps=20)
    sweeper = {
        "_target_": "hydra_plugins.minigpt_search.sweeper.SearchSweeper",
        "direction": "minimize",
        "storage": None,
        "study_name": "search_lr",
        "params": {"optimizer.lr": LR_SPACE, "optimizer.warmup_steps": "0"},
    }
    task = [*SEARCH_COMMON, "model.n_head=2,3", "optimizer.warmup_steps=range(0, 40, 20)"]
    multirun = {"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}
    (root / "multirun.yaml").write_text(OmegaConf.to_yaml(multirun))
    if study:
        _write_study(root / "study.db", trials)
    return root


def _write_study(db: Path, completed: list[tuple[float, float]]) -> None:
    """The study of write_search's trials, written by optuna itself."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = {
        "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.n_head": CategoricalDistribution(["2", "3"]),
        "optimizer.warmup_steps": IntDistribution(0, 20, step=20),
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="search_lr")
    for lr, scale in completed:
        params = {"optimizer.lr": lr, "model.n_head": "2", "optimizer.warmup_steps": 0}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=space, value=scale * 5.5 / 40**0.5
            )
        )
    study.enqueue_trial({"optimizer.lr": 1e-4, "model.n_head": "3", "optimizer.warmup_steps": 0})
    refused = study.ask(space)
    refused.set_user_attr("error", "model.n_head=3 must divide model.d_model=64")
    study.tell(refused, state=optuna.trial.TrialState.FAIL)
    study.ask(space)  # trial 4, running


def test_a_search_lists_its_trials_best_first_and_failed_ones_last_with_their_error(
    tmp_path: Path,
) -> None:
    root = write_search(tmp_path / "search")
    _, written = report.write_report(root)
    markdown = (root / "report.md").read_text()
    search = markdown[markdown.index("## Search") : markdown.index("## Jobs")]
    rows = _rows(search)
    assert list(rows) == ["1", "2", "0", "4", "3"]  # by final val loss; running; failed
    # The searched keys in the sweeper's order: hydra.sweeper.params, then the command line.
    keys = "| `optimizer.lr` | `model.n_head` | `optimizer.warmup_steps` | status |"
    assert "| trial | final val loss " + keys in search
    assert rows["1"][1:] == ["0.6957", "0.002", "2", "0", "completed"]
    assert rows["4"][1:4] == ["—", "0.005", "2"] and rows["4"][-1] == "running"
    failed = "**failed**: model.n_head=3 must divide model.d_model=64"
    assert rows["3"][1:] == ["—", "0.0001", "3", "0", failed]  # from the study alone
    assert "5 trial(s): 3 completed, 1 failed." in search
    assert "## Final and best val loss vs" not in markdown  # the grid's plots are not repeated


def test_the_best_trial_is_a_ready_to_run_command_quoted_for_the_shell(tmp_path: Path) -> None:
    root = write_search(tmp_path / "search")
    report.write_report(root)
    markdown = (root / "report.md").read_text()
    assert "Best: trial 1, final val loss 0.6957. To run it again:" in markdown
    command = markdown.split("~~~bash\n")[1].split("\n~~~")[0]
    assert shlex.split(command) == [
        "python",
        "train.py",
        *SEARCH_COMMON,
        "optimizer.lr=0.002",
        "model.n_head=2",
    ]


def test_a_search_draws_its_history_and_each_value_on_the_scale_it_was_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    root = write_search(tmp_path / "search")
    figures: dict[str, plt.Figure] = {}
    monkeypatch.setattr(plt, "close", lambda fig: figures.update({fig.axes[0].get_title(): fig}))
    _, written = report.write_report(root)
    names = [p.name for p in written]
    assert names[1:5] == [
        plots.SEARCH_HISTORY,
        "search_val_loss_vs_optimizer_lr.png",
        "search_val_loss_vs_model_n_head.png",
        "search_val_loss_vs_optimizer_warmup_steps.png",
    ]
    lr = figures["Search: final validation loss vs optimizer.lr"].axes[0]
    steps = figures["Search: final validation loss vs optimizer.warmup_steps"].axes[0]
    assert (lr.get_xscale(), steps.get_xscale()) == ("log", "linear")
    history = figures["Search: final validation loss over trials"].axes[0]
    best_so_far = history.lines[1].get_ydata()
    assert list(best_so_far) == sorted(best_so_far, reverse=True) and len(best_so_far) == 3
    markdown = (root / "report.md").read_text()
    assert "### Final val loss vs `optimizer.lr` (log scale, as searched)" in markdown
    for path in written[1:5]:
        assert f"]({path.name})" in markdown


def test_a_running_search_is_read_from_its_folders_alone_without_optuna(tmp_path: Path) -> None:
    """No study.db to read (another storage) and no optuna installed: the folders say enough."""
    root = write_search(tmp_path / "search", study=False)
    code = (
        "import sys; sys.modules['optuna'] = None; from minigpt import report; "
        f"sys.exit(report.main([{str(root)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = _rows((root / "report.md").read_text().split("## Jobs")[0])
    assert list(rows) == ["1", "2", "0", "4"]
    assert rows["4"][-1] == "running"


def test_a_grid_sweep_has_no_search_section(sweep: Path) -> None:
    report.write_report(sweep)
    markdown = (sweep / "report.md").read_text()
    assert "## Search" not in markdown and "~~~bash" not in markdown
