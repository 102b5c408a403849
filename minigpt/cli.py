"""What the entry points share: one-line user errors, Hydra settings for follower ranks, and the
job's place in a sweep (for the trackers)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import filter_overrides
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from minigpt import distributed
from minigpt.checkpoint import CheckpointError
from minigpt.config import ConfigError, unknown_key_message
from minigpt.tracking import JobInfo

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, distributed.LaunchError)
EXIT_CTRL_C = 130  # the shell's 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `yes | head` leaves
EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


class JobFailed(Exception):  # noqa: N818 - the outcome of one job of a local sweep
    """A job of a local sweep failed, its error line already printed; the sweep goes on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[Any, ...]:  # submitit pickles it as the job's result
        return (JobFailed, (str(self), self.exit_code))


def _exit(message: str, exit_code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


class OneLineParser(argparse.ArgumentParser):
    """argparse for the ``python -m minigpt.*`` tools: a mistake is an ``error:`` line like
    every other failure (the usage follows it)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        self.print_usage(sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def fail(message: str, exit_code: int) -> NoReturn:
    """Print ``error: message`` and end this job.

    A job of a sweep raises JobFailed instead of exiting. Under Hydra's basic (local) launcher,
    Hydra records the exception and starts the next job, where an exit would end the whole sweep;
    under submitit, the exception is the job's result, which a launcher waiting for the sweep
    reads (an exit leaves no result, and without SLURM accounting it would wait for ever).
    """
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise JobFailed(message, exit_code)  # no exit: see above
    _exit(message, exit_code)


def user_errors_as_one_line(fn: F) -> F:
    """Print a user's mistake as one ``error: ...`` line and exit 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            fail(str(err), EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def run_main(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function; a command line Hydra cannot compose is one error line.

    Hydra reports an unknown key, a value of the wrong type or a missing config option on several
    lines. It re-raises instead when HYDRA_FULL_ERROR is set; we set it, catch Hydra's and
    OmegaConf's errors, and print them on one line (anything else keeps its full traceback).
    A user who sets HYDRA_FULL_ERROR=1 gets Hydra's own report.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except KeyboardInterrupt:
        _exit("stopped by Ctrl-C", EXIT_CTRL_C)
    except BrokenPipeError:
        # The reader went away (`generate.py ... | head`): stop quietly, as a pipeline's tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    except JobFailed as err:  # Hydra re-raises the first failure once every job has run
        _exit(f"a job of the sweep failed ({err}); the other jobs ran to their end", err.exit_code)
    except (HydraException, OmegaConfBaseException) as err:
        message = _override_message(err) or one_line(err)
        if any(word in message for word in ("LexerNoViableAlt", "mismatched input", "extraneous")):
            message += (
                "; a value holding spaces, brackets, commas, = or letters outside ASCII needs "
                """Hydra quotes inside the shell's, e.g. 'data.paths=["my notes/é.txt"]'"""
            )
        _exit(message, EXIT_USER_ERROR)
    except Exception as err:
        if not type(err).__module__.startswith("submitit"):
            raise
        # FailedJobError of a SLURM job, waited for by the launcher: its message holds the
        # job's whole traceback; the error line the job printed is the part worth showing.
        _exit(f"a SLURM job of the sweep failed: {_job_error(str(err))}", 1)


def _override_message(err: BaseException) -> str | None:
    """Our own line for the two mistakes a new user makes first: a mistyped key (Hydra advises
    ``+key=value``, which would only be refused later) and a list written without brackets."""
    cause, first = err.__cause__, str(err).splitlines()[0] if str(err) else ""
    key, schema = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if not key:
        return None
    typed = re.match(r"Could not override '([^']+)'", first)
    unknown = isinstance(cause, (ConfigKeyError, ConfigAttributeError))
    if typed and unknown and dataclasses.is_dataclass(schema):
        return unknown_key_message(key, schema, typed.group(1))
    given = re.match(r"Error merging override ([^=]+)=(.*)", first)
    if given and isinstance(cause, ValidationError) and "is not a ListConfig" in str(cause):
        example = _as_list(given.group(1), given.group(2))
        return f"{key} is a list; write it in brackets, e.g. {example}"
    return None


def _as_list(key: str, value: str) -> str:
    """``key=value`` as a one-item list, in the shell's quotes (and Hydra's, for text)."""
    try:
        float(value)
        item = value
    except ValueError:
        item = '"' + value.strip("'\"").replace('"', '\\"') + '"'
    return f"'{key}=[{item}]'"


def _job_error(message: str) -> str:
    """The ``error: ...`` line inside a submitit failure message, else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    ours = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    jobs = re.findall(r"[Jj]ob (\d+(?:_\d+)?)", message)
    where = f" (job {jobs[0]})" if jobs else ""
    return (ours[-1] if ours else (lines[0] if lines else "no message")) + where


def one_line(err: BaseException) -> str:
    """Hydra's message and its causes on one line, without OmegaConf's object dumps."""
    messages, seen = [], err
    while seen is not None and len(messages) < 4:
        messages.append(str(seen).split("Config search path:")[0])
        seen = seen.__cause__
    parts: list[str] = []
    for raw in "\n".join(messages).splitlines():
        line = raw.strip()
        if not line or line.startswith(("full_key:", "reference_type=", "object_type=")):
            continue
        if line in parts:
            continue
        if raw.startswith("\t") and parts:  # Hydra's list of available options
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        else:
            parts.append(line.rstrip("."))
    return "; ".join(parts)


def follower_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that keep ranks other than 0 from making run folders of their own.

    Under torchrun or srun every rank runs ``train.py``; each Hydra would make its own
    timestamped folder. Followers write nothing and are told rank 0's folder by the trainer.
    """
    try:
        rank = distributed.detect().rank
    except distributed.LaunchError:
        return []  # the trainer reports it, as one line, once Hydra has started
    if rank == 0 or any(a.startswith(("-m", "--multirun")) for a in argv):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def hydra_record(cfg: DictConfig, hydra_cfg: DictConfig) -> dict[str, str]:
    """The files Hydra keeps in ``.hydra/``, for the trainer to write once the folder is ours.

    ``conf/config.yaml`` sets ``hydra.output_subdir: null``: Hydra would write them before any of
    our code runs, over the record of a run that already lives in the folder.
    """
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
    }


