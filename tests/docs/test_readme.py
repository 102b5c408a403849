"""Every command in README.md runs as written, so the README cannot drift from the code.

The commands are read from README.md itself: every line of a ```bash block (``\\`` continuations
joined, ``# comments`` dropped) and every ``$ `` line of another block, whose following lines are
its documented output. ``REGISTRY`` says, for each command exactly as the README writes it, how
it is run and what must come of it. A command is run through bash from a scratch clone of the
repository (symlinks; its own ``outputs/``), with ``python`` this interpreter, a fake HOME, one
token cache for the module and no network. "Tiny step counts where needed" are one documented
substitution, ``TINY``: each of its overrides replaces the value of that key on the command line,
or is appended when the key is not there. The few commands that cannot run here say why and what
checks them instead (``ByCI``: CI's own script runs them; ``Offline``: what they would do with
minigpt's files is done without the network).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import requires
from pathlib import Path

import pytest

from tests.conftest import ROOT, Result, clean_env, free_port
from tests.slurm.conftest import require_slurm_cluster

README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"

# The substitution that makes a training command take seconds: 2 steps of 2 sequences, one
# evaluation of one batch at the end, a log line per step.
TINY = (
    "train.max_steps=2",
    "train.eval_every=2",
    "train.eval_steps=1",
    "train.batch_size=2",
    "train.log_every=1",
)
RUN_DIR = "outputs/2026-11-25/14-03-07"  # the run folder the README's examples name
SWEEP_DIR = "outputs/multirun/2026-11-25/14-03-07"  # the sweep folder they name
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}")


# ---------------------------------------------------------------- reading the README


@dataclass(frozen=True)
class Documented:
    """A command of the README and the output shown under it (``$`` examples only)."""

    command: str
    output: tuple[str, ...]
    line: int


def strip_comment(line: str) -> str:
    """The line without its shell comment: a ``#`` at the start or after a blank, unquoted."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _joined(lines: list[str], i: int) -> tuple[str, int]:
    """The logical line at ``lines[i]``, ``\\`` continuations joined, and the next index."""
    text = lines[i].rstrip()
    while text.endswith("\\") and i + 1 < len(lines):
        i += 1
        text = text[:-1].rstrip() + " " + lines[i].strip()
    return text, i + 1


def _fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, dedented lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        i += 1
        if not opening:
            continue
        indent, lang, start, body = len(opening.group(1)), opening.group(2), i + 1, []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        i += 1
        blocks.append((lang, start, body))
    return blocks


def readme_commands(text: str) -> dict[str, Documented]:
    """Every command of the README, keyed by its text; a command shown twice keeps its output."""
    found: dict[str, Documented] = {}

    def add(command: str, output: list[str], line: int) -> None:
        while output and not output[-1].strip():
            output.pop()
        if command and (command not in found or output):
            found[command] = Documented(command, tuple(output), line)

    for lang, start, body in _fenced_blocks(text):
        i = 0
        while i < len(body):
            if lang == "bash":
                logical, nxt = _joined(body, i)
                add(strip_comment(logical).strip(), [], start + i)
                i = nxt
            elif body[i].startswith("$ "):
                logical, nxt = _joined(body, i)
                end = nxt
                while end < len(body) and not body[end].startswith("$ "):
                    end += 1
                add(strip_comment(logical[2:]).strip(), body[nxt:end], start + i)
                i = end
            else:
                i += 1
    return found


def missing_documented_lines(documented: tuple[str, ...], output: str) -> list[str]:
    """The documented lines that appear in no line of ``output``.

    ``...`` stands for anything, and a run folder's time stamp (``2026-11-25/14-03-07``) for any
    time stamp: the README shows one run, the test makes another.
    """
    got = [line.strip() for line in output.splitlines()]
    missing = []
    for line in (d.strip() for d in documented):
        if not line:
            continue
        parts = [TIMESTAMP.sub("\0", p) for p in line.split("...")]
        pattern = ".*".join(
            r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}".join(map(re.escape, p.split("\0")))
            for p in parts
        )
        if not any(re.search(pattern, g) for g in got):
            missing.append(line)
    return missing


def shrink(command: str, overrides: tuple[str, ...]) -> str:
    """``command`` with each ``key=value`` of ``overrides`` replacing that key's, or appended."""
    for override in overrides:
        key, value = override.split("=", 1)
        pattern = re.compile(rf"(?<=\s)(\+?{re.escape(key)})=[^\s'\"]+(?=\s|$)")
        if pattern.search(command):
            command = pattern.sub(lambda m, v=value: f"{m.group(1)}={v}", command)
        else:
            command += f" {override}"
    return command


# ---------------------------------------------------------------- how each command is run


@dataclass(frozen=True)
class Run:
    """Run through bash from the scratch clone, with ``tiny`` overrides and ``append`` added.

    ``needs`` names what must exist first (a run folder or file some other command or fixture
    makes). The outcome: exit code ``rc``, each regex of ``expect`` in the output, each glob of
    ``files`` matching, ``new_runs`` run folders made (each ``completed``), and the documented
    output's lines (only those matching ``doc_lines``, when given, which says why in ``why``).
    """

    tiny: tuple[str, ...] = TINY
    append: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    needs: tuple[str, ...] = ()
    rc: int = 0
    expect: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    new_runs: int | None = None
    doc_lines: str | None = None
    why: str = ""
    wrap: str = "{}"  # e.g. an allocation around the command: "salloc ... bash -c {}"
    timeout: float = 300
    check: Callable[[list[Path]], None] | None = None  # given the run folders it made
    marks: tuple = ()


