"""The GPU suite (issue 13): every CUDA path of minigpt, on a machine with a GPU.

    python -m pytest tests/gpu -m gpu                  on a CUDA machine (sized for ~3 minutes)
    MINIGPT_GPU_DRY_RUN=1 python -m pytest tests/gpu   the same tests on CPU (see suite.py)

Never part of ``make test`` or CI: tests/conftest.py collects tests/gpu only when it is asked for.

The tests read runs of ``train.py`` started as users start them (subprocesses, the tiny model, a
local corpus). They all start when the suite does, side by side, so that the tests wait for the
longest of them rather than for their sum; only the runs the selected tests use are started.
MINIGPT_GPU_SUITE_JOBS (default: all of them at once) caps how many run at a time.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.suite import DRY_RUN, JOBS, Background, Run, write_alphabet_corpus


@pytest.fixture(scope="session", autouse=True)
def background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background]:
    root = tmp_path_factory.mktemp("gpu")
    write_alphabet_corpus(root / "corpus")
    used = {name for item in request.session.items for name in item.fixturenames}
    wanted = [name for name, (_, dry) in JOBS.items() if name in used and (dry or not DRY_RUN)]
    jobs = int(os.environ.get("MINIGPT_GPU_SUITE_JOBS") or max(1, len(wanted)))
    bg = Background(root, jobs)
    for name in wanted:
        bg.start(name, JOBS[name][0])
    yield bg
    bg.close()


@pytest.fixture(scope="session")
def bf16_run(background: Background) -> Run:
    return background.result("bf16_run").succeeded()


@pytest.fixture(scope="session")
def fp16_run(background: Background) -> Run:
    return background.result("fp16_run").succeeded()


@pytest.fixture(scope="session")
def compiled_run(background: Background) -> Run:
    return background.result("compiled_run").succeeded()


@pytest.fixture(scope="session")
def resume_reference(background: Background) -> Run:
    return background.result("resume_reference").succeeded()


@pytest.fixture(scope="session")
def interrupted_runs(background: Background) -> tuple[Run, Run]:
    return background.result("interrupted_runs")


@pytest.fixture(scope="session")
def process_group(background: Background) -> tuple[subprocess.CompletedProcess[str], Path]:
    return background.result("process_group")