def job_info(hydra_cfg: DictConfig) -> JobInfo:
    """How trackers name this run: the jobs of one multirun share a group named after the sweep
    folder, and each is named by the values it was given of the swept keys."""
    overrides = filter_overrides(list(hydra_cfg.overrides.task))
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return JobInfo(name=" ".join(overrides) or None)
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    swept = _swept_keys(sweep_dir, hydra_cfg)
    own = [o for o in overrides if _key(o) in swept]
    name = " ".join(own or overrides) or f"job {hydra_cfg.job.num}"
    return JobInfo(name=name, group=_short_path(sweep_dir))


def _swept_keys(sweep_dir: Path, hydra_cfg: DictConfig) -> set[str]:
    """Keys given several values: on the command line (kept by Hydra's basic sweeper in
    ``multirun.yaml``) or in ``hydra.sweeper.params`` (the named sweeps of ``sweeps/``)."""
    params = OmegaConf.to_container(hydra_cfg.sweeper, resolve=False).get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    saved = sweep_dir / "multirun.yaml"
    if saved.exists():  # unresolved: an override may hold a ${...} that only the job resolves
        task = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task")
        lines += OmegaConf.to_container(task, resolve=False) if task is not None else []
    parser = OverridesParser.create()
    swept = set()
    for line in lines:
        with contextlib.suppress(HydraException):  # naming a run must never fail the run
            override = parser.parse_override(str(line))
            if override.is_sweep_override():
                swept.add(override.key_or_group)
    return swept


def _key(override: str) -> str:
    return OverridesParser.create().parse_override(override).key_or_group


def _short_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it: the folder a user recognises."""
    resolved = path.resolve()
    try:
        shown = str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(resolved)
    return shown[-128:]  # W&B group names are at most 128 characters


def quote_free_text(
    argv: list[str], keys: tuple[str, ...], paths: tuple[str, ...] = ()
) -> list[str]:
    """Quote free text (prompts) and file names for Hydra, so each reaches the config as typed.

    The shell strips the user's quotes; Hydra's override grammar rejects ``(``, ``,``, ``[`` and
    more in a bare value, and OmegaConf would resolve ``${...}`` in it. Each value of ``keys``
    or ``paths`` becomes a quoted override whose text is the literal value. A value already in
    Hydra quotes (``'prompt="x"'``, or ``'x','y'`` for a sweep) keeps Hydra's reading of its
    quotes, and is made literal the same way. A bare ``null`` of ``paths`` stays unset.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~")
        if sep and (name in keys or (name in paths and value != "null")):
            texts = _hydra_quoted(value)
            arg = f"{key}=" + ",".join(_literal(text) for text in texts or [value])
        out.append(arg)
    return out


def quote_paths(argv: list[str], paths: tuple[str, ...]) -> list[str]:
    """Quote the file names among ``paths`` that Hydra's grammar would not read as typed
    (``,`` ``[ ]`` ``=`` spaces, a leading ``~``), so ``hydra.run.dir=runs/a,b`` is that folder.
    A value Hydra reads as itself is left alone, and so is a comma under ``-m`` (a sweep)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if (
            sep
            and key.lstrip("+~") in paths
            and not _read_as_typed(value)
            and not (multirun and "," in value)
        ):
            arg = quote_free_text([arg], keys=(), paths=paths)[0]
        out.append(arg)
    return out


def _read_as_typed(value: str) -> bool:
    try:
        parsed = OverridesParser.create().parse_override(f"key={value}").value()
    except HydraException:
        return False
    return parsed == value


def _literal(text: str) -> str:
    """A Hydra quoted value that OmegaConf reads back as exactly ``text``."""
    # OmegaConf reads `\${` as a literal `${` and unescapes backslashes only before a `${`: n
    # backslashes then `${` are written 2n + 1 backslashes then `${`. Inside quotes, Hydra then
    # unescapes only backslashes before a quote or at the very end (\Z: `$` matches before a
    # final newline too), and escaped quotes.
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r"(\\+)(?='|\Z)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def _hydra_quoted(value: str) -> list[str] | None:
    """The texts of a value the user put in Hydra quotes (one, or several for a sweep)."""
    from hydra.core.override_parser.types import ChoiceSweep, QuotedString

    if value[:1] not in ("'", '"'):
        return None
    try:
        parsed = OverridesParser.create().parse_override(f"key={value}").value()
    except HydraException:
        return None  # text that merely starts with a quote, like `'a' or 'b'`
    if isinstance(parsed, str):  # Hydra's grammar: a value opening with a quote is one string
        return [parsed]
    quoted = isinstance(parsed, ChoiceSweep) and parsed.simple_form
    if quoted and all(isinstance(item, QuotedString) for item in parsed.list):
        return [item.text for item in parsed.list]
    return None
