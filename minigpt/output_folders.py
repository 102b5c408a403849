"""The folders Hydra makes before any of our code runs: checked before, taken back if unused.

Hydra creates the run folder (``outputs/DATE/TIME``), a sweep's folder and each job's folder
before ``train.py`` has read its config. A run refused at start-up (``model.n_head=5``), a job
refused inside a local sweep, and a dry run would leave them behind, empty, and the sweep report
would list each as a pending run. This callback notes which folders did not exist yet, and when
the job or the process ends removes those of them still empty. It never removes a folder that
existed before, nor one that holds anything (a file the run wrote, another run's files).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

EXIT_USER_ERROR = 2
SWEEP_RECORD = "multirun.yaml"  # what Hydra's sweeper writes into the sweep folder first


class OutputFolders(Callback):
    """Refuse an unwritable output folder in one line; remove the folders a refused run made."""

    def __init__(self) -> None:
        self._ours: list[Path] = []  # folders this process made, parents first
        self._sweep: Path | None = None
        self._sweep_had: set[str] = set()  # what the sweep folder held before this sweep
        self._pid = os.getpid()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``hydra.run.dir`` (the run folder of ``python train.py``)."""
        self._take("hydra.run.dir", str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``hydra.sweep.dir`` (the folder of all the jobs of ``-m``)."""
        self._sweep = Path(str(config.hydra.sweep.dir)).absolute()
        with contextlib.suppress(OSError):
            self._sweep_had = {entry.name for entry in self._sweep.iterdir()}
        self._take("hydra.sweep.dir", str(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A job of a local sweep that left its new folder empty (it was refused) removes it."""
        if self._sweep is None or os.getpid() != self._pid:
            return  # a single run tidies at exit; a SLURM job runs in a process of its own
        try:
            parts = Path(str(config.hydra.runtime.output_dir)).relative_to(self._sweep).parts
        except ValueError:
            return
        if parts and parts[0] not in self._sweep_had:
            _remove_empty(self._sweep.joinpath(*parts[:n]) for n in range(len(parts), 0, -1))

    def _take(self, key: str, folder: str) -> None:
        path = Path(folder).absolute()
        self._ours = [p for p in (path, *path.parents) if not p.exists()][::-1]
        atexit.register(self._tidy)
        _check_writable(key, folder)

    def _tidy(self) -> None:
        """At exit: a sweep folder that holds only Hydra's record of it goes (a dry run, or
        every job refused), then the folders this process made that are still empty."""
        if os.getpid() != self._pid:
            return  # a forked child exiting: the folders are its parent's to take back
        sweep = self._sweep
        if sweep is not None and sweep in self._ours:
            with contextlib.suppress(OSError):
                if [e.name for e in sweep.iterdir()] == [SWEEP_RECORD]:
                    (sweep / SWEEP_RECORD).unlink()
        _remove_empty(reversed(self._ours))


def _remove_empty(folders: Iterable[Path]) -> None:
    """rmdir each folder, deepest first: it fails, and so keeps the folder, unless empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_writable(key: str, folder: str) -> None:
    """Hydra would otherwise end in a traceback from inside itself on a read-only or mistyped
    folder (a file where a folder should be)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        print(
            f"error: {key}={folder} cannot be written ({reason}: {err.filename or folder}); "
            f"give a folder you can write to, e.g. {key}=outputs/my_run",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_USER_ERROR)
