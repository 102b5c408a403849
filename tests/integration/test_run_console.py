"""What a person running train.py is told, and train.log, which keeps it: a tiny English run
that ends inside its warm-up, then the same run resumed with more steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import clean_env, read_metrics, run_entry, tiny_train_args

pytestmark = pytest.mark.slow

ENGLISH = "The quick brown fox jumps over the lazy dog, and the dog sleeps on.\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run of 8 steps (warm-up 10) drawn with a bar, then resumed to 16 steps."""
    tmp = tmp_path_factory.mktemp("console")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"doc{i}.txt").write_text(ENGLISH * 20)
    run = tmp / "my run, 1"  # a folder name the shell and Hydra would both misread unquoted
    args = tiny_train_args(corpus, run, tmp / "cache", "train.progress=bar", "train.eval_every=4")
    env = clean_env({"MINIGPT_CACHE_DIR": str(tmp / "machine-cache")})  # the peak: measured here
    first = run_entry("train.py", *args, "train.max_steps=8", cwd=tmp, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    log_after_first = (run / "train.log").read_text()
    info_first = json.loads((run / "run.json").read_text())
    second = run_entry("train.py", *args, "train.max_steps=16", cwd=tmp, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return {
        "tmp": tmp,
        "run": run,
        "first": first,
        "second": second,
        "log_after_first": log_after_first,
        "info_first": info_first,
    }


def test_train_log_holds_the_start_line_step_lines_and_summary(runs: dict) -> None:
    log = runs["log_after_first"].splitlines()
    assert log[0].startswith(f"run folder {runs['run']}: new run, 8 steps of model=tiny")
    steps = [line.split(" | ")[0] for line in log if line.startswith("step ")]
    assert steps == ["step 4/8", "step 5/8", "step 8/8"]  # evaluations, log_every=5, the last
    assert any(line.startswith("--- run complete: step 8/8 in ") for line in log)
    assert any(line.startswith("sample      python ") for line in log)
    assert "\r" not in runs["log_after_first"]  # the bar's redraws stay on the terminal
    stdout = runs["first"].stdout
    assert stdout.splitlines()[0] == log[0]  # the console said the same
    assert "--- run complete" in stdout


def test_a_resumed_run_appends_to_train_log_and_says_how_the_lr_moved(runs: dict) -> None:
    log = (runs["run"] / "train.log").read_text()
    assert log.startswith(runs["log_after_first"])  # the first attempt's lines are kept
    resumed = log[len(runs["log_after_first"]) :].splitlines()
    assert resumed[0].startswith(f"run folder {runs['run']}: resumed from ")
    assert "at step 8, training to step 16" in resumed[0]
    moved = [line for line in resumed if line.startswith("the learning-rate schedule changed")]
    assert moved and "train.max_steps 8 -> 16" in moved[0] and "the resumed step 8" in moved[0]
    assert moved[0] in runs["second"].stdout
    info = json.loads((runs["run"] / "run.json").read_text())
    assert moved[0] in info["resume_notes"]


def test_a_run_inside_its_warmup_is_warned_once_and_not_after_it(runs: dict) -> None:
    warning = "warning: optimizer.warmup_steps=10 >= train.max_steps=8"
    assert warning in runs["first"].stdout and warning in runs["log_after_first"]
    assert runs["info_first"]["warnings"][0].startswith(warning)
    assert "warning: optimizer.warmup_steps" not in runs["second"].stdout  # 16 steps > 10
    assert json.loads((runs["run"] / "run.json").read_text())["warnings"] == []


def test_run_json_holds_the_runs_mfu_and_where_the_peak_came_from(runs: dict) -> None:
    first, info = runs["info_first"], json.loads((runs["run"] / "run.json").read_text())
    events = [e for e in read_metrics(runs["run"]) if "mfu" in e]
    assert [e["step"] for e in events] == [5, 8, 10, 15, 16]
    assert first["mfu"]["windows"] == 2 and first["mfu"]["last"] == pytest.approx(events[1]["mfu"])
    assert info["mfu"]["windows"] == 5 and info["mfu"]["last"] == pytest.approx(events[-1]["mfu"])
    assert info["mfu"]["mean"] == pytest.approx(sum(e["mfu"] for e in events) / 5)  # both attempts
    assert first["peak_flops_source"].startswith("measured ")
    assert (
        f"cached {runs['tmp'] / 'machine-cache' / 'peak_flops.json'}" in first["peak_flops_source"]
    )
    assert info["peak_flops"] == first["peak_flops"]  # the cached figure, not a new one


def test_the_sample_prompt_comes_from_the_val_text(runs: dict) -> None:
    samples = [e["sample"] for e in read_metrics(runs["run"]) if "sample" in e]
    assert samples and all(s.startswith("The quick brown ") for s in samples)


def test_the_printed_generate_command_runs_as_printed(runs: dict) -> None:
    lines = runs["second"].stdout.splitlines()
    command = [line for line in lines if line.startswith("sample      ")][-1].split(None, 1)[1]
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    result = subprocess.run(
        ["bash", "-c", command + " max_tokens=5"],
        cwd=runs["tmp"],
        env=clean_env({"PATH": path}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
