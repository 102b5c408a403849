"""generate.py under hostile input: prompts and file names reach it exactly as typed, and every
failure is one ``error:`` line with a non-zero exit, never a traceback or a hang."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from minigpt.checkpoint import save
from minigpt.cli import quote_free_text
from minigpt.config import ConfigError, GenerateConfig, register_configs, to_object
from minigpt.model import GPT, GPTConfig
from minigpt.trainer import TrainState
from tests.conftest import ROOT, Result, clean_env, run_entry
from tests.integration.test_bad_input import assert_one_line_error

PATHS = ("checkpoint", "prompt_file")  # as generate.py quotes them

# A prompt that opens and closes with the same quote is read in Hydra quotes (tested apart).
HOSTILE_PROMPTS = [
    "key=${oc.env:HOME}",
    "hi ${name}",
    "${oc.decode:'[1, 2]'}",
    "${",
    "}${x",
    "$${x}",
    r"\${not_an_interpolation}",
    r"\\${x}",
    "\\\\\\${x}\\",
    "back\\slash",
    "tail\\",
    "tail\\\n",
    "\\",
    "it's",
    'say "hi"',
    "'a' or 'b'",
    r"a\'b",
    'a\\"b',
    "a,b",
    "[1, 2]",
    "{a: 1}",
    "x=1=2",
    "=",
    "f(x)\n    y",
    "\n",
    "\ttab",
    " padded ",
    "+plus",
    "~tilde",
    "++x",
    "null",
    "42",
    "true",
    "choice(a,b)",
    "range(1,3)",
    "é漢字🙂 ñ",
    "",
]


def compose_generate(*overrides: str) -> GenerateConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_object(compose(config_name="generate", overrides=list(overrides)))


def typed(key: str, value: str) -> str:
    """The override generate.py hands Hydra when a user types ``key=value`` in the shell."""
    (arg,) = quote_free_text([f"{key}={value}"], keys=("prompt",), paths=PATHS)
    return arg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level model saved the way the trainer saves one, in a run folder."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=1, d_model=8, block_size=16, vocab_size=256)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt"
    state = {
        "model": GPT(config).state_dict(),
        "model_config": asdict(config),
        "tokenizer": {"kind": "byte"},
        "train_state": asdict(TrainState()),
    }
    save(state, path)
    return path


def generate_py(checkpoint: Path, *args: str, cwd: Path, timeout: float = 120) -> Result:
    """``python generate.py checkpoint=... device=cpu args...``, as a user runs it."""
    return run_entry(
        "generate.py", f"checkpoint={checkpoint}", "device=cpu", *args, cwd=cwd, timeout=timeout
    )


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_typed_prompt_reaches_the_config_unchanged(prompt: str) -> None:
    assert compose_generate("checkpoint=x.pt", typed("prompt", prompt)).prompt == prompt


def test_random_hostile_text_reaches_the_config_unchanged() -> None:
    """A thousand strings of the characters that matter, applied the way Hydra applies an
    override (parse it, update the config, turn it into the dataclass)."""
    pieces = [*"\\$'\"{}[](),=:+~@ \n\t", "${", "\\${", "${oc.env:HOME}", "é", "a"]
    rng = random.Random(0)
    parser = OverridesParser.create()
    cfg = OmegaConf.structured(GenerateConfig(checkpoint="x.pt"))
    for _ in range(1000):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 16)))
        if text[:1] in "'\"" and text[:1] == text[-1:]:
            continue  # may be read in Hydra quotes, as tested below
        OmegaConf.update(cfg, "prompt", parser.parse_override(typed("prompt", text)).value())
        assert OmegaConf.to_object(cfg).prompt == text, typed("prompt", text)


@pytest.mark.parametrize(
    "path",
    ["/runs/a b/last.pt", "/runs/[1]/x=2,3.pt", "/runs/${oc.env:HOME}/last.pt", "~/p.txt", "null."],
)
@pytest.mark.parametrize("key", PATHS)
def test_typed_file_name_reaches_the_config_unchanged(key: str, path: str) -> None:
    cfg = compose_generate("checkpoint=x.pt", typed(key, path))
    assert getattr(cfg, key) == path


def test_a_bare_null_file_name_still_means_unset() -> None:
    assert compose_generate("checkpoint=x.pt", typed("prompt_file", "null")).prompt_file is None


@pytest.mark.parametrize(
    ("value", "prompt"),
    [
        ("'a,b'", "a,b"),
        ('"x"', "x"),
        ("'it\\'s'", "it's"),
        ("'${oc.env:HOME}'", "${oc.env:HOME}"),
        ("\"'quoted'\"", "'quoted'"),  # how to get a prompt that opens and ends with a quote
    ],
)
def test_a_prompt_already_in_hydra_quotes_keeps_its_meaning_and_stays_literal(
    value: str, prompt: str
) -> None:
    assert compose_generate("checkpoint=x.pt", typed("prompt", value)).prompt == prompt


def test_a_sweep_of_hydra_quoted_prompts_stays_a_sweep_of_literal_texts() -> None:
    override = OverridesParser.create().parse_override(typed("prompt", "'${a}','b,c'"))
    assert override.is_sweep_override()
    assert list(override.sweep_string_iterator()) == [r"'\${a}'", "'b,c'"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["temperature=inf"], "temperature=inf must be a finite number > 0"),
        (["temperature=nan"], "temperature=nan must be a finite number > 0"),
        (["top_p=nan"], "top_p=nan must be in (0, 1]"),
        (["seed=-1"], "seed=-1 must be in [0, 2**63)"),
        ([f"seed={2**63}"], f"seed={2**63} must be in [0, 2**63)"),
        (["prompt_file=''"], "prompt_file is empty"),
    ],
)
def test_unusable_sampling_settings_are_refused(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_generate("checkpoint=x.pt", *overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "overrides", [["max_tokens=1000000000"], ["seed=0"], [f"seed={2**63 - 1}"]]
)
def test_extreme_but_valid_settings_are_accepted(overrides: list[str]) -> None:
    compose_generate("checkpoint=x.pt", *overrides)


@pytest.mark.slow
def test_an_interpolation_in_a_prompt_is_printed_not_resolved(
    checkpoint: Path, tmp_path: Path
) -> None:
    result = generate_py(checkpoint, "prompt=key=${oc.env:HOME}", "max_tokens=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("key=${oc.env:HOME}")
    assert os.environ["HOME"] not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt",
    [
        "+k=${a}, \\${b} [c] 'd' \"e\" é\n\\",  # most of the hostile list in one
        "~${oc.env:HOME}\\",
        "x\\",
    ],
)
def test_typed_prompt_is_printed_byte_for_byte(
    checkpoint: Path, tmp_path: Path, prompt: str
) -> None:
    result = generate_py(checkpoint, f"prompt={prompt}", "max_tokens=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == prompt + "\n"


@pytest.mark.slow
def test_files_at_hostile_paths_are_read(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "a b,[c]=d ${x}"
    folder.mkdir()
    (folder / "last.pt").write_bytes(checkpoint.read_bytes())
    prompt = "from a file: ${HOME} \\${x}\n"
    (folder / "p=1,[2].txt").write_text(prompt, encoding="utf-8")
    result = run_entry(
        "generate.py",
        f"checkpoint={folder}/last.pt",
        f"prompt_file={folder}/p=1,[2].txt",
        "max_tokens=0",
        "device=cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == prompt + "\n"


@pytest.mark.slow
def test_a_vanishing_temperature_samples_the_argmax(checkpoint: Path, tmp_path: Path) -> None:
    common = ["prompt=abc", "max_tokens=12", "top_k=null"]
    cold = generate_py(checkpoint, *common, "temperature=5e-324", cwd=tmp_path)
    assert cold.returncode == 0, cold.stderr[-2000:]
    greedy = generate_py(checkpoint, *common[:2], "top_k=1", "seed=7", cwd=tmp_path)
    assert cold.stdout == greedy.stdout


def bad_prompt_file(tmp_path: Path, kind: str) -> str:
    """A prompt_file of each unusable kind."""
    path = tmp_path / f"prompt_{kind}"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # nobody ever writes to it: reading it would wait for ever
    elif kind == "latin1":
        path.write_bytes("abc caf\xe9".encode("latin-1"))
    elif kind == "huge":
        with path.open("wb") as f:
            f.truncate(16 * 2**20 + 1)  # sparse: no disk used
    elif kind == "device":
        return "/dev/zero"
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "needles"),
    [
        ("folder", ["prompt_folder is a folder"]),
        ("fifo", ["prompt_fifo is not a regular file"]),
        ("device", ["prompt_file=/dev/zero is not a regular file"]),
        ("latin1", ["prompt_latin1 is not UTF-8", "0xe9 at offset 7"]),
        ("huge", ["prompt_huge is larger than 16 MiB"]),
        ("missing", ["prompt_missing does not exist"]),
    ],
)
def test_unusable_prompt_file_is_one_line(
    checkpoint: Path, tmp_path: Path, kind: str, needles: list[str]
) -> None:
    path = bad_prompt_file(tmp_path, kind)
    result = generate_py(checkpoint, f"prompt_file={path}", cwd=tmp_path, timeout=60)
    assert_one_line_error(result, *needles)


@pytest.mark.slow
def test_a_run_folder_as_checkpoint_is_one_line_naming_the_file(
    checkpoint: Path, tmp_path: Path
) -> None:
    run_dir = checkpoint.parent.parent
    for given in (run_dir, checkpoint.parent):
        result = run_entry("generate.py", f"checkpoint={given}", cwd=tmp_path)
        what = "a run folder" if given == run_dir else "a checkpoints folder"
        assert_one_line_error(
            result,
            f"error: checkpoint={given} is {what}; pass one of its checkpoints: "
            f"checkpoint={run_dir}/checkpoints/last.pt (checkpoints/ holds last.pt)",
        )


@pytest.mark.slow
def test_a_text_file_as_checkpoint_is_named_for_what_it_is(tmp_path: Path) -> None:
    notes = tmp_path / "notes.pt"
    notes.write_text("TODO: train the model\n", encoding="utf-8")
    result = run_entry("generate.py", f"checkpoint={notes}", cwd=tmp_path)
    assert_one_line_error(
        result,
        f"error: {notes} is not a model file: it is a text file (it starts 'TODO: train the "
        "model'); give a checkpoint (.pt), a .safetensors export or a model folder",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["checkpoint=/dev/null"], ["checkpoint=/dev/null is not a regular file"]),
        (["checkpoint=CKPT", "prompt="], ["prompt is empty after tokenization"]),
        (["checkpoint=CKPT", "prompt=caf\udce9"], ["prompt is not UTF-8", "0xe9 at offset 3"]),
        (["checkpoint=CKPT", "temperature=inf"], ["temperature=inf"]),
        (["checkpoint=CKPT", "seed=-1"], ["seed=-1"]),
        (["checkpoint=CKPT", "top_k=nan"], ["top_k=nan"]),
    ],
)
def test_bad_generate_input_is_one_line(
    checkpoint: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    args = [a.replace("CKPT", str(checkpoint)) for a in args]
    assert_one_line_error(run_entry("generate.py", *args, cwd=tmp_path), *needles)


@pytest.mark.slow
def test_device_cuda_without_a_gpu_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    """Runs on a GPU machine too: CUDA_VISIBLE_DEVICES="" hides its GPUs from the process."""
    result = run_entry(
        "generate.py",
        f"checkpoint={checkpoint}",
        "device=cuda",
        cwd=tmp_path,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert_one_line_error(result, "device=cuda", "no CUDA GPU")


def test_a_reader_that_goes_away_ends_generation_quietly(checkpoint: Path, tmp_path: Path) -> None:
    """``generate.py ... | head -c 5``: the pipe closes, generation stops, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "generate.py"), f"checkpoint={checkpoint}", "device=cpu"]
        + ["max_tokens=100000", "num_samples=50"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(5)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err[-2000:]