@dataclass(frozen=True)
class ByCI:
    """Not run here: ``why``; CI's script ``.ci/run`` runs it, so the test checks that it does.

    What .ci/run runs: its own lines, the recipes of the ``make`` targets it calls, and the
    scripts/ those recipes call.
    """

    why: str
    ci_lines: tuple[str, ...]  # regexes, each matching one line of what .ci/run runs
    check: Callable[[], None] | None = None


@dataclass(frozen=True)
class Service:
    """A server: started as written, ready once its output matches ``ready``, then stopped."""

    ready: str
    needs: tuple[str, ...] = ()
    check: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Offline:
    """Not run here: ``why`` (it needs the network, or a package minigpt does not install);
    ``check`` does offline what the command would do with minigpt's files, given the clone."""

    why: str
    check: Callable[[Path], None]
    needs: tuple[str, ...] = ()


SLURM = (pytest.mark.slurm, pytest.mark.slow)
SLOW = (pytest.mark.slow,)


FSDP_RUN = "torchrun --nproc_per_node 2 train.py train.parallel=fsdp hydra.run.dir=outputs/fsdp_run"


def _check_sharded(run_dirs: list[Path]) -> None:
    """Two ranks, and a checkpoint of a step file and the shard folder it names."""
    _check_world_size(2)(run_dirs)
    folder = run_dirs[0] / "checkpoints"
    shards = sorted(p.name for p in folder.glob("step_*.dcp/*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], sorted(folder.rglob("*"))


def _run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _check_world_size(n: int) -> Callable[[list[Path]], None]:
    def check(run_dirs: list[Path]) -> None:
        info = _run_info(run_dirs[0])
        assert info["world_size"] == n, info["distributed"]

    return check


def _check_loggers(wandb: bool, tensorboard: bool, jsonl: bool = True):
    def check(run_dirs: list[Path]) -> None:
        run_dir = run_dirs[0]
        assert any(run_dir.glob("wandb/offline-run-*/*.wandb")) == wandb
        assert any(run_dir.glob("tensorboard/events.out.tfevents.*")) == tensorboard
        assert (run_dir / "metrics.jsonl").exists() == jsonl

    return check


def _check_model(run_dirs: list[Path], n_layer: int) -> None:
    assert _run_info(run_dirs[0])["config"]["model"]["n_layer"] == n_layer


def _check_text_corpus_trained(run_dirs: list[Path]) -> None:
    info = _run_info(run_dirs[0])
    assert info["data"]["tokenizer"] == "bpe", info["data"]
    assert info["data"]["key_inputs"]["files"]["count"] == 20, info["data"]


def _check_report_extra() -> None:
    """``.[report]`` is inside ``.[dev]``, which CI installs."""
    reqs = requires("minigpt") or []

    def extra(name: str) -> set[str]:
        return {r.split(";")[0].strip() for r in reqs if f'extra == "{name}"' in r}

    assert extra("report") and extra("report") <= extra("dev"), reqs


def _check_ci_script_runs() -> None:
    assert os.access(CI_SCRIPT, os.X_OK), f"{CI_SCRIPT} must be executable"
    assert CI_SCRIPT.read_text().startswith("#!/usr/bin/env bash")


def _check_slurm_tests_in_suite() -> None:
    """CI's plain ``python -m pytest`` collects tests/, which holds tests/slurm."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'testpaths\s*=\s*\["tests"\]', text), "pytest's testpaths must be tests/"
    assert (ROOT / "tests" / "slurm").is_dir()


def _wandb_sync(runs: int) -> Run:
    return Run(
        tiny=(),
        needs=(RUN_DIR if runs == 1 else SWEEP_DIR,),
        rc=1,
        expect=(
            rf"Syncing {runs} run\(s\)",
            r"offline-run-\d{8}_\d{6}-\w+/run-\w+\.wandb",
            "No API key configured",
        ),
        why="uploading needs the network and a W&B account; the test runs it offline without "
        "credentials: the glob finds the offline runs' .wandb files, wandb sync reads them and "
        "stops at once at the missing API key (a dead endpoint instead makes it retry for minutes)",
    )


TINY_GPT2 = "tiny-gpt2"  # a transformers GPT-2 saved in the clone: stands for the Hub's gpt2
HF_EXPORT = "outputs/my_run/hf"
WHEELHOUSE_BUILD = (
    "python scripts/wheelhouse.py --python-version 3.12 --platform manylinux_2_28_x86_64 "
    "--out wheelhouse"
)


def _make_tiny_gpt2(folder: Path) -> None:
    """A random GPT-2 of transformers (2 layers, width 32, 64 positions) with byte-level
    tokenizer files: what ``save_pretrained`` leaves, as a Hub repo holds it."""
    import torch
    import transformers

    from minigpt.hf_tokenizers import write_tokenizer_files
    from minigpt.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    settings = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 256}
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).save_pretrained(folder)
    write_tokenizer_files(ByteTokenizer(), folder, 64)


def _check_initialised_from(block_size: int) -> Callable[[list[Path]], None]:
    def check(run_dirs: list[Path]) -> None:
        (run_dir,) = run_dirs
        config = _run_info(run_dir)["config"]
        assert config["init_from"] == TINY_GPT2 and config["model"]["d_model"] == 32, config
        assert config["model"]["block_size"] == block_size, config["model"]
        assert "initialised from tiny-gpt2" in (run_dir / "train.log").read_text()

    return check


STAND_INS = "wheelhouse-stand-ins"  # a package index and GPT-2's tokenizer, as local folders
# minigpt's requirements the stock image lacks, and one dependency it has (numpy, left out)
STAND_IN_WHEELS = {
    "hydra-core": ("1.3.8", ["omegaconf>=2.2", "numpy"]),
    "omegaconf": ("2.3.1", []),
    "hydra-submitit-launcher": ("1.2.0", ["hydra-core>=1.1", "submitit>=1.3.3"]),
    "submitit": ("1.5.4", []),
    "wandb": ("0.31.0", []),
    "datasets": ("5.2.0", ["numpy>=1.17"]),
    "numpy": ("2.5.2", []),
}


def _make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A pure-python wheel holding only its metadata: what pip needs to resolve and install."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
            + [f"Requires-Dist: {r}" for r in requires]
        )
        + "\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = f"{dist}.dist-info/RECORD"
    files[record] = "".join(f"{path},,\n" for path in [*files, record])
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def _make_wheelhouse_stand_ins(folder: Path) -> None:
    """index/: stand-in wheels of the packages the wheelhouse resolves; gpt2/: a tokenizer.json
    of GPT-2's size (50257 ids, <|endoftext|> last), with a weights file that must stay behind."""
    from tokenizers import Tokenizer, models

    (folder / "index").mkdir(parents=True)
    for name, (version, deps) in STAND_IN_WHEELS.items():
        _make_wheel(folder / "index", name, version, deps)
    (folder / "gpt2").mkdir()
    vocab = {f"t{i}": i for i in range(50256)} | {"<|endoftext|>": 50256}
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(folder / "gpt2" / "tokenizer.json"))
    (folder / "gpt2" / "model.safetensors").write_bytes(b"weights")


def _check_transformers_loads_the_export(clone: Path) -> None:
    """lm-eval's ``hf`` model is AutoModelForCausalLM + AutoTokenizer of ``pretrained=``; it
    scores a continuation by the log-probabilities of its tokens: do the same here."""
    import torch
    import transformers

    folder = clone / HF_EXPORT
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("def main(")["input_ids"]])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
    assert torch.isfinite(logprobs).all() and logprobs.sum() < 0


