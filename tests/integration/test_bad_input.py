"""Bad input gets one clear line naming the option, a non-zero exit and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_entry, save_payload_checkpoint, tiny_train_args

pytestmark = pytest.mark.slow


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["model.n_head=5"], ["model.n_head=5", "model.d_model"]),
        (["train.dtype=float8"], ["train.dtype", "bfloat16"]),
        (["optimizer.min_lr=1.0"], ["optimizer.min_lr"]),
        (["data.paths=[/nonexistent/*.txt]"], ["/nonexistent/*.txt"]),
        (["model.block_size=100000"], ["block_size"]),
        (["resume=/nonexistent/last.pt"], ["resume", "/nonexistent/last.pt"]),
        # Hydra's own errors, which it reports on several lines:
        (["train.max_steps=abc"], ["train.max_steps=abc", "could not be converted to Integer"]),
        (["train.foo=1"], ["train.foo is not a key of train; the keys are: max_steps"]),
        (["model=nosuch"], ["model/nosuch", "Available options in 'model':", "small, tiny"]),
        (["model.n_layer=[1"], ["[1", "override_grammar"]),
        # a key added with + that no schema knows would be silently ignored:
        (["+train.max_step=5"], ["train.max_step is not a key of train", "max_steps"]),
    ],
)
def test_bad_training_option_is_one_clear_line(
    overrides: list[str], needles: list[str], alphabet_corpus: Path, tmp_path: Path
) -> None:
    args = tiny_train_args(alphabet_corpus, tmp_path / "run", tmp_path / "cache", *overrides)
    assert_one_line_error(run_entry("train.py", *args, cwd=tmp_path), *needles)


TRAIN_KEYS = "max_steps, batch_size, grad_accum, eval_every, eval_steps, ckpt_every, log_every"


@pytest.mark.parametrize(
    ("script", "arg", "line"),
    [
        (
            "train.py",
            "train.max_step=5",
            "error: train.max_step is not a key of train; did you mean train.max_steps? "
            f"The keys are: {TRAIN_KEYS}, ",
        ),
        (
            "train.py",
            "trian.max_steps=5",
            "error: trian is not a key of the config; did you mean train.max_steps? "
            "The keys are: model, data, optimizer, train, cluster, logger, resume",
        ),
        (
            "generate.py",
            "tempreture=0.5",
            "error: tempreture is not a key of the config; did you mean temperature? ",
        ),
        (
            "train.py",
            "data.paths=/no/such",
            """error: data.paths is a list; write it in brackets, e.g. 'data.paths=["/no/such"]'""",
        ),
        (
            "train.py",
            "logger.tags=base",
            """error: logger.tags is a list; write it in brackets, e.g. 'logger.tags=["base"]'""",
        ),
        (
            "train.py",
            "optimizer.betas=0.9",
            "error: optimizer.betas is a list; write it in brackets, e.g. 'optimizer.betas=[0.9]'",
        ),
    ],
)
def test_a_mistyped_key_or_a_list_without_brackets_says_what_to_write(
    script: str, arg: str, line: str, tmp_path: Path
) -> None:
    result = run_entry(script, arg, cwd=tmp_path, timeout=120)
    assert_one_line_error(result)
    assert result.returncode == 2
    assert next(x for x in result.stderr.splitlines() if x.startswith("error:")).startswith(line)
    assert "+" + arg not in result.stderr  # not Hydra's advice to append a key no schema has
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_hub_dataset_points_to_data_text(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["data=hub", "data.name=minigpt-tests/no-such-dataset", f"hydra.run.dir={run_dir}"]
    args += [f"data.cache_dir={tmp_path / 'cache'}", "model=tiny", "train.device=cpu"]
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_entry("train.py", *args, cwd=tmp_path, env=env, timeout=120)
    assert_one_line_error(result, "data.name=minigpt-tests/no-such-dataset", "data=text")
    assert "data.source" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "env", "needles"),
    [
        (["train.device=cuda"], {"CUDA_VISIBLE_DEVICES": ""}, ["train.device=cuda", "no CUDA"]),
        (["train.seed=-1"], {}, ["train.seed=-1", "[0, 2**63)"]),
        ([f"train.seed={2**63}"], {}, [f"train.seed={2**63}"]),
        (["data.split_seed=-5"], {}, ["data.split_seed=-5"]),
        ([], {"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x' is not an integer"]),
        ([], {"WORLD_SIZE": "0"}, ["WORLD_SIZE=0 must be >= 1"]),
        ([], {"RANK": "3", "WORLD_SIZE": "2"}, ["RANK=3 must be below WORLD_SIZE=2"]),
        (["train.compile=true"], {"CXX": "/nonexistent/g++"}, ["train.compile=true", "g++"]),
        (["model.d_model=65536", "model.n_head=1"], {}, ["GiB for weights", "smaller model"]),
        (["model.n_layer=1000000"], {}, ["M parameters", "more than the"]),
    ],
    ids=[
        *("cuda", "seed_neg", "seed_big", "split_seed", "rank_x", "world_0", "rank_3of2", "cxx"),
        *("too_wide", "too_deep"),
    ],
)
def test_a_run_that_cannot_start_here_is_one_clear_line(
    overrides: list[str],
    env: dict[str, str],
    needles: list[str],
    alphabet_corpus: Path,
    tmp_path: Path,
) -> None:
    args = tiny_train_args(alphabet_corpus, tmp_path / "run", tmp_path / "cache", *overrides)
    assert_one_line_error(run_entry("train.py", *args, cwd=tmp_path, env=env), *needles)


def test_empty_corpus_is_one_clear_line(tmp_path: Path) -> None:
    corpus = tmp_path / "empty"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    (corpus / "b.txt").write_text("")
    args = tiny_train_args(corpus, tmp_path / "run", tmp_path / "cache")
    assert_one_line_error(run_entry("train.py", *args, cwd=tmp_path), "empty")


def test_resume_of_another_model_shape_is_refused(alphabet_corpus: Path, tmp_path: Path) -> None:
    args = tiny_train_args(
        alphabet_corpus,
        tmp_path / "run",
        tmp_path / "cache",
        "train.max_steps=2",
        "train.eval_every=0",
    )
    assert run_entry("train.py", *args, cwd=tmp_path).returncode == 0
    again = run_entry("train.py", *args, "model.n_layer=3", cwd=tmp_path)
    assert_one_line_error(again, "another shape", "n_layer=2")


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_an_output_folder_that_cannot_be_written_is_one_clear_line(
    alphabet_corpus: Path, tmp_path: Path, multirun: bool
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = tiny_train_args(alphabet_corpus, tmp_path / "run", tmp_path / "cache")
    args = [a for a in args if not a.startswith("hydra.run.dir=")]
    args += [f"{key}={blocker}/out", *(["train.seed=1,2"] if multirun else [])]
    result = run_entry("train.py", *(["-m"] if multirun else []), *args, cwd=tmp_path)
    assert_one_line_error(result, f"{key}={blocker}/out", "Not a directory")
    assert blocker.read_text() == "not a folder\n"  # nothing destroyed on the way


@pytest.fixture
def not_a_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["checkpoint=/nonexistent.pt"], ["/nonexistent.pt", "does not exist"]),
        (["checkpoint=NOTCKPT"], ["not a minigpt checkpoint"]),
        (["checkpoint=NOTCKPT", "temperature=0"], ["temperature=0"]),
        (["checkpoint=NOTCKPT", "top_k=0"], ["top_k=0"]),
        (["checkpoint=NOTCKPT", "top_p=1.5"], ["top_p=1.5"]),
        (["checkpoint=NOTCKPT", "top_p=0"], ["top_p=0"]),
        ([], ["checkpoint"]),
    ],
)
def test_bad_generate_option_is_one_clear_line(
    args: list[str], needles: list[str], not_a_checkpoint: Path, tmp_path: Path
) -> None:
    args = [a.replace("NOTCKPT", str(not_a_checkpoint)) for a in args]
    assert_one_line_error(run_entry("generate.py", *args, cwd=tmp_path), *needles)


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    save_payload_checkpoint(path, marker, "model")
    result = run_entry("generate.py", f"checkpoint={path}", cwd=tmp_path)
    assert_one_line_error(result, "refused")
    assert not marker.exists()