REGISTRY: dict[str, Run | ByCI | Service | Offline] = {
    # Set up, train, test
    "make train": Run(
        tiny=(),
        env=(("ARGS", " ".join(TINY)),),
        needs=(".venv",),
        new_runs=1,
        why="ARGS is the Makefile's way to add overrides, so the tiny steps go there; .venv is "
        "this interpreter's environment, already set up (its stamp is fresh); CI's own "
        "`make env` builds a fresh one first",
    ),
    "make test": ByCI(
        "it is the suite this test belongs to: running it here would recurse", (r"^make test$",)
    ),
    'make train ARGS="model=small train.max_steps=100"': Run(
        tiny=(),
        append=(f'ARGS+="{" ".join(TINY)}"',),
        needs=(".venv",),
        new_runs=1,
        check=lambda runs: _check_model(runs, n_layer=6),
        why="make appends a second ARGS+= to the command line's ARGS, and Hydra takes the later "
        "of two values of a key: the tiny steps win over max_steps=100",
    ),
    "make test ARGS=\"-m 'not slow'\" TORCH=torch==2.13.0": Run(
        tiny=(),
        append=('ARGS+="--collect-only -q"',),
        needs=(".venv",),
        expect=(r"\d+ deselected",),
        why="running the suite inside itself would recurse: the test collects what it selects; "
        "TORCH matters only to a set-up that installs torch, which CI's `make env` does",
        timeout=180,
    ),
    "source .venv/bin/activate": Run(tiny=(), needs=(".venv",)),
    "python train.py": Run(new_runs=1),
    # Then sample from it
    f'python generate.py checkpoint={RUN_DIR}/checkpoints/best.pt prompt="def main(" '
    "max_tokens=200 temperature=0.8 top_k=40": Run(tiny=(), needs=(RUN_DIR,), expect=("def main",)),
    # Configuration: errors in one line
    "python train.py model.n_head=5": Run(tiny=(), rc=2),
    "python train.py train.max_step=5": Run(tiny=(), rc=2),
    "python train.py data.paths=notes.txt": Run(tiny=(), rc=2),
    "python train.py 'data.paths=[\"notes.txt\"]'": Run(tiny=(), rc=2),
    # Examples
    "python train.py model=small train.batch_size=64 train.max_steps=5000 train.compile=true": Run(
        new_runs=1, timeout=600, marks=SLOW
    ),
    "python train.py data=text 'data.paths=[\"~/corpus/*.txt\"]' data.tokenizer=bpe "
    "data.vocab_size=8192": Run(
        append=("model=tiny",),
        needs=("~/corpus",),
        new_runs=1,
        check=_check_text_corpus_trained,
    ),
    "python train.py data=hub data.name=roneneldan/TinyStories data.tokenizer=gpt2 model=small": (
        Run(tiny=(), rc=2, expect=(r"^error: .*cannot be reached \(no network\?\)",), timeout=120)
    ),
    "python train.py hydra.run.dir=outputs/my_run train.max_steps=2000": Run(
        files=("outputs/my_run/checkpoints/last.pt", "outputs/my_run/checkpoints/best.pt")
    ),
    "python generate.py checkpoint=outputs/my_run/checkpoints/best.pt prompt_file=prompt.py "
    "num_samples=3 top_p=0.9 top_k=null seed=7": Run(
        tiny=(), needs=("outputs/my_run", "prompt.py"), expect=("import os",)
    ),
    # Pretrained GPT-2
    'python generate.py checkpoint=gpt2 prompt="The meaning of life is"': Run(
        tiny=(),
        rc=2,
        expect=(r"^error: checkpoint=gpt2 .*not in the local Hugging Face cache",),
        timeout=120,
        why="no network here: the one-line refusal an uncached Hub model gets offline",
    ),
    "python train.py +experiment=finetune_gpt2 'data.paths=[\"~/corpus/*.txt\"]'": Run(
        append=(f"init_from={TINY_GPT2}",),
        needs=("~/corpus", TINY_GPT2),
        new_runs=1,
        check=_check_initialised_from(64),
        why="GPT-2's weights cannot be fetched here: the recipe starts from a transformers GPT-2 "
        "saved in the clone (init_from=tiny-gpt2 appended); every other key is the recipe's",
    ),
    "python train.py -m +experiment=finetune_gpt2 'data.paths=[\"~/corpus/*.txt\"]' "
    "cluster=slurm hydra.launcher.gpus_per_node=1 hydra.launcher.tasks_per_node=1": Run(
        tiny=(),
        append=("hydra.launcher.dry_run=true",),
        expect=(
            r"dry run: 1 job\(s\) would be submitted, nothing was\.",
            r"each job: nodes=1, tasks_per_node=1, gpus_per_node=1,",
            r"init_from=gpt2 is not here or in the local Hugging Face cache",
        ),
        why="there is no GPU partition here: the dry run shows what the job would ask for",
    ),
    "python train.py init_from=gpt2-medium data=text 'data.paths=[\"~/corpus/*.txt\"]' "
    "model.block_size=512": Run(
        tiny=(*TINY, f"init_from={TINY_GPT2}", "model.block_size=32"),
        needs=("~/corpus", TINY_GPT2),
        new_runs=1,
        check=_check_initialised_from(32),
        why="gpt2-medium cannot be fetched here: a transformers GPT-2 of 64 positions saved in "
        "the clone stands for it, cut to 32 positions",
    ),
    f"python -m minigpt.export outputs/my_run/checkpoints/best.pt {HF_EXPORT}": Run(
        tiny=(),
        needs=("outputs/my_run",),
        expect=(f"{HF_EXPORT}$",),
        files=tuple(f"{HF_EXPORT}/{f}" for f in ("config.json", "model.safetensors")),
    ),
    f"lm_eval --model hf --model_args pretrained={HF_EXPORT} --tasks lambada_openai,hellaswag "
    "--batch_size 16": Offline(
        why="lm-eval is not a dependency and its tasks' data comes from the Hub",
        check=_check_transformers_loads_the_export,
        needs=(HF_EXPORT,),
    ),
    f"hf upload your-name/my-gpt2 {HF_EXPORT}": Run(
        tiny=(),
        needs=(HF_EXPORT,),
        rc=1,
        expect=(r"Cannot reach https://huggingface.co/api/repos/create: offline mode",),
        why="no network or Hub account here: the upload gets as far as creating the repo",
    ),
    "torchrun --nproc_per_node 2 train.py": Run(
        new_runs=1, check=_check_world_size(2), marks=(pytest.mark.distributed, *SLOW)
    ),
    # Distributed training
    "torchrun --nproc_per_node 4 train.py model=small": Run(
        new_runs=1, check=_check_world_size(4), marks=(pytest.mark.distributed, *SLOW)
    ),
    "srun --ntasks-per-node 4 python train.py": Run(
        wrap="salloc --nodes 1 --ntasks-per-node 4 --cpus-per-task 1 bash -c {}",
        new_runs=1,
        check=_check_world_size(4),
        why="'inside an salloc/sbatch allocation': the test makes one on the local cluster",
        timeout=420,
        marks=SLURM,
    ),
    # Sweeps on SLURM
    "python train.py -m model=small,medium hydra/launcher=submitit_slurm": Run(
        append=("model.n_layer=1",),
        new_runs=2,
        timeout=600,
        why="submitted to the local cluster, each model cut to one layer",
        marks=SLURM,
    ),
    "python train.py -m model=small,medium cluster=slurm hydra.launcher.partition=gpu "
    "hydra.launcher.nodes=2 hydra.launcher.gpus_per_node=4": Run(
        tiny=(),
        append=("hydra.launcher.dry_run=true",),
        expect=(
            r"dry run: 2 job\(s\) would be submitted, nothing was\.",
            r"each job: partition=gpu, nodes=2, tasks_per_node=4, gpus_per_node=4,",
            r"world size 8, ",
        ),
        why="there is no GPU partition of 2 nodes x 4 GPUs here: the dry run shows what each "
        "sweep point would ask of it; real submission is tested by tests/slurm",
    ),
    "python train.py -m cluster=slurm model=gpt2-xl data.tokenizer=gpt2 train.parallel=fsdp": Run(
        tiny=(),
        append=("hydra.launcher.dry_run=true",),
        expect=(
            r"dry run: 1 job\(s\) would be submitted, nothing was\.",
            r"world size 8, .* 1557\.61M params",
            r"memory per GPU, ddp: [0-9.]+ GiB/GPU .*; fsdp: [0-9.]+ GiB/GPU",
        ),
        why="there is no GPU partition here: the dry run shows the job and its memory plan; "
        "fsdp training itself runs on two CPU ranks in tests/unit/test_parallel.py",
    ),
    FSDP_RUN: Run(new_runs=1, check=_check_sharded, marks=(pytest.mark.distributed, *SLOW)),
    'python generate.py checkpoint=outputs/fsdp_run/checkpoints/last.pt prompt="def "': Run(
        tiny=(), needs=("outputs/fsdp_run",), expect=(r"^def ",), marks=SLOW
    ),
    "python -m minigpt.consolidate outputs/fsdp_run/checkpoints/last.pt last_full.pt": Run(
        tiny=(),
        needs=("outputs/fsdp_run",),
        expect=(r"^last_full\.pt$",),
        files=("last_full.pt",),
        marks=SLOW,
    ),
    "python train.py -m cluster=slurm model=gpt2-medium,gpt2-large,gpt2-xl data.tokenizer=gpt2 "
    "train.batch_size=8 cluster.gpu_memory_gb=40 hydra.launcher.dry_run=true": Run(
        tiny=(),
        expect=(  # the README's table
            r"ddp: 15\.5 GiB/GPU .*; fsdp: 11\.1 GiB/GPU",
            r"ddp: 27\.3 GiB/GPU .*; fsdp: 17\.5 GiB/GPU",
            r"ddp: 47\.0 GiB/GPU .*; fsdp: 27\.0 GiB/GPU",
            r"^ +WARNING: train\.parallel=ddp will not fit: ddp: 47\.0 GiB/GPU",
        ),
    ),
    "python train.py -m +sweep=lr cluster=slurm_cpu": Run(
        append=("model=tiny",),
        new_runs=3,
        timeout=600,
        why="submitted to the local cluster (the preset is made for it)",
        marks=SLURM,
    ),
    "python train.py -m +sweep=model_size model=tiny,mini": Run(new_runs=2, marks=SLOW),
    "python train.py -m +sweep=size_ladder": Run(new_runs=5, marks=SLOW),
    "python train.py -m +sweep=isoflop": Run(
        new_runs=3,
        why="the tiny train.max_steps=2 replaces the grid's four lengths: its three widths run",
        marks=SLOW,
    ),
    "python train.py -m +sweep=search_lr cluster=slurm_cpu hydra.sweeper.n_trials=12 "
    "hydra.sweeper.n_jobs=4": Run(
        append=("hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"),
        new_runs=2,
        timeout=600,
        why="2 of the 12 trials, on the local cluster (tests/slurm/test_slurm_search.py "
        "runs a search with a failed trial; tests/integration/test_search.py a restarted one)",
        marks=SLURM,
    ),
    "python train.py -m +sweep=search_lr cluster=slurm_cpu hydra.launcher.dry_run=true": Run(
        tiny=(),
        expect=(
            r"search \(dry run\): \d+ trial\(s\) to run \(\d+ of 12 done\)",
            r"optimizer\.lr: log-uniform float in \[0\.0001, 0\.01\]",
            r"4 job\(s\) would be submitted",
        ),
    ),
    # Dry run (its documented output is checked whole)
    "python train.py -m +sweep=model_size cluster=slurm_cpu hydra.launcher.dry_run=true": Run(
        tiny=()
    ),
    # The SLURM tests
    "sudo scripts/slurm_cluster.sh install": ByCI(
        "it installs system packages (CI runs it as root, without sudo)",
        (r"^scripts/slurm_cluster\.sh install$",),
    ),
    "sudo scripts/slurm_cluster.sh start": ByCI(
        "it starts system daemons (CI runs it as root, without sudo)",
        (r"^scripts/slurm_cluster\.sh start$",),
    ),
    "python -m pytest tests/slurm": ByCI(
        "the SLURM tests are part of the suite CI runs; running them here would recurse",
        (r"python -m pytest( \$\((PYTEST_JOBS|ARGS)\))*$",),
        check=_check_slurm_tests_in_suite,
    ),
    "scripts/slurm_cluster.sh status": Run(tiny=(), expect=("PARTITION",), marks=SLURM),
    # Air-gapped GPU nodes
    WHEELHOUSE_BUILD: Run(
        tiny=(),
        append=("--gpt2-tokenizer", f"{STAND_INS}/gpt2"),
        env=(
            ("PIP_CONFIG_FILE", os.devnull),
            ("PIP_NO_INDEX", "1"),
            ("PIP_FIND_LINKS", f"{STAND_INS}/index"),
        ),
        needs=(STAND_INS,),
        expect=(
            r"^resolving hydra-core>=1\.3, .*, datasets>=4\.0 for Python 3\.12,",
            r"^total \d+\.\d MB \(limit 40 MB\), 6 wheels; no torch, triton or nvidia-\* wheel$",
            r"^relies on the image's numpy 2\.5\.2 ",
        ),
        files=(
            "wheelhouse/hydra_core-1.3.8-py3-none-any.whl",
            "wheelhouse/requirements.txt",
            "wheelhouse/hf_hub/models--openai-community--gpt2/refs/main",
            "wheelhouse/hf_hub/models--openai-community--gpt2/snapshots/*/tokenizer.json",
        ),
        timeout=120,
        why="no package index or Hub here: pip reads a folder of stand-in wheels instead of the "
        "index (PIP_NO_INDEX, PIP_FIND_LINKS) and GPT-2's tokenizer comes from a stand-in "
        "folder (--gpt2-tokenizer appended); the stand-in numpy is the image's and stays out",
    ),
    "scripts/gpu_check.sh": Run(
        tiny=(),
        append=("--help",),
        expect=(r"--dry-run", r"--wheelhouse DIR", r"--out DIR", r"outputs/gpu_check/"),
        why="it needs a CUDA GPU and minutes: its --help names the options this README gives",
    ),
    "python3 -m pip install --no-index --find-links wheelhouse --no-deps --target "
    "wheelhouse/site -r wheelhouse/requirements.txt": Run(
        tiny=(),
        needs=("wheelhouse",),
        files=(
            "wheelhouse/site/hydra_core-1.3.8.dist-info/METADATA",
            "wheelhouse/site/datasets-5.2.0.dist-info/METADATA",
        ),
        expect=(r"Successfully installed .*hydra-core-1\.3\.8",),
        timeout=120,
        why="into the scratch clone, from the wheelhouse of stand-in wheels the README's build "
        "command made there",
    ),
    "export PYTHONPATH=$PWD/wheelhouse/site HF_HUB_CACHE=$PWD/wheelhouse/hf_hub "
    "HF_HUB_OFFLINE=1 WANDB_MODE=offline": Run(tiny=()),
    # Monitoring
    "python train.py logger=wandb": Run(
        append=(f"hydra.run.dir={RUN_DIR}",),
        files=(f"{RUN_DIR}/wandb/offline-run-*/*.wandb", f"{RUN_DIR}/metrics.jsonl"),
        why="it also makes the README's example run folder (with wandb/, as its layout shows)",
    ),
    "python train.py logger=tensorboard": Run(
        new_runs=1, check=_check_loggers(wandb=False, tensorboard=True)
    ),
    "python train.py 'logger=[wandb,tensorboard]'": Run(
        new_runs=1, check=_check_loggers(wandb=True, tensorboard=True), marks=SLOW
    ),
    "python train.py logger=none": Run(
        new_runs=1, check=_check_loggers(wandb=False, tensorboard=False, jsonl=False)
    ),
    f"wandb sync {RUN_DIR}/wandb/offline-run-*": _wandb_sync(1),
    f"wandb sync {SWEEP_DIR}/*/wandb/offline-run-*": _wandb_sync(3),
    f"wandb leet inspect {RUN_DIR}/wandb/offline-run-* --summary": Run(
        tiny=(),
        needs=(RUN_DIR,),
        expect=(r"^state\s+finished", r"^\s*val/loss\s+\d"),
    ),
    "tensorboard --logdir outputs": Service(
        ready=r"TensorBoard .* at http://\S+", needs=("python train.py logger=tensorboard",)
    ),
    # Sweep report
    'pip install -e ".[report]"': ByCI(
        "installing into the test's own environment would change it under the running suite; "
        'CI installs ".[dev]", which holds every requirement of ".[report]"',
        (r'pip install .*-e "\.\[dev\]"$',),
        check=_check_report_extra,
    ),
    "python train.py -m model=tiny model.n_layer=1,2,3 train.max_steps=150 train.eval_every=50 "
    "'logger=[wandb,tensorboard]'": Run(
        append=(f"hydra.sweep.dir={SWEEP_DIR}",),
        files=tuple(f"{SWEEP_DIR}/{job}/wandb/offline-run-*/*.wandb" for job in "012"),
        new_runs=3,
        why="its sweep folder is the one the report example names",
        marks=SLOW,
    ),
    f"python -m minigpt.report {SWEEP_DIR}": Run(
        tiny=(),
        needs=(SWEEP_DIR,),
        doc_lines=r"^(\| job|\| ---|wrote|\s+outputs/)",
        why="the table's rows hold measured losses, throughput and times; the steps are 2/2 here",
        expect=tuple(
            rf"^\| {job} \| `model.n_layer={job + 1}` \| completed \| 2/2 \|" for job in range(3)
        ),
        files=(f"{SWEEP_DIR}/report.md", f"{SWEEP_DIR}/loss_vs_step.png"),
    ),
    # Development
    "ruff check . && ruff format --check .": ByCI(
        "it lints the whole tree, which CI does as its lint step",
        (r"ruff check \.( |$)", r"ruff format --check \.$"),
    ),
    'python -m pytest -m "not slow"': Run(
        tiny=(),
        append=("--collect-only", "-q"),
        expect=(r"\d+ deselected",),
        why="running the suite inside itself would recurse: the test collects what it selects "
        "(CI runs every test, slow ones included)",
        timeout=180,
    ),
    ".ci/run": ByCI(
        "it is CI: it installs packages and starts system daemons",
        (r"python -m pytest( \$\((PYTEST_JOBS|ARGS)\))*$",),
        check=_check_ci_script_runs,
    ),
}


# ---------------------------------------------------------------- the scratch clone


class Scratch:
    """A clone of the repository made of symlinks, where README commands run once each."""

    def __init__(self, root: Path) -> None:
        self.clone = root / "clone"
        self.home = root / "home"
        self.cache = root / "token-cache"
        self.clone.mkdir()
        self.home.mkdir()
        # wheelhouse/: the README's build command makes its own in the clone
        skip = {".git", ".venv", "outputs", "wheelhouse", ".pytest_cache", ".ruff_cache"}
        for entry in ROOT.iterdir():
            if entry.name not in skip:
                (self.clone / entry.name).symlink_to(entry)
        self.results: dict[str, Result] = {}
        self.run_dirs: dict[str, list[Path]] = {}  # the run folders each command made
        self.made: set[str] = set()

    def env(self, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
        env = clean_env(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "HOME": str(self.home),
                "MINIGPT_CACHE_DIR": str(self.cache),
                "HF_HOME": str(self.home / ".cache" / "huggingface"),
                "HF_DATASETS_OFFLINE": "1",
                "PET_MASTER_PORT": str(free_port()),  # torchrun's --master_port
                **dict(extra),
            }
        )
        for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):  # no credentials, no other server
            env.pop(key, None)
        return env

    def run(self, command: str) -> Result:
        """Run the README command as its registry entry says (once: later calls reuse it)."""
        if command not in self.results:
            entry = REGISTRY[command]
            assert isinstance(entry, Run)
            for need in entry.needs:
                self.ensure(need)
            line = shrink(command, entry.tiny)
            line = " ".join([line, *entry.append])
            if entry.wrap != "{}":
                line = entry.wrap.format(_quote(line))
            before = self._runs()
            proc = subprocess.run(
                ["bash", "-c", line],
                cwd=self.clone,
                env=self.env(entry.env),
                capture_output=True,
                text=True,
                timeout=entry.timeout,
            )
            self.results[command] = Result(proc.returncode, proc.stdout, proc.stderr)
            self.run_dirs[command] = sorted(p.parent for p in self._runs() - before)
        return self.results[command]

    def _runs(self) -> set[Path]:
        return set((self.clone / "outputs").rglob("run.json"))

    def ensure(self, need: str) -> None:
        """Make what a command needs: a file, the fake HOME's corpus, or another command's run."""
        if need in self.made:
            return
        self.made.add(need)
        if need == "~/corpus":
            corpus = self.home / "corpus"
            corpus.mkdir()
            sources = sorted(Path(json.__file__).parent.parent.glob("*.py"))[:20]
            for i, src in enumerate(sources):
                (corpus / f"doc{i:02d}.txt").write_text(src.read_text(encoding="utf-8"))
        elif need == ".venv":
            # `make` uses .venv as it is once its set-up stamp is newer than pyproject.toml.
            venv = self.clone / ".venv"
            venv.mkdir()
            for entry in Path(sys.prefix).iterdir():
                if entry.name != ".minigpt-setup":
                    (venv / entry.name).symlink_to(entry)
            (venv / ".minigpt-setup").touch()
        elif need == TINY_GPT2:
            _make_tiny_gpt2(self.clone / TINY_GPT2)
        elif need == STAND_INS:
            _make_wheelhouse_stand_ins(self.clone / STAND_INS)
        elif need == "prompt.py":
            (self.clone / "prompt.py").write_text("import os\n\n\ndef main(")
        elif need in PRODUCERS:
            result = self.run(PRODUCERS[need])
            assert result.returncode == 0, _tail(result)
        else:
            self.run(need)


# What makes each folder the README's commands name: the README command that writes it.
PRODUCERS = {
    RUN_DIR: "python train.py logger=wandb",
    "outputs/my_run": "python train.py hydra.run.dir=outputs/my_run train.max_steps=2000",
    "outputs/fsdp_run": FSDP_RUN,
    HF_EXPORT: f"python -m minigpt.export outputs/my_run/checkpoints/best.pt {HF_EXPORT}",
    "wheelhouse": WHEELHOUSE_BUILD,
    SWEEP_DIR: "python train.py -m model=tiny model.n_layer=1,2,3 train.max_steps=150 "
    "train.eval_every=50 'logger=[wandb,tensorboard]'",
}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _tail(result: Result) -> str:
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def documented() -> dict[str, Documented]:
    return readme_commands(README.read_text())


# ---------------------------------------------------------------- the tests


def test_every_readme_command_has_a_registry_entry(documented: dict[str, Documented]) -> None:
    new = sorted(set(documented) - set(REGISTRY))
    gone = sorted(set(REGISTRY) - set(documented))
    assert not new, (
        "README commands without an entry in REGISTRY of tests/docs/test_readme.py: add one that "
        "says how each is run and what it must do:\n" + "\n".join(new)
    )
    assert not gone, "REGISTRY entries whose command the README no longer has:\n" + "\n".join(gone)


def test_readme_extraction_joins_continuations_and_keeps_documented_output() -> None:
    text = (
        "```bash\n# a comment\npython a.py x=1 \\\n    y='#not' # note\n```\n"
        "```\n$ python b.py\nerror: b ...\n$ python c.py\n```\n"
    )
    found = readme_commands(text)
    assert list(found) == ["python a.py x=1 y='#not'", "python b.py", "python c.py"]
    assert found["python b.py"].output == ("error: b ...",)
    assert missing_documented_lines(("error: b ...", "in 2026-11-25/14-03-07"), "error: b x\n") == [
        "in 2026-11-25/14-03-07"
    ]
    assert not missing_documented_lines(("in 2026-11-25/14-03-07",), "  in 2031-01-02/03-04-05")


def _param(command: str) -> pytest.param:
    entry = REGISTRY[command]
    marks = entry.marks if isinstance(entry, Run) else ()
    return pytest.param(command, marks=marks, id=command[:70])


RUNS = [_param(c) for c, e in REGISTRY.items() if isinstance(e, Run)]


@pytest.mark.parametrize("command", RUNS)
def test_readme_command_runs_as_written(
    command: str, scratch: Scratch, documented: dict[str, Documented]
) -> None:
    entry = REGISTRY[command]
    assert isinstance(entry, Run)
    if pytest.mark.slurm in entry.marks:
        require_slurm_cluster("the README's SLURM commands")
    result = scratch.run(command)
    output = result.stdout + result.stderr
    assert result.returncode == entry.rc, _tail(result)
    for pattern in entry.expect:
        assert re.search(pattern, output, re.MULTILINE), f"{pattern!r} not in\n{_tail(result)}"
    lines = documented[command].output if command in documented else ()
    if entry.doc_lines:
        lines = tuple(line for line in lines if re.search(entry.doc_lines, line))
    missing = missing_documented_lines(lines, output)
    assert not missing, f"documented output not printed: {missing}\n{_tail(result)}"
    for pattern in entry.files:
        assert list(scratch.clone.glob(pattern)), f"no {pattern} after the run\n{_tail(result)}"
    made = scratch.run_dirs[command]
    if entry.new_runs is not None:
        assert len(made) == entry.new_runs, made
        for run_dir in made:
            assert _run_info(run_dir)["status"] == "completed", run_dir
    if entry.check:
        entry.check(made)


def test_run_again_resumes_the_finished_run(scratch: Scratch) -> None:
    """'Choose the run folder; run it again and it resumes from checkpoints/last.pt'."""
    command = "python train.py hydra.run.dir=outputs/my_run train.max_steps=2000"
    scratch.ensure("outputs/my_run")
    again = subprocess.run(
        ["bash", "-c", shrink(command, TINY)],
        cwd=scratch.clone,
        env=scratch.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is complete: step 2/2" in again.stdout + again.stderr


def _command_lines(text: str) -> list[str]:
    return [
        strip_comment(line).strip() for line in text.splitlines() if strip_comment(line).strip()
    ]


def _make_recipes(makefile: str, target: str, seen: set[str]) -> list[str]:
    """The recipe lines of ``target`` and of the targets it depends on, in the Makefile."""
    if target in seen:
        return []
    seen.add(target)
    lines, recipes = makefile.splitlines(), []
    for i, line in enumerate(lines):
        rule = re.match(rf"^{re.escape(target)}\s*:(?!=)(.*)$", line)
        if not rule:
            continue
        for dep in rule.group(1).split():
            recipes += _make_recipes(makefile, dep, seen)
        for body in lines[i + 1 :]:
            if not body.startswith("\t"):
                break
            recipes.append(body.strip())
    return recipes


def what_ci_runs() -> list[str]:
    """The command lines .ci/run runs: its own, its make targets' recipes, their scripts'."""
    makefile = (ROOT / "Makefile").read_text() if (ROOT / "Makefile").exists() else ""
    makefile = makefile.replace("$(STAMP)", "STAMP").replace("$(VENV)/bin/", "")
    makefile = re.sub(r"^\$\(STAMP\)", "STAMP", makefile, flags=re.MULTILINE)
    commands, seen = _command_lines(CI_SCRIPT.read_text()), set()
    for line in list(commands):
        for target in re.findall(r"^make ([\w-]+)", line):
            commands += _make_recipes(makefile, target, seen)
    scripts = {s for line in commands for s in re.findall(r"\b(scripts/[\w.-]+\.sh)\b", line)}
    for script in sorted(scripts):
        commands += _command_lines((ROOT / script).read_text())
    return commands


@pytest.mark.parametrize("command", [c for c, e in REGISTRY.items() if isinstance(e, ByCI)])
def test_readme_command_is_run_by_ci(command: str) -> None:
    entry = REGISTRY[command]
    assert isinstance(entry, ByCI) and entry.why
    ci_commands = what_ci_runs()
    for pattern in entry.ci_lines:
        assert any(re.search(pattern, line) for line in ci_commands), (
            f"{command!r} is said to be run by .ci/run, which has no line matching {pattern!r}"
        )
    if entry.check:
        entry.check()


@pytest.mark.parametrize("command", [c for c, e in REGISTRY.items() if isinstance(e, Offline)])
def test_readme_command_that_needs_the_network_is_checked_offline(
    command: str, scratch: Scratch
) -> None:
    entry = REGISTRY[command]
    assert isinstance(entry, Offline) and entry.why
    for need in entry.needs:
        scratch.ensure(need)
    entry.check(scratch.clone)


@pytest.mark.parametrize("command", [c for c, e in REGISTRY.items() if isinstance(e, Service)])
def test_readme_server_starts(command: str, scratch: Scratch) -> None:
    entry = REGISTRY[command]
    assert isinstance(entry, Service)
    for need in entry.needs:
        scratch.ensure(need)
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=scratch.clone,
        env=scratch.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seen, url = _wait_for(proc, entry.ready, timeout=120)
        assert url, f"no line matching {entry.ready!r} in 120 s:\n{seen}"
        assert _tensorboard_runs(url.rstrip("/"), timeout=60), "TensorBoard lists no run"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float) -> tuple[str, str | None]:
    """The output read until a line matches ``pattern`` (and the URL in it), or the timeout.

    A thread reads the lines: select() on a buffered pipe misses lines that arrived together
    with the one readline() returned (they wait in Python's buffer, not in the pipe)."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = "", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 1))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen += line
        if re.search(pattern, line):
            return seen, re.search(r"http://\S+", line).group(0)
    return seen, None


def _tensorboard_runs(url: str, timeout: float) -> list[str]:
    """The runs a TensorBoard server lists (it loads them in the background: poll)."""
    deadline = time.monotonic() + timeout
    runs: list[str] = []
    while time.monotonic() < deadline and not runs:
        with urllib.request.urlopen(f"{url}/data/runs", timeout=10) as response:
            runs = json.loads(response.read())
        time.sleep(0 if runs else 1)
    return runs
