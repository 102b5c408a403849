#!/usr/bin/env python3
"""Hostile pass: run minigpt's entry points the way a hostile (or careless) user would.

    python scripts/hostile_pass.py [-k SUBSTRING] [--jobs N] [--base DIR] [--keep] [--list]

Every case runs in its own folder, ``BASE/<pass>/cases/NNN-name`` (BASE defaults to
/tmp/hostile): a short setup (a Python function), one command (a subprocess with a timeout, an
offline environment, ``data.cache_dir`` inside the case folder or a cache shared by the pass),
and a check that returns ``(ok, outcome)``. The pass prints a Markdown table

    | # | class | case | command | expected | outcome | verdict |

and ends with ``N passed, N failed`` alone on the last line (cases that cannot run on this
machine are SKIP and counted on the line before). The table also goes to ``BASE/table.md``.
Exit status: 0 when no case failed, else 1. ``-k`` keeps the cases whose "class case" text holds
SUBSTRING (case-insensitive; several -k: any of them); ``--jobs`` runs that many cases at once
(default 1: a tiny training run already uses two cores).

In the command column ``$TINY`` stands for the overrides of a few-second run, those of
tests/conftest.py ``tiny_train_args`` plus ``train.max_steps=6 train.eval_every=0 logger=jsonl``
(the shared 20-file alphabet corpus and cache unless the case says otherwise); ``$BASE`` is
``$TINY train.ckpt_every=2 train.keep_last=3``, the command of the pass's base run (checkpoints
at steps 2, 4, 6), which many cases copy into their folder first. ``$CASE`` is the case's
folder, ``$SHARED`` the pass's shared folder.

Verdict rules:

* Bad input is refused when the exit code is 1 or 2, stderr holds exactly ONE line starting
  with ``error:``, there is no ``Traceback``, the words the case names are in that line, and,
  where the case hashed the user's files before (checkpoints/, metrics.jsonl, run.json of a
  run folder, or the named files), they are byte-identical after.
* Good input works when the exit code is 0 (or the signal convention, 128+N), with no
  ``Traceback`` and no ``error:`` line, plus the case's own checks.
* "works or refused" cases accept either, but never a traceback or a hang.
* A timeout is a hang and fails; the one exception is ``train.eval_steps=1000000`` (with
  ``train.max_steps=1``, under RLIMIT_AS 4 GB): a run still going at its timeout, without a
  traceback and below the memory limit, passes as "slow but bounded" (its peak RSS is shown).
* A case that crashes the harness, or whose setup fails, is a failure, never the end of the pass.

Memory limits are RLIMIT_AS set in the child (``preexec_fn``); a tiny tmpfs for the full-disk case
needs ``mount`` as root, and the case is SKIP when mounting fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

PY = sys.executable
TRACEBACK = "Traceback (most recent call last)"
GB = 2**30
ALPHABET_LINE = "abcdefghijklmnopqrstuvwxyz\n"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
LAUNCHER_VARS += ("MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
# The overrides of a few-second run (tests/conftest.py tiny_train_args + a short schedule).
TINY_DEFAULTS = {
    "model": "tiny",
    "data": "text",
    "data.paths": None,  # filled per case
    "data.cache_dir": None,
    "data.num_proc": "1",
    "hydra.run.dir": None,
    "train.batch_size": "8",
    "train.eval_steps": "4",
    "train.log_every": "5",
    "train.device": "cpu",
    "optimizer.warmup_steps": "10",
    "train.max_steps": "6",
    "train.eval_every": "0",
    "logger": "jsonl",
}
BASE_EXTRA = ("train.ckpt_every=2", "train.keep_last=3")  # the base run: steps 2, 4, 6 kept
SLOW = ("train.batch_size=64", "train.log_every=1", "train.progress=lines")  # ~0.3 s a step


class SetupFailed(Exception):  # noqa: N818 - the case's own preparation did not work
    """The case could not be prepared; the case fails with this message."""


class Skip(Exception):  # noqa: N818 - not an error: this machine cannot run the case
    """The machine lacks what the case needs (e.g. mount); the case is SKIP."""


# ---- processes ---------------------------------------------------------------------------------


@dataclass
class Res:
    """A finished command."""

    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool = False
    peak_rss_kb: int = 0
    notes: list[str] = field(default_factory=list)
    others: list[Res] = field(default_factory=list)  # the other processes of a parallel command

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def traceback(self) -> bool:
        return TRACEBACK in self.err or TRACEBACK in self.out


@dataclass
class Live:
    """What a signal condition can look at while the command runs."""

    out: Path
    err: Path
    started: float

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""


Cond = Callable[[Live], bool]


@dataclass
class Cmd:
    """One command of a case: argv, environment changes (None: unset), limits and signals."""

    argv: list[str]
    shown: str
    env: dict[str, str | None] = field(default_factory=dict)
    cwd: Path | None = None
    timeout: float = 120
    mem_gb: float | None = None
    signals: list[tuple[Cond, int]] = field(default_factory=list)
    parallel: int = 1
    close_stdout_after: int | None = None  # read this many bytes, then close the pipe (SIGPIPE)


_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()


def _limit_memory(gb: float) -> Callable[[], None]:
    def limit() -> None:
        n = int(gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (n, n))

    return limit


def _vmhwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _signame(sig: int) -> str:
    return signal.Signals(sig).name


def _tail(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# ---- the shared resources of a pass -----------------------------------------------------------


class Shared:
    """What many cases use, built once per pass: corpus, cache, base run, export, big corpus."""

    def __init__(self, folder: Path, repo: Path, py: str) -> None:
        self.dir, self.repo, self.py = folder, repo, py
        self.corpus = folder / "corpus"
        self.cache = folder / "cache"
        self.base_run = folder / "base_run"
        self.export = folder / "model.safetensors"
        self.big = folder / "bigcorpus"
        self._locks: dict[str, threading.Lock] = {}
        self._done: dict[str, str | None] = {}  # name -> None (ok) or the error
        self._guard = threading.Lock()

    def need(self, name: str) -> None:
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._done:
                try:
                    getattr(self, f"_make_{name}")()
                    self._done[name] = None
                except Exception as err:  # noqa: BLE001 - recorded for every case that needs it
                    self._done[name] = f"{type(err).__name__}: {err}"
            if self._done[name] is not None:
                raise SetupFailed(f"shared {name}: {self._done[name]}")

    def _make_corpus(self) -> None:
        self.corpus.mkdir(parents=True, exist_ok=True)
        for i in range(20):
            (self.corpus / f"doc{i:02d}.txt").write_text(ALPHABET_LINE * 40)

    def _make_base(self) -> None:
        self.need("corpus")
        c = Ctx(self.dir / "make_base", self, 0)
        r = c.run(c.train(*BASE_EXTRA, run=self.base_run))
        if r.rc != 0 or not (self.base_run / "checkpoints" / "last.pt").is_file():
            raise SetupFailed(f"base run: {summary(r)}")

    def _make_export(self) -> None:
        self.need("base")
        c = Ctx(self.dir / "make_export", self, 0)
        r = c.run(c.export(str(self.base_run / "checkpoints" / "last.pt"), str(self.export)))
        if r.rc != 0 or not self.export.is_file():
            raise SetupFailed(f"export: {summary(r)}")

    def _make_big(self) -> None:
        """About 10 MB in 1200 files: its cache takes seconds to build, time to signal it."""
        self.big.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "def", "return", "x", "y", "(", ")", ":", "\n"]
        for i in range(1200):
            text = " ".join(rng.choice(words) for _ in range(1400))
            (self.big / f"d{i:04d}.txt").write_text(text)


# ---- a case's context ---------------------------------------------------------------------------


class Ctx:
    """One case's folder, its commands and what its setup leaves for its check."""

    def __init__(self, folder: Path, shared: Shared, index: int) -> None:
        self.dir = folder
        self.shared = shared
        self.index = index
        self.cwd = folder / "cwd"  # the commands' working directory: empty unless a case fills it
        self.logs = folder / "logs"
        self.home = folder / "home"
        for d in (self.cwd, self.logs, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, object] = {}
        self.shown: str = ""
        self._snaps: dict[str, dict[str, str]] = {}
        self._bg: list[subprocess.Popen] = []
        self._cleanups: list[Callable[[], None]] = []
        self._n = 0

    def p(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # -- building commands
    def tiny(
        self,
        *extra: str,
        run: str | Path = "run",
        corpus: Path | None = None,
        cache: Path | None = None,
        drop: tuple[str, ...] = (),
    ) -> list[str]:
        """The overrides of a few-second run; ``extra`` replaces a default of the same key."""
        values = dict(TINY_DEFAULTS)
        values["data.paths"] = f"[{corpus or self.shared.corpus}/*.txt]"
        values["data.cache_dir"] = str(cache or self.shared.cache)
        values["hydra.run.dir"] = str(run if isinstance(run, Path) else self.p(run))
        out = []
        given = {_key(e) for e in extra}
        for key, value in values.items():
            if key not in given and key not in drop:
                out.append(f"{key}={value}")
        return out + list(extra)

    def train(
        self,
        *extra: str,
        run: str | Path = "run",
        corpus: Path | None = None,
        cache: Path | None = None,
        drop: tuple[str, ...] = (),
        **kw: object,
    ) -> Cmd:
        argv = [self.shared.py, str(self.shared.repo / "train.py")]
        argv += self.tiny(*extra, run=run, corpus=corpus, cache=cache, drop=drop)
        shown = "train.py $TINY"
        if run != "run":
            shown += f" hydra.run.dir={run if isinstance(run, Path) else self.p(run)}"
        if corpus is not None:
            shown += f" (corpus {corpus})"
        if cache is not None:
            shown += f" data.cache_dir={cache}"
        if drop:
            shown += " (without " + ", ".join(drop) + ")"
        return Cmd(argv, " ".join([shown, *extra]), **kw)  # type: ignore[arg-type]

    def base(self, *extra: str, **kw: object) -> Cmd:
        """The base run's own command (for its copy in ``$CASE/run``), with ``extra``."""
        extra_keys = {_key(e) for e in extra}
        args = [e for e in BASE_EXTRA if _key(e) not in extra_keys] + list(extra)
        cmd = self.train(*args, **kw)  # type: ignore[arg-type]
        cmd.shown = " ".join(["train.py $BASE", *extra])
        return cmd

    def gen(self, *args: str, **kw: object) -> Cmd:
        values = {
            "checkpoint": str(self.shared.base_run / "checkpoints" / "last.pt"),
            "max_tokens": "8",
            "device": "cpu",
        }
        given = {_key(a) for a in args}
        argv = [f"{k}={v}" for k, v in values.items() if k not in given] + list(args)
        default = [] if "checkpoint" in given else ["checkpoint=$SHARED/base_run/.../last.pt"]
        shown = " ".join(["generate.py", *default, *args])
        return Cmd([self.shared.py, str(self.shared.repo / "generate.py"), *argv], shown, **kw)  # type: ignore[arg-type]

    def export(self, *args: str, **kw: object) -> Cmd:
        argv = [self.shared.py, "-m", "minigpt.export", *args]
        return Cmd(argv, "python -m minigpt.export " + " ".join(args), **kw)  # type: ignore[arg-type]

    def report(self, *args: str, **kw: object) -> Cmd:
        argv = [self.shared.py, "-m", "minigpt.report", *args]
        return Cmd(argv, "python -m minigpt.report " + " ".join(args), **kw)  # type: ignore[arg-type]

    def python(self, code: str, *args: str) -> Res:
        """A helper snippet (e.g. crafting a checkpoint with torch); fails the setup if it fails."""
        r = self.run(Cmd([self.shared.py, "-c", code, *args], "python -c ...", timeout=120))
        if r.rc != 0:
            raise SetupFailed(f"helper snippet: {summary(r)} {r.err[-300:]}")
        return r

    # -- running
    def env(self, changes: dict[str, str | None]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SUBMITIT_", "MINIGPT_", "WANDB_", "HYDRA_"))
            and k not in LAUNCHER_VARS
        }
        env.update(
            {
                "WANDB_MODE": "offline",
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONPATH": str(self.shared.repo),
                "HOME": str(self.home),
                "MINIGPT_CACHE_DIR": str(self.p("envcache")),
                "TQDM_DISABLE": "1",
            }
        )
        for k, v in changes.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def _popen(self, cmd: Cmd, tag: str) -> tuple[subprocess.Popen, Path, Path]:
        out, err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
        stdout = subprocess.PIPE if cmd.close_stdout_after is not None else out.open("wb")
        with err.open("wb") as ferr:
            proc = subprocess.Popen(
                cmd.argv,
                cwd=cmd.cwd or self.cwd,
                env=self.env(cmd.env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=ferr,
                start_new_session=True,
                preexec_fn=_limit_memory(cmd.mem_gb) if cmd.mem_gb else None,
            )
        if stdout is not subprocess.PIPE:
            stdout.close()
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc)
        return proc, out, err

    def run(self, cmd: Cmd) -> Res:
        """Run ``cmd`` to its end (or its timeout), sending its signals when their time comes."""
        self._n += 1
        self.shown = _env_shown(cmd.env) + cmd.shown
        started = time.monotonic()
        procs = [self._popen(cmd, f"{self._n}.{i}") for i in range(cmd.parallel)]
        main, out, err = procs[0]
        live = Live(out, err, started)
        piped: list[bytes] = []
        if cmd.close_stdout_after is not None:

            def read_then_close() -> None:
                assert main.stdout is not None
                piped.append(main.stdout.read(cmd.close_stdout_after or 1))
                main.stdout.close()

            threading.Thread(target=read_then_close, daemon=True).start()
        pending = list(cmd.signals)
        notes: list[str] = []
        peak = 0
        timed_out = False
        deadline = started + cmd.timeout
        try:
            while True:
                alive = [p for p, _, _ in procs if p.poll() is None]
                if not alive:
                    break
                peak = max([peak, *(_vmhwm_kb(p.pid) for p in alive)])
                if pending and main.poll() is None and pending[0][0](live):
                    _, sig = pending.pop(0)
                    main.send_signal(sig)
                    notes.append(f"sent {_signame(sig)} at {live.elapsed():.1f}s")
                if time.monotonic() > deadline:
                    timed_out = True
                    for p in alive:
                        _kill_group(p)
                    break
                time.sleep(0.05)
        finally:
            for p, _, _ in procs:
                _kill_group(p)  # strays of the process group (compile workers, map workers)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
                with _ACTIVE_LOCK:
                    _ACTIVE.discard(p)
        for _, sig in pending:
            notes.append(f"exited before {_signame(sig)} could be sent")
        results = []
        for p, o, e in procs:
            text = piped[0].decode(errors="replace") if piped and p is main else _tail(o)
            results.append(
                Res(
                    rc=None if timed_out and p.returncode in (None, -9) else p.returncode,
                    out=text,
                    err=_tail(e),
                    seconds=time.monotonic() - started,
                    timed_out=timed_out,
                    peak_rss_kb=peak,
                )
            )
        first = results[0]
        first.notes, first.others = notes, results[1:]
        return first

    def spawn(self, cmd: Cmd) -> tuple[subprocess.Popen, Path, Path]:
        """Start ``cmd`` in the background; it is killed when the case ends."""
        self._n += 1
        proc, out, err = self._popen(cmd, f"{self._n}.bg")
        self._bg.append(proc)
        return proc, out, err

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str, proc=None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if proc is not None and proc.poll() is not None:
                raise SetupFailed(f"{what}: the process ended first (rc={proc.returncode})")
            time.sleep(0.05)
        raise SetupFailed(f"{what}: not within {timeout:.0f}s")

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def cleanup(self) -> None:
        for proc in self._bg:
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with _ACTIVE_LOCK:
                _ACTIVE.discard(proc)
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()

    # -- files
    def copy_base(self, name: str = "run") -> Path:
        self.shared.need("base")
        dst = self.p(name)
        shutil.copytree(self.shared.base_run, dst, symlinks=True)
        return dst

    def copy_corpus(self, name: str = "corpus") -> Path:
        self.shared.need("corpus")
        dst = self.p(name)
        shutil.copytree(self.shared.corpus, dst)
        return dst

    def snap(self, *paths: Path, run: str | None = "run") -> None:
        """Hash the run's checkpoints/, metrics.jsonl, run.json (and ``paths``) for later."""
        files: list[Path] = list(paths)
        if run is not None:
            folder = self.p(run)
            files += [folder / "metrics.jsonl", folder / "run.json"]
            files += sorted((folder / "checkpoints").glob("*"))
        self._snaps["files"] = {str(f): _hash(f) for f in files}
        if run is not None:
            self.data["snap_ckpt_dir"] = str(self.p(run, "checkpoints"))

    def changed(self) -> list[str]:
        problems = self._changed()
        return problems[:3] + ([f"(+{len(problems) - 3} more)"] if len(problems) > 3 else [])

    def _changed(self) -> list[str]:
        """What differs from the snapshot: changed, deleted or (in checkpoints/) added files."""
        before = self._snaps.get("files", {})
        problems = []
        for name, digest in before.items():
            now = _hash(Path(name))
            if now == "missing" and self.data.get("moved_ok"):
                moved = [
                    f for f in self.dir.rglob(Path(name).name) if f.is_file() and _hash(f) == digest
                ]
                if moved:
                    self.data.setdefault("moved", []).append(self._short(str(moved[0])))  # type: ignore[union-attr]
                    continue
            if now != digest:
                what = "deleted" if now == "missing" else "changed"
                problems.append(f"{self._short(name)} {what}")
        ckpt_dir = self.data.get("snap_ckpt_dir")
        if ckpt_dir:
            for f in sorted(Path(str(ckpt_dir)).glob("*")):
                if str(f) not in before and not f.name.startswith("."):
                    problems.append(f"{self._short(str(f))} added")
        return problems

    def _short(self, text: str) -> str:
        return text.replace(str(self.dir), "$CASE").replace(str(self.shared.dir), "$SHARED")


def _env_shown(env: dict[str, str | None]) -> str:
    """``K=V`` prefixes of a command's environment changes (``env -u K``: unset)."""
    if not env:
        return ""
    parts = [f"-u {k}" if v is None else f"{k}={v}" for k, v in env.items()]
    prefix = "env " if any(v is None for v in env.values()) else ""
    return prefix + " ".join(parts) + " "


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _hash(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "dangling:" + os.readlink(path)
    if path.is_dir():
        return "dir"
    if not path.exists():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- checks ----------------------------------------------------------------------------------

Check = Callable[[Ctx, Res], tuple[bool, str]]


def _exception_line(text: str) -> str:
    """The exception line of the last traceback in ``text`` (e.g. ``ValueError: ...``)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if TRACEBACK in line)
    tops = [ln for ln in lines[start + 1 :] if ln and not ln.startswith((" ", "\t"))]
    named = [ln for ln in tops if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", ln)]
    return ((named or tops or lines)[-1 if named else 0])[:220]


def summary(r: Res) -> str:
    """One short line: exit status, error line or traceback, notes."""
    parts = [f"timed out after {r.seconds:.0f}s" if r.timed_out else f"rc={r.rc}"]
    errors = r.errors()
    if r.traceback():
        parts.append("Traceback: " + _exception_line(r.err if TRACEBACK in r.err else r.out))
    if errors:
        more = f" (+{len(errors) - 1} more error: lines)" if len(errors) > 1 else ""
        parts.append(errors[0][:240] + more)
    if r.peak_rss_kb and (r.timed_out or r.peak_rss_kb > 3 * 2**20):
        parts.append(f"peak RSS {r.peak_rss_kb / 2**20:.2f} GB")
    parts += r.notes
    return "; ".join(parts)


def refusal_problems(r: Res, needles: tuple[str, ...] = ()) -> list[str]:
    if r.timed_out:
        return ["hung (timeout)"]
    problems = []
    if r.rc not in (1, 2):
        problems.append(f"exit {r.rc}, expected 1 or 2")
    if r.traceback():
        problems.append("traceback")
    errors = r.errors()
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' lines on stderr, expected 1")
    if errors:
        low = errors[0].lower()
        missing = [n for n in needles if n.lower() not in low]
        if missing:
            problems.append("error line lacks " + ", ".join(repr(m) for m in missing))
    return problems


def success_problems(r: Res, rc: int = 0) -> list[str]:
    if r.timed_out:
        return ["hung (timeout)"]
    problems = []
    if r.rc != rc:
        problems.append(f"exit {r.rc}, expected {rc}")
    if r.traceback():
        problems.append("traceback")
    if r.errors():
        problems.append("an 'error:' line")
    return problems


def verdict(r: Res, problems: list[str], note: str = "") -> tuple[bool, str]:
    text = summary(r) + (f"; {note}" if note else "")
    if problems:
        text = "FAILED: " + "; ".join(problems) + " -- " + text
    return not problems, text


def verdict_with(c: Ctx, r: Res, problems: list[str], extra: Check | None) -> tuple[bool, str]:
    """The verdict once ``extra`` (a check of its own) has had its say: a failure is a problem,
    a pass adds its note."""
    note = ""
    if extra is not None:
        ok, note = extra(c, r)
        if not ok:
            problems.append(note)
            note = ""
    return verdict(r, problems, note)


def refused(*needles: str, intact: bool = False, extra: Check | None = None) -> Check:
    """Exit 1/2, one ``error:`` line holding ``needles``, no traceback, files intact."""

    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        problems = refusal_problems(r, needles)
        if intact:
            problems += c.changed()
        return verdict_with(c, r, problems, extra)

    return check


def works(*needles: str, rc: int = 0, extra: Check | None = None) -> Check:
    """Exit ``rc``, no traceback, no error line, ``needles`` in stdout+stderr."""

    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        problems = success_problems(r, rc)
        low = r.text.lower()
        problems += [f"output lacks {n!r}" for n in needles if n.lower() not in low]
        return verdict_with(c, r, problems, extra)

    return check


def works_or_refused(*needles: str, intact: bool = False, extra: Check | None = None) -> Check:
    """Either runs (exit 0) or is refused in one line (holding ``needles``); never a traceback."""

    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        problems = success_problems(r) if r.rc == 0 else refusal_problems(r, needles)
        if intact and r.rc != 0:
            problems += c.changed()
        return verdict_with(c, r, problems, extra)

    return check


def _metrics_steps(path: Path, key: str | None = None) -> list[int]:
    """The steps of the events of a metrics.jsonl (those holding ``key``, when given)."""
    steps = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                event = json.loads(line)
                wanted = key is None or (isinstance(event, dict) and key in event)
                if wanted and isinstance(event, dict) and isinstance(event.get("step"), int):
                    steps.append(event["step"])
    return steps


def _run_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _step_files(folder: Path) -> list[int]:
    return sorted(
        int(p.stem.removeprefix("step_"))
        for p in folder.glob("step_*.pt")
        if p.stem.removeprefix("step_").isdigit()
    )


def _valid_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def logged(c: Ctx, step: int, run: str = "run") -> Cond:
    """True once the run's metrics.jsonl holds ``step``."""
    return lambda live: max(_metrics_steps(c.p(run, "metrics.jsonl")), default=-1) >= step


def appears(folder: Path, pattern: str) -> Cond:
    return lambda live: folder.is_dir() and any(folder.glob(pattern))


def after(cond: Cond, seconds: float) -> Cond:
    """``cond``, then ``seconds`` more (a second signal a moment after the first)."""
    seen: list[float] = []

    def check(live: Live) -> bool:
        if not seen and cond(live):
            seen.append(live.elapsed())
        return bool(seen) and live.elapsed() >= seen[0] + seconds

    return check


def run_finished_at(c: Ctx, step: int, run: str = "run") -> Check:
    def check(_: Ctx, r: Res) -> tuple[bool, str]:
        info = _run_json(c.p(run, "run.json"))
        steps = info.get("steps")
        ok = steps == step and info.get("status") == "completed"
        return ok, f"run.json: steps={steps}, status={info.get('status')}"

    return check


# ---- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    cls: str
    name: str
    expected: str
    command: Callable[[Ctx], Cmd]
    check: Check
    setup: Callable[[Ctx], None] | None = None
    needs: tuple[str, ...] = ("corpus",)


CASES: list[Case] = []


def do(*fns: Callable[[Ctx], object]) -> Callable[[Ctx], None]:
    """A setup made of steps (their return values are ignored)."""

    def setup(c: Ctx) -> None:
        for fn in fns:
            fn(c)

    return setup


def unchanged(c: Ctx, r: Res) -> tuple[bool, str]:
    """The snapshot's files are byte-identical."""
    problems = c.changed()
    return not problems, "; ".join(problems) or "files byte-identical"


def add(
    cls: str,
    name: str,
    expected: str,
    command: Callable[[Ctx], Cmd],
    check: Check,
    setup: Callable[[Ctx], None] | None = None,
    needs: tuple[str, ...] = ("corpus",),
) -> None:
    CASES.append(Case(cls, name, expected, command, check, setup, needs))


def one_liner(cls: str, override: str, *needles: str, expected: str = "", **kw: object) -> None:
    """A train.py override that must be refused in one line naming ``needles``."""
    add(
        cls,
        override,
        expected or "refused: 1 error line naming " + (", ".join(needles) or "the key"),
        lambda c: c.train(*override.split(" "), **kw),  # type: ignore[arg-type]
        refused(*needles),
    )


# == A run folder belongs to one run ====================================================


def _holder_setup(c: Ctx) -> None:
    proc, _, _ = c.spawn(c.train(*SLOW, "train.max_steps=100000", "train.ckpt_every=0"))
    c.data["holder"] = proc
    c.wait_for(lambda: logged(c, 1)(None), 180, "the holder's first step", proc)  # type: ignore[arg-type]
    c.snap(run=None)


def _holder_named(c: Ctx, r: Res) -> tuple[bool, str]:
    holder = c.data["holder"]
    line = (r.errors() or [""])[0]
    missing = [w for w in (socket.gethostname(), str(holder.pid), "since") if w not in line]  # type: ignore[attr-defined]
    alive = holder.poll() is None  # type: ignore[attr-defined]
    if missing or not alive:
        why = f"error line lacks {missing}" if missing else ""
        return False, why + ("" if alive else "; the holder died")
    return True, f"holder pid {holder.pid} named, still running"  # type: ignore[attr-defined]


add(
    "ownership",
    "second train.py on a folder a live run holds",
    "refused: 1 error line naming the holder (host, pid, since); holder unharmed",
    lambda c: c.train(*SLOW, "train.max_steps=6", "train.ckpt_every=0"),
    refused(extra=_holder_named),
    setup=_holder_setup,
)


def _sigkilled_holder(c: Ctx) -> None:
    cmd = c.train(*SLOW, "train.max_steps=12", "train.ckpt_every=2")
    proc, _, _ = c.spawn(cmd)
    last = c.p("run", "checkpoints", "last.pt")
    c.wait_for(last.is_file, 180, "a checkpoint (last.pt)", proc)
    proc.kill()
    proc.wait(timeout=30)


add(
    "ownership",
    "a holder killed with SIGKILL does not block the folder",
    "exit 0: the next run resumes from the killed run's checkpoint and finishes",
    lambda c: c.train(*SLOW, "train.max_steps=12", "train.ckpt_every=2"),
    works("resumed", extra=lambda c, r: run_finished_at(c, 12)(c, r)),
    setup=_sigkilled_holder,
)


def _one_of_two(c: Ctx, r: Res) -> tuple[bool, str]:
    runs = [r, *r.others]
    codes = sorted(x.rc for x in runs if x.rc is not None)
    winners = [x for x in runs if x.rc == 0 and not x.traceback()]
    losers = [x for x in runs if x is not (winners[0] if winners else None)]
    if len(winners) != 1 or len(losers) != 1:
        return False, f"exit codes {codes}: expected exactly one run to train"
    lose = refusal_problems(losers[0])
    if lose:
        return False, f"exit codes {codes}; the other: {'; '.join(lose)}: {summary(losers[0])}"
    steps = _metrics_steps(c.p("run", "metrics.jsonl"), key="train/loss")
    if len(steps) != len(set(steps)):
        return False, f"metrics.jsonl logs steps twice: {steps}"
    info = _run_json(c.p("run", "run.json"))
    if info.get("status") != "completed" or not _valid_zip(c.p("run", "checkpoints", "last.pt")):
        return False, f"run.json status {info.get('status')}, last.pt valid: no"
    return True, f"exit codes {codes}; refused: {losers[0].errors()[0][:160]}"


add(
    "ownership",
    "two train.py started at once in the same folder",
    "exactly one trains (exit 0), the other refused in 1 line; files consistent",
    lambda c: replace(c.train(), parallel=2),
    lambda c, r: _one_of_two(c, r),
)


# == Nothing a run wrote is deleted or overwritten ======================================


def _base_snap(c: Ctx) -> None:
    c.copy_base()
    c.snap()


def _refused_over_base(title: str, expect: str, command: Callable[[Ctx], Cmd], needle: str) -> None:
    """A command on a copy of the base run's folder: refused in one line, every file intact."""
    add(
        "preserve",
        title,
        expect,
        command,
        refused(needle, intact=True),
        setup=_base_snap,
        needs=("base",),
    )


_refused_over_base(
    "resume=never in a folder holding a run",
    "refused in 1 line; checkpoints/, metrics.jsonl, run.json byte-identical",
    lambda c: c.base("resume=never"),
    "resume",
)
_refused_over_base(
    "changed model shape (model.n_layer=3) on a folder holding a run",
    "refused in 1 line naming the shape; files byte-identical",
    lambda c: c.base("model.n_layer=3"),
    "n_layer",
)
_refused_over_base(
    "changed train.batch_size on a folder holding a run",
    "refused in 1 line naming the batch; files byte-identical",
    lambda c: c.base("train.batch_size=4"),
    "batch",
)


def _delete_last(c: Ctx) -> None:
    c.copy_base()
    c.p("run", "checkpoints", "last.pt").unlink()


add(
    "preserve",
    "resume=auto with last.pt deleted (step_2/4/6.pt kept), max_steps raised to 8",
    "exit 0: resumes from the newest step file, step_0000006.pt, and says so",
    lambda c: c.base("train.max_steps=8"),
    works("step_0000006", extra=lambda c, r: run_finished_at(c, 8)(c, r)),
    setup=_delete_last,
    needs=("base",),
)


def _complete(c: Ctx, r: Res) -> tuple[bool, str]:
    low = r.text.lower()
    missing = [w for w in ("complete", "6", "val") if w not in low]
    if missing:
        return False, f"output does not say complete (step, val loss): lacks {missing}"
    return True, "says complete"


add(
    "preserve",
    "a finished run's command run again",
    "exit 0, says the run is complete (step, val loss); files byte-identical",
    lambda c: c.base(),
    works(extra=lambda c, r: unchanged(c, r) if _complete(c, r)[0] else _complete(c, r)),
    setup=_base_snap,
    needs=("base",),
)
add(
    "preserve",
    "raising train.max_steps on a finished run",
    "exit 0: continues from step 6 to step 8",
    lambda c: c.base("train.max_steps=8"),
    works("at step 6", extra=lambda c, r: run_finished_at(c, 8)(c, r)),
    setup=do(lambda c: c.copy_base()),
    needs=("base",),
)
_refused_over_base(
    "lowering train.max_steps below the done step (6 -> 4)",
    "refused in 1 line naming max_steps; files byte-identical",
    lambda c: c.base("train.max_steps=4"),
    "max_steps",
)
_refused_over_base(
    "resume=PATH of an earlier step (step_0000002.pt) of the same folder",
    "refused in 1 line naming the checkpoint; files byte-identical",
    lambda c: c.base(f"resume={c.p('run', 'checkpoints', 'step_0000002.pt')}"),
    "step_0000002",
)


def _other_run_source(c: Ctx) -> None:
    c.copy_base("src")
    c.snap(run="src")


add(
    "preserve",
    "resume=PATH of another folder's last.pt into a new folder, max_steps=8",
    "exit 0: starts at step 6 of that run; the source run is byte-identical",
    lambda c: c.base(f"resume={c.p('src', 'checkpoints', 'last.pt')}", "train.max_steps=8"),
    works("at step 6", extra=unchanged),
    setup=_other_run_source,
    needs=("base",),
)
add(
    "preserve",
    "control: the base command in a new folder",
    "exit 0, trains to step 6",
    lambda c: c.base(),
    works(extra=lambda c, r: run_finished_at(c, 6)(c, r)),
)


def _mangle_last(kind: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        c.copy_base()
        last = c.p("run", "checkpoints", "last.pt")
        if kind == "dangling":
            last.unlink()
            last.symlink_to(c.p("run", "checkpoints", "gone.pt"))
        elif kind == "dir":
            last.unlink()
            last.mkdir()
        elif kind == "truncated":
            data = last.read_bytes()
            last.unlink()
            last.write_bytes(data[: len(data) // 2])
        c.snap()

    return setup


def _steps_kept(c: Ctx, r: Res) -> tuple[bool, str]:
    """A resumed run may rotate step files; a refused or fresh one must not rewrite them."""
    if r.rc == 0 and "step_0000006" not in r.text:
        return False, "exit 0 without naming step_0000006.pt: started over on the old folder"
    if r.rc != 0:
        problems = c.changed()
        return not problems, "; ".join(problems) or "files intact"
    return True, "resumed from step_0000006.pt"


for _kind, _what in (
    ("dangling", "last.pt a dangling symlink"),
    ("dir", "last.pt replaced by a folder"),
    ("truncated", "last.pt truncated to half"),
):
    add(
        "preserve",
        f"{_what}, max_steps raised to 8",
        "resumes from step_0000006.pt (saying so) or refused in 1 line; nothing overwritten",
        lambda c: c.base("train.max_steps=8"),
        works_or_refused("last.pt", extra=_steps_kept),
        setup=_mangle_last(_kind),
        needs=("base",),
    )


def _corrupt_file(name: str, content: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        c.copy_base()
        path = c.p("run", name)
        before = path.read_text() if name == "metrics.jsonl" else ""
        path.write_text(before + content)
        c.snap()

    return setup


for _what, _content in (
    ("run.json garbage (not JSON)", "{not json"),
    ("run.json a JSON list ([])", "[]\n"),
):
    add(
        "preserve",
        f"{_what} before resume, max_steps=8",
        "exit 0 (resumes) or refused in 1 line; no traceback",
        lambda c: c.base("train.max_steps=8"),
        works_or_refused("run.json", intact=True),
        setup=_corrupt_file("run.json", _content),
        needs=("base",),
    )
for _what, _content in (
    (
        "metrics.jsonl with garbage lines before resume, max_steps=8",
        'garbage\n\x00\x01\n{"step": \n',
    ),
    (
        'metrics.jsonl with JSON that is not an event ([1], {"step":"x"}, null) before resume',
        '[1]\n{"step": "x"}\nnull\n"s"\n',
    ),
):
    add(
        "preserve",
        _what,
        "exit 0, resumes, step 8 logged",
        lambda c: c.base("train.max_steps=8"),
        works(
            extra=lambda c, r: (8 in _metrics_steps(c.p("run", "metrics.jsonl")), "step 8 logged")
        ),
        setup=_corrupt_file("metrics.jsonl", _content),
        needs=("base",),
    )


def _blocker(name: str, kind: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        path = c.p("run", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            path.write_text("the user's notes\n")
        else:
            path.mkdir()
            (path / "keep.txt").write_text("the user's notes\n")
        c.snap(path / "keep.txt" if kind == "dir" else path, run=None)

    return setup


def _kept_somewhere(c: Ctx, r: Res) -> tuple[bool, str]:
    c.data["moved_ok"] = True
    problems = c.changed()
    moved = c.data.get("moved")
    return not problems, "; ".join(problems) or (f"kept, moved to {moved}" if moved else "intact")


for _name, _kind in (("checkpoints", "file"), ("run.json", "dir"), ("metrics.jsonl", "dir")):
    add(
        "preserve",
        f"{_name} is a {'regular file' if _kind == 'file' else 'folder'} in a new run folder",
        f"refused in 1 line naming {_name}, or set aside (moved, said so) and run; "
        f"the user's {_kind} kept byte-identical",
        lambda c: c.train(),
        works_or_refused(_name, extra=_kept_somewhere),
        setup=_blocker(_name, _kind),
    )


# == Resume checks the tokenizer and the data ===========================================

ZEBRA = "zebra quantum xylophone jukebox vortex\n" * 30


def _bpe_then_add(c: Ctx) -> None:
    corpus = c.copy_corpus()
    args = (
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "model.vocab_size=300",
        "train.max_steps=4",
    )
    r = c.run(c.train(*args, corpus=corpus, cache=c.p("cache")))
    if r.rc != 0:
        raise SetupFailed(f"first BPE run: {summary(r)}")
    time.sleep(0.01)
    (corpus / "zz_added.txt").write_text(ZEBRA)
    c.snap()


add(
    "tokenizer",
    "BPE run (model.vocab_size=300), one corpus file added, then resumed (max_steps 4 -> 6)",
    "refused in 1 line saying the tokenizer changed; files byte-identical",
    lambda c: c.train(
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "model.vocab_size=300",
        "train.max_steps=6",
        corpus=c.p("corpus"),
        cache=c.p("cache"),
    ),
    refused("tokenizer", intact=True),
    setup=_bpe_then_add,
)


def _byte_vocab_300(c: Ctx) -> None:
    r = c.run(c.train("model.vocab_size=300", "train.max_steps=4"))
    if r.rc != 0:
        raise SetupFailed(f"first byte run: {summary(r)}")
    c.snap()


add(
    "tokenizer",
    "byte-tokenizer checkpoint resumed as data.tokenizer=bpe (both padded to model.vocab_size=300)",
    "refused in 1 line naming the tokenizer; files byte-identical",
    lambda c: c.train(
        "model.vocab_size=300",
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "train.max_steps=6",
        cache=c.p("cache"),
    ),
    refused("tokenizer", intact=True),
    setup=_byte_vocab_300,
)


def _byte_then(change: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        corpus = c.copy_corpus()
        r = c.run(c.train("train.max_steps=4", corpus=corpus, cache=c.p("cache")))
        if r.rc != 0:
            raise SetupFailed(f"first byte run: {summary(r)}")
        time.sleep(0.01)
        if change == "added":
            (corpus / "zz_added.txt").write_text(ZEBRA)
        elif change == "deleted":
            (corpus / "doc03.txt").unlink()
        else:
            (corpus / "doc03.txt").write_text(ZEBRA)

    return setup


def _one_data_changed_line(c: Ctx, r: Res) -> tuple[bool, str]:
    lines = [ln for ln in r.text.splitlines() if re.search(r"\bdata\b.*\bchang", ln, re.I)]
    if len(lines) != 1:
        return False, f"{len(lines)} lines say the data changed, expected 1"
    return run_finished_at(c, 6)(c, r)[0], lines[0][:160]


for _change in ("added", "deleted"):
    add(
        "tokenizer",
        f"byte run, one corpus file {_change}, then resumed (max_steps 4 -> 6)",
        "exit 0: resumes; exactly 1 line says the data changed",
        lambda c: c.train("train.max_steps=6", corpus=c.p("corpus"), cache=c.p("cache")),
        works(extra=_one_data_changed_line),
        setup=_byte_then(_change),
    )


# == The data ============================================================================


def _two_sizes(c: Ctx) -> None:
    corpus = c.p("corpus")
    corpus.mkdir()
    (corpus / "small.txt").write_text(("tiny file " * 8)[:80])
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(120))
    (corpus / "big.txt").write_text(text[:6000])


def _val_share(c: Ctx, r: Res) -> tuple[bool, str]:
    metas = list(c.p("cache").glob("*/meta.json"))
    if not metas:
        return False, "no meta.json under data.cache_dir"
    tokens = json.loads(metas[0].read_text()).get("tokens", {})
    train, val = tokens.get("train", 0), tokens.get("val", 0)
    share = val / max(1, train + val)
    return 0.03 <= share <= 0.08, f"val {val} of {train + val} tokens = {share:.1%}"


add(
    "data",
    "val split of an 80-byte file + a 6 KB file, data.val_fraction=0.05",
    "exit 0; meta.json: val is about 5% of the tokens (3-8%)",
    lambda c: c.train("train.max_steps=1", corpus=c.p("corpus"), cache=c.p("cache")),
    works(extra=_val_share),
    setup=_two_sizes,
)


def _odd_file(name: str, data: bytes) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        corpus = c.copy_corpus()
        (corpus / name).write_bytes(data)

    return setup


def _warns_about(name: str) -> Check:
    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        lines = [ln for ln in r.text.splitlines() if "warn" in ln.lower() and name in ln]
        if not lines:
            return False, f"no warning naming {name}"
        return True, lines[0][:160]

    return check


add(
    "data",
    "a data.paths file that is binary (random bytes, NULs)",
    "exit 0 with a warning that names the file",
    lambda c: c.train(corpus=c.p("corpus"), cache=c.p("cache")),
    works(extra=_warns_about("blob.txt")),
    setup=_odd_file("blob.txt", random.Random(1).randbytes(3000) + b"\0"),
)
add(
    "data",
    "a data.paths file in latin-1",
    "exit 0 with a warning that names the file",
    lambda c: c.train(corpus=c.p("corpus"), cache=c.p("cache")),
    works(extra=_warns_about("latin.txt")),
    setup=_odd_file("latin.txt", ("café naïve façade déjà vu\n" * 40).encode("latin-1")),
)


def _cwd_clean(c: Ctx, r: Res) -> tuple[bool, str]:
    left = sorted(p.name for p in c.cwd.iterdir())
    return not left, f"cwd holds {left}" if left else "nothing written to the working directory"


add(
    "data",
    "MINIGPT_CACHE_DIR= (empty) and no data.cache_dir",
    "exit 0 (cache under ~/.cache/minigpt) or refused in 1 line; nothing cached in the cwd",
    lambda c: c.train(drop=("data.cache_dir",), env={"MINIGPT_CACHE_DIR": ""}),
    works_or_refused("MINIGPT_CACHE_DIR", extra=_cwd_clean),
)


def _big_cmd(c: Ctx, *extra: str, **kw: object) -> Cmd:
    return c.train(
        "train.max_steps=1",
        "train.eval_steps=1",
        *extra,
        corpus=c.shared.big,
        cache=c.p("cache"),
        **kw,  # type: ignore[arg-type]
    )


def _killed_build(c: Ctx) -> None:
    cmd = _big_cmd(c)
    cmd.signals = [(appears(c.p("cache"), ".tmp-*/hf"), signal.SIGKILL)]
    r = c.run(cmd)
    left = list(c.p("cache").glob(".tmp-*"))
    if not left:
        raise SetupFailed(f"the kill left no .tmp-* folder ({summary(r)})")
    c.data["tmp"] = [p.name for p in left]


def _no_tmp_left(c: Ctx, r: Res) -> tuple[bool, str]:
    left = [p.name for p in c.p("cache").glob(".tmp-*")]
    if left:
        return False, f"{left} still there (left by the killed build {c.data.get('tmp')})"
    return True, f"removed {c.data.get('tmp')}"


add(
    "data",
    "a cache build killed with SIGKILL, then the same command",
    "exit 0; the .tmp-* folder left by the killed build is removed",
    lambda c: _big_cmd(c),
    works(extra=_no_tmp_left),
    setup=_killed_build,
    needs=("corpus", "big"),
)


def _fifo_in_corpus(c: Ctx) -> None:
    corpus = c.copy_corpus()
    os.mkfifo(corpus / "pipe.txt")


add(
    "data",
    "a FIFO (no writer) among the data.paths glob",
    "no hang: exit 0 (skipped, ideally with a warning) or refused in 1 line",
    lambda c: c.train(corpus=c.p("corpus"), cache=c.p("cache"), timeout=90),
    works_or_refused("pipe.txt"),
    setup=_fifo_in_corpus,
)
add(
    "data",
    "data.paths=[$CASE/pipe.txt], a FIFO with no writer",
    "no hang: refused in 1 line naming it",
    lambda c: c.train(f"data.paths=[{c.p('pipe.txt')}]", timeout=60),
    refused("pipe.txt"),
    setup=lambda c: os.mkfifo(c.p("pipe.txt")),
)
add(
    "data",
    "data.paths=[/dev/zer*] (a glob that matches /dev/zero)",
    "no hang, bounded memory: refused in 1 line",
    lambda c: c.train("data.paths=[/dev/zer*]", timeout=60, mem_gb=4),
    refused("/dev/zer"),
)


def _symlink_loops(c: Ctx) -> None:
    corpus = c.copy_corpus()
    (corpus / "sub").mkdir()
    (corpus / "sub" / "up").symlink_to(corpus, target_is_directory=True)
    (corpus / "self.txt").symlink_to(corpus / "self.txt")


add(
    "data",
    "symlink loops: sub/up -> corpus, self.txt -> self.txt; data.paths=[corpus/**/*.txt]",
    "no hang: exit 0, each real file read once",
    lambda c: c.train(f"data.paths=[{c.p('corpus')}/**/*.txt]", cache=c.p("cache"), timeout=90),
    works(),
    setup=_symlink_loops,
)


def _newline_name(c: Ctx) -> None:
    corpus = c.copy_corpus()
    (corpus / "new\nline\tname.txt").write_text(ALPHABET_LINE * 20)


add(
    "data",
    "a corpus file whose name holds a newline and a tab",
    "exit 0",
    lambda c: c.train(corpus=c.p("corpus"), cache=c.p("cache")),
    works(),
    setup=_newline_name,
)


def _one_byte_files(c: Ctx) -> None:
    corpus = c.p("corpus")
    corpus.mkdir()
    for i in range(5):
        (corpus / f"f{i}.txt").write_text("x")


add(
    "data",
    "a corpus of five 1-byte files",
    "refused in 1 line: too few tokens for model.block_size",
    lambda c: c.train(corpus=c.p("corpus"), cache=c.p("cache")),
    refused("block_size"),
    setup=_one_byte_files,
)


def _single_file(c: Ctx) -> None:
    corpus = c.p("corpus")
    corpus.mkdir()
    (corpus / "only.txt").write_text(ALPHABET_LINE * 200)
    (corpus / "empty.txt").write_text("")


add(
    "data",
    "a corpus of one file (plus an empty one)",
    "exit 0 (the file is cut by characters into train/val)",
    lambda c: c.train(corpus=c.p("corpus"), cache=c.p("cache")),
    works(),
    setup=_single_file,
)


def _damaged_cache(kind: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        r = c.run(c.train("train.max_steps=1", cache=c.p("cache"), run="first"))
        if r.rc != 0:
            raise SetupFailed(f"first run: {summary(r)}")
        key = next(c.p("cache").glob("*/meta.json")).parent
        if kind == "meta":
            (key / "meta.json").write_text("{broken")
        else:
            data = (key / "train.bin").read_bytes()
            (key / "train.bin").write_bytes(data[: len(data) // 3])

    return setup


def _warned_damaged(c: Ctx, r: Res) -> tuple[bool, str]:
    aside = list(c.p("cache").glob(".damaged-*"))
    warned = [ln for ln in r.text.splitlines() if "damaged" in ln.lower()]
    if not aside or not warned:
        return False, f"set aside: {len(aside)}, warning lines: {len(warned)}"
    return True, warned[0][:160]


for _kind, _what in (("meta", "meta.json not JSON"), ("bin", "train.bin truncated")):
    add(
        "data",
        f"a damaged token cache ({_what})",
        "exit 0: warns, moves it to .damaged-*, rebuilds",
        lambda c: c.train("train.max_steps=1", cache=c.p("cache")),
        works(extra=_warned_damaged),
        setup=_damaged_cache(_kind),
    )


def _dir_named_txt(c: Ctx) -> None:
    (c.p("corpus", "folder.txt")).mkdir(parents=True)


add(
    "data",
    "data.paths glob that matches only a folder named folder.txt",
    "refused in 1 line naming the pattern",
    lambda c: c.train(corpus=c.p("corpus")),
    refused("*.txt"),
    setup=_dir_named_txt,
)


# == generate.py ==========================================================================

PROMPTS = (
    ("key=${oc.env:HOME}", "an OmegaConf interpolation printed literally"),
    ("hi ${name}", "a ${name} that resolves to nothing"),
    ("say \"hi\", it's 'quoted'", "double and single quotes"),
    ("C:\\path\\to\\ end\\\\", "backslashes, one at the end"),
    ("f(a, [b], {c}) = d", "commas, brackets, braces, ="),
    ("héllo → ✓ 日本", "non-ASCII text"),
)


def _prompt_first(prompt: str) -> Check:
    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        ok = r.out.startswith(prompt)
        return ok, "printed as typed" if ok else f"stdout starts {r.out[:40]!r}"

    return check


for _prompt, _what in PROMPTS:
    add(
        "generate",
        f"prompt with {_what}: {_prompt}",
        "exit 0; stdout starts with the prompt exactly as typed",
        lambda c, p=_prompt: c.gen(f"prompt={p}"),
        works(extra=_prompt_first(_prompt)),
        needs=("base",),
    )
add(
    "generate",
    "temperature=1e-30 (practically greedy)",
    "exit 0, text generated",
    lambda c: c.gen("prompt=abc", "temperature=1e-30"),
    works(extra=_prompt_first("abc")),
    needs=("base",),
)
add(
    "generate",
    "prompt longer than the context (300 chars), kv_cache=false",
    "exit 0, prompt cropped to the context",
    lambda c: c.gen("prompt=" + "abcdefghij" * 30, "kv_cache=false"),
    works(extra=_prompt_first("abcdefghij" * 30)),
    needs=("base",),
)
for _arg, _needle in (
    ("temperature=inf", "temperature"),
    ("temperature=nan", "temperature"),
    ("top_k=0", "top_k"),
    ("top_p=1.5", "top_p"),
    ("top_p=nan", "top_p"),
    ("num_samples=0", "num_samples"),
    ("max_tokens=-1", "max_tokens"),
    ("device=cuda", "cuda"),
    ("prompt=", "prompt"),
    ("bogus_key=1", "bogus_key"),
):
    add(
        "generate",
        _arg,
        f"refused in 1 line naming {_needle}",
        lambda c, a=_arg: c.gen(a),
        refused(_needle),
        needs=("base",),
    )
for _arg in ("seed=-1", "seed=18446744073709551616"):
    add(
        "generate",
        _arg,
        "exit 0 or refused in 1 line naming seed",
        lambda c, a=_arg: c.gen("prompt=abc", a),
        works_or_refused("seed"),
        needs=("base",),
    )


def _prompt_file(kind: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        path = c.p("prompt.txt")
        if kind == "folder":
            path.mkdir()
        elif kind == "latin1":
            path.write_bytes("café\xff\xfe".encode("latin-1"))
        elif kind == "fifo":
            os.mkfifo(path)

    return setup


for _kind, _path, _needle, _what in (
    ("folder", "$CASE/prompt.txt", "folder", "a folder"),
    ("latin1", "$CASE/prompt.txt", "prompt.txt", "not UTF-8"),
    ("fifo", "$CASE/prompt.txt", "prompt.txt", "a FIFO with no writer"),
    ("none", "/dev/zero", "/dev/zero", "/dev/zero"),
    ("none", "$CASE/missing.txt", "missing.txt", "missing"),
):
    add(
        "generate",
        f"prompt_file {_what}",
        f"refused in 1 line naming {_needle}; no hang, bounded memory",
        lambda c, p=_path: c.gen(
            "prompt_file=" + p.replace("$CASE", str(c.dir)), timeout=60, mem_gb=4
        ),
        refused(_needle),
        setup=_prompt_file(_kind),
        needs=("base",),
    )


def _bad_checkpoint(kind: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        path = c.p("ckpt.pt")
        if kind == "folder":
            path.mkdir()
        elif kind == "text":
            path.write_text("this is not a checkpoint\n")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            c.shared.need("base")
            data = (c.shared.base_run / "checkpoints" / "last.pt").read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "dangling":
            path.symlink_to(c.p("nowhere.pt"))
        elif kind == "pickle":
            marker = c.p("PWNED")
            c.data["marker"] = marker
            # A plain pickle whose load runs os.system: must be refused, never run.
            payload = (
                b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94"
                b"\x93\x94\x8c"
                + bytes([len(f"touch {marker}")])
                + f"touch {marker}".encode()
                + b"\x94\x85\x94R\x94."
            )
            path.write_bytes(payload)
        elif kind in ("bad_config", "missing_keys"):
            c.shared.need("base")
            src = c.shared.base_run / "checkpoints" / "last.pt"
            edit = (
                "s['model_config']['n_head'] = 3"
                if kind == "bad_config"
                else "s['model'] = {k: v for k, v in list(s['model'].items())[:3]}"
            )
            c.python(
                "import sys, torch; s = torch.load(sys.argv[1], weights_only=True); "
                f"{edit}; torch.save(s, sys.argv[2])",
                str(src),
                str(path),
            )

    return setup


def _no_marker(c: Ctx, r: Res) -> tuple[bool, str]:
    marker = c.data.get("marker")
    if marker and Path(str(marker)).exists():
        return False, "THE PAYLOAD RAN"
    return True, "payload not run"


for _kind, _needle, _what in (
    ("folder", "folder", "a folder"),
    ("text", "ckpt.pt", "a text file"),
    ("empty", "ckpt.pt", "an empty file"),
    ("truncated", "ckpt.pt", "truncated to half"),
    ("dangling", "ckpt.pt", "a dangling symlink"),
    ("pickle", "ckpt.pt", "a crafted pickle running os.system"),
    ("bad_config", "ckpt.pt", "model_config with n_head=3 (d_model 64)"),
    ("missing_keys", "ckpt.pt", "a state dict missing most weights"),
):
    add(
        "generate",
        f"checkpoint= {_what}",
        f"refused in 1 line naming {_needle}",
        lambda c: c.gen(f"checkpoint={c.p('ckpt.pt')}", timeout=60),
        refused(_needle, extra=_no_marker),
        setup=_bad_checkpoint(_kind),
    )
add(
    "generate",
    "checkpoint=/dev/zero",
    "refused in 1 line, no hang, bounded memory",
    lambda c: c.gen("checkpoint=/dev/zero", timeout=60, mem_gb=4),
    refused("/dev/zero"),
)
add(
    "generate",
    "checkpoint= a missing file",
    "refused in 1 line naming it",
    lambda c: c.gen(f"checkpoint={c.p('nope.pt')}"),
    refused("nope.pt"),
)


def _safetensors(header: dict | None = None, raw: bytes | None = None) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        path = c.p("model.safetensors")
        if raw is not None:
            path.write_bytes(raw)
            return
        c.shared.need("export")
        data = c.shared.export.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        head = json.loads(data[8 : 8 + n])
        meta = head.setdefault("__metadata__", {})
        for k, v in (header or {}).items():
            if v is None:
                meta.pop(k, None)
            elif k == "n_layer":
                cfg = json.loads(meta["model_config"])
                cfg["n_layer"] = v
                meta["model_config"] = json.dumps(cfg)
            else:
                meta[k] = v
        blob = json.dumps(head).encode()
        blob += b" " * (-len(blob) % 8)
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])

    return setup


for _what, _setup in (
    ("model_config metadata not JSON", _safetensors({"model_config": "{oops"})),
    ("no tokenizer in the metadata", _safetensors({"tokenizer": None})),
    ("model_config of 3 layers, weights of 2", _safetensors({"n_layer": 3})),
    ("a header length of 2**63", _safetensors(raw=struct.pack("<Q", 2**63) + b"{}")),
    ("a header that is not JSON", _safetensors(raw=struct.pack("<Q", 8) + b"notjson!")),
):
    add(
        "generate",
        f"checkpoint=*.safetensors with {_what}",
        "refused in 1 line naming the file; bounded memory",
        lambda c: c.gen(f"checkpoint={c.p('model.safetensors')}", timeout=60, mem_gb=4),
        refused("model.safetensors"),
        setup=_setup,
        needs=("base",),
    )
add(
    "generate",
    "stdout closed after 5 bytes (generate.py ... | head -c 5)",
    "no traceback, no BrokenPipeError noise",
    lambda c: c.gen("prompt=abc", "max_tokens=3000", close_stdout_after=5),
    lambda c, r: verdict(
        r,
        (["hung (timeout)"] if r.timed_out else [])
        + (["traceback"] if r.traceback() else [])
        + (["BrokenPipeError on stderr"] if "BrokenPipe" in r.err else []),
    ),
    needs=("base",),
)
add(
    "signals",
    "SIGINT (Ctrl-C) while generate.py streams",
    "exit 130 at once, no traceback, at most 1 line",
    lambda c: c.gen(
        "prompt=abc",
        "max_tokens=1000000",
        signals=[(lambda live: len(live.out_text()) > 20, signal.SIGINT)],
        timeout=30,
    ),
    lambda c, r: verdict(
        r,
        (["hung (timeout)"] if r.timed_out else [])
        + ([f"exit {r.rc}, expected 130"] if r.rc != 130 and not r.timed_out else [])
        + (["traceback"] if r.traceback() else [])
        + ([f"{len(r.errors())} 'error:' lines"] if len(r.errors()) > 1 else []),
    ),
    needs=("base",),
)


# == export ================================================================================


def _ckpt_copy(c: Ctx) -> None:
    c.shared.need("base")
    shutil.copy(c.shared.base_run / "checkpoints" / "last.pt", c.p("x.pt"))
    c.snap(c.p("x.pt"), run=None)


def _tmp_left(folder_rel: str) -> Check:
    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        folder = c.p(folder_rel) if folder_rel else c.dir
        left = [p.name for p in folder.iterdir() if "tmp" in p.name]
        return not left, f"temp files left: {left}" if left else "no temp file left"

    return check


add(
    "export",
    "python -m minigpt.export X X (output = input)",
    "refused in 1 line; X byte-identical",
    lambda c: c.export(str(c.p("x.pt")), str(c.p("x.pt"))),
    refused("x.pt", intact=True),
    setup=_ckpt_copy,
)


def _existing_out(c: Ctx) -> None:
    _ckpt_copy(c)
    c.p("out.safetensors").write_text("the user's file\n")
    c.snap(c.p("x.pt"), c.p("out.safetensors"), run=None)


add(
    "export",
    "existing output, no --force",
    "refused in 1 line mentioning --force; the output byte-identical",
    lambda c: c.export(str(c.p("x.pt")), str(c.p("out.safetensors"))),
    refused("--force", intact=True),
    setup=_existing_out,
)
add(
    "export",
    "existing output with --force",
    "exit 0, output replaced by the export, no temp file",
    lambda c: c.export(str(c.p("x.pt")), str(c.p("out.safetensors")), "--force"),
    works(extra=_tmp_left("")),
    setup=_existing_out,
)
add(
    "export",
    "output in a folder that does not exist (new/sub/m.safetensors)",
    "exit 0: folder created, file written, no temp file left",
    lambda c: c.export(str(c.p("x.pt")), str(c.p("new", "sub", "m.safetensors"))),
    works(
        extra=lambda c, r: (
            _tmp_left("new/sub")(c, r)
            if c.p("new", "sub", "m.safetensors").is_file()
            else (False, "no output file")
        )
    ),
    setup=_ckpt_copy,
)
add(
    "export",
    "output is an existing folder",
    "refused in 1 line naming it; the folder untouched, no temp file",
    lambda c: c.export(str(c.p("x.pt")), str(c.p("outdir"))),
    refused("outdir", extra=lambda c, r: _tmp_left("outdir")(c, r)),
    setup=do(_ckpt_copy, lambda c: c.p("outdir").mkdir()),
)
add(
    "export",
    "output under a regular file (afile/m.safetensors)",
    "refused in 1 line naming it",
    lambda c: c.export(str(c.p("x.pt")), str(c.p("afile", "m.safetensors"))),
    refused("afile"),
    setup=do(_ckpt_copy, lambda c: c.p("afile").write_text("x")),
)
add(
    "export",
    "input a text file",
    "refused in 1 line naming it; no output file",
    lambda c: c.export(str(c.p("notes.txt")), str(c.p("m.safetensors"))),
    refused("notes.txt", extra=lambda c, r: (not c.p("m.safetensors").exists(), "no output")),
    setup=do(lambda c: c.p("notes.txt").write_text("hello\n")),
)
add(
    "export",
    "input missing",
    "refused in 1 line naming it",
    lambda c: c.export(str(c.p("missing.pt"))),
    refused("missing.pt"),
)
add(
    "export",
    "input a .safetensors export",
    "refused in 1 line naming it",
    lambda c: c.export(str(c.shared.export), str(c.p("again.safetensors"))),
    refused("model.safetensors"),
    needs=("export",),
)
add(
    "export",
    "no arguments",
    "exit 2 with 1 'error:' line (usage may follow)",
    lambda c: c.export(),
    refused(),
)


# == train.py one-liners ======================================================================

add(
    "train",
    "train.device=cuda on a machine without a GPU",
    "refused in 1 line naming cuda",
    lambda c: c.train("train.device=cuda", env={"CUDA_VISIBLE_DEVICES": ""}),
    refused("cuda"),
)
for _seed in ("-1", str(2**63)):
    add(
        "train",
        f"train.seed={_seed}",
        "exit 0 or refused in 1 line naming train.seed",
        lambda c, s=_seed: c.train(f"train.seed={s}"),
        works_or_refused("train.seed"),
    )
add(
    "train",
    "data.cache_dir under a regular file",
    "refused in 1 line naming data.cache_dir",
    lambda c: c.train(f"data.cache_dir={c.p('afile', 'cache')}"),
    refused("cache_dir"),
    setup=do(lambda c: c.p("afile").write_text("x")),
)


def _tmpfs(c: Ctx) -> None:
    mnt = c.p("full")
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise Skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:100]}")
    c.on_cleanup(lambda: subprocess.run(["umount", "-l", str(mnt)], capture_output=True))


add(
    "train",
    "run folder on a full disk (64 KB tmpfs)",
    "refused in 1 line: no space left, names the file",
    lambda c: c.train(run=c.p("full", "run")),
    refused("space"),
    setup=_tmpfs,
)


def _no_compiler(c: Ctx) -> Cmd:
    empty = c.p("emptybin")
    empty.mkdir(exist_ok=True)
    env = {"PATH": str(empty), "CXX": "/nonexistent/c++", "CC": "/nonexistent/cc"}
    return c.train("train.compile=true", "train.max_steps=2", env=env, timeout=300)


add(
    "train",
    "train.compile=true with no C++ compiler (CXX=/nonexistent, PATH without gcc)",
    "refused in 1 line that gives the fix (train.compile=false or install a compiler)",
    _no_compiler,
    refused("compile"),
)
for _env, _needle in (
    ({"RANK": "x"}, ""),
    ({"RANK": "x", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, "RANK"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "RANK"),
    (
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_PORT": "abc",
        },
        "MASTER_PORT",
    ),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK"),
    (
        {
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_PROCID": "0",
            "SLURM_NODEID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "node[1-",
        },
        "node[1-",
    ),
):
    _shown = " ".join(f"{k}={v}" for k, v in _env.items())
    add(
        "env",
        _shown,
        f"refused in 1 line naming {_needle or 'the variable'}",
        lambda c, e=_env: c.train(env=e, timeout=60),
        refused(*([_needle] if _needle else [])),
    )


def _odd_path_run(name: str) -> tuple[Callable[[Ctx], Cmd], Check]:
    def command(c: Ctx) -> Cmd:
        return c.train(run=c.p(name))

    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        if r.rc == 0 and not c.p(name, "checkpoints", "last.pt").is_file():
            made = sorted(p.name for p in c.dir.iterdir())
            return False, f"exit 0 but the run is not in {name!r}; the case folder holds {made}"
        return works_or_refused("hydra.run.dir", "quot")(c, r)

    return command, check


for _name in ("run [1]", "run=a", "a,b", "my run", "ré sumé"):
    _command, _check = _odd_path_run(_name)
    add(
        "paths",
        f"hydra.run.dir=$CASE/{_name} (unquoted)",
        "exit 0 with the run in exactly that folder, or refused in 1 line that says how to quote",
        _command,
        _check,
    )


def _odd_corpus(c: Ctx) -> None:
    shutil.copytree(c.shared.corpus, c.p("my [c],x=1 d"))


add(
    "paths",
    "data.paths=['$CASE/my [c],x=1 d/*.txt'] (a folder with [ ], comma, =, space; Hydra-quoted)",
    "exit 0: the folder's files are read (brackets taken literally, not as a glob class)",
    lambda c: c.train(f"data.paths=['{c.p('my [c],x=1 d')}/*.txt']", cache=c.p("cache")),
    works(),
    setup=_odd_corpus,
)
add(
    "paths",
    "data.cache_dir='$CASE/ca [che],x=1 d' (Hydra-quoted)",
    "exit 0, the cache in exactly that folder",
    lambda c: c.train(f"data.cache_dir='{c.p('ca [che],x=1 d')}'"),
    works(
        extra=lambda c, r: (
            any(c.p("ca [che],x=1 d").glob("*/meta.json")),
            "cache in the named folder",
        )
    ),
)
add(
    "paths",
    "LANG=C LC_ALL=C, non-ASCII corpus and run folders (data.paths Hydra-quoted)",
    "exit 0",
    lambda c: c.train(
        f"data.paths=['{c.p('données')}/*.txt']",
        run="rés",
        cache=c.p("cache"),
        env={"LANG": "C", "LC_ALL": "C"},
    ),
    works(),
    setup=do(lambda c: shutil.copytree(c.shared.corpus, c.p("données"))),
)
add(
    "paths",
    "data.paths=[$CASE/données/*.txt] (non-ASCII, unquoted)",
    "exit 0, or refused in 1 line that says how to quote",
    lambda c: c.train(f"data.paths=[{c.p('données')}/*.txt]", cache=c.p("cache")),
    works_or_refused("quot"),
    setup=do(lambda c: shutil.copytree(c.shared.corpus, c.p("données"))),
)


# == signals =================================================================================


def _stop_ckpt(step_at_least: int) -> Check:
    def check(c: Ctx, r: Res) -> tuple[bool, str]:
        steps = _step_files(c.p("run", "checkpoints"))
        if not steps or steps[-1] < step_at_least:
            return False, f"no checkpoint at step >= {step_at_least} (step files: {steps})"
        last = c.p("run", "checkpoints", "last.pt")
        if not _valid_zip(last):
            return False, "last.pt is not a valid checkpoint file"
        return True, f"checkpoint step_{steps[-1]:07d}.pt"

    return check


def _signalled(*signals: int, gap: float = 0.3) -> Callable[[Ctx], Cmd]:
    def command(c: Ctx) -> Cmd:
        cmd = c.train(*SLOW, "train.max_steps=100000", "train.ckpt_every=0", timeout=150)
        first = logged(c, 2)
        cmd.signals = [(first, signals[0])]
        cmd.signals += [(after(first, gap * i), s) for i, s in enumerate(signals[1:], 1)]
        return cmd

    return command


def _abort_clean(c: Ctx, r: Res) -> tuple[bool, str]:
    """A second Ctrl-C may abort at once: exit 130, at most one line, no half-written file."""
    problems = ["hung (timeout)"] if r.timed_out else []
    problems += [f"exit {r.rc}, expected 130"] if r.rc != 130 else []
    problems += ["traceback"] if r.traceback() else []
    problems += [f"{len(r.errors())} 'error:' lines"] if len(r.errors()) > 1 else []
    folder = c.p("run", "checkpoints")
    named = [p for p in folder.glob("*.pt") if not p.name.startswith(".")]
    bad = [p.name for p in named if not _valid_zip(p)]
    problems += [f"invalid checkpoint files {bad}"] if bad else []
    return verdict(r, problems, f"checkpoints: {sorted(p.name for p in named)}")


for _sigs, _rc, _what in (
    ((signal.SIGINT,), 130, "SIGINT (Ctrl-C) during training"),
    ((signal.SIGTERM,), 143, "SIGTERM during training"),
    ((signal.SIGUSR2,), 140, "SIGUSR2 during training (no SLURM)"),
):
    add(
        "signals",
        _what,
        f"exit {_rc}, no traceback, a checkpoint at the step reached",
        _signalled(*_sigs),
        works(rc=_rc, extra=_stop_ckpt(2)),
    )
add(
    "signals",
    "double SIGINT (Ctrl-C twice, 0.3 s apart)",
    "exit 130, no traceback, at most 1 line; any checkpoint file left is whole",
    _signalled(signal.SIGINT, signal.SIGINT),
    _abort_clean,
)


def _cache_signal(sig: int) -> Callable[[Ctx], Cmd]:
    def command(c: Ctx) -> Cmd:
        cmd = _big_cmd(c, timeout=150)
        cmd.signals = [(appears(c.p("cache"), ".tmp-*/hf"), sig)]
        return cmd

    return command


def _no_tmp_after_signal(c: Ctx, r: Res) -> tuple[bool, str]:
    left = [p.name for p in c.p("cache").glob(".tmp-*")]
    return not left, f"left {left}" if left else "no .tmp-* left"


for _sig, _rc in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
    add(
        "signals",
        f"{_signame(_sig)} during the token cache build",
        f"exit {_rc} (or 0), no traceback, no .tmp-* folder left",
        _cache_signal(_sig),
        lambda c, r, rc=_rc: works(rc=rc if r.rc != 0 else 0, extra=_no_tmp_after_signal)(c, r),
        needs=("corpus", "big"),
    )
add(
    "signals",
    "train.max_steps=10**12, SIGTERM after step 1",
    "exit 143 with a checkpoint",
    lambda c: c.train(
        "train.max_steps=1000000000000",
        "train.log_every=1",
        "train.ckpt_every=0",
        timeout=120,
        signals=[(logged(c, 1), signal.SIGTERM)],
    ),
    works(rc=143, extra=_stop_ckpt(1)),
)


# == memory =================================================================================


def _bounded(c: Ctx, r: Res) -> tuple[bool, str]:
    """The documented exception: slow but bounded counts as a pass for eval_steps=1e6."""
    if r.timed_out and not r.traceback() and "MemoryError" not in r.err:
        peak = r.peak_rss_kb / 2**20
        return True, f"slow but bounded: still running at the timeout, peak RSS {peak:.2f} GB"
    return works_or_refused("eval_steps")(c, r)


add(
    "memory",
    "train.eval_steps=1000000 train.max_steps=1 under RLIMIT_AS 4 GB",
    "exit 0, or refused in 1 line, or still running (bounded) at 45 s; never out of memory",
    lambda c: c.train("train.eval_steps=1000000", "train.max_steps=1", timeout=45, mem_gb=4),
    _bounded,
)
for _ov, _needle in (
    ("train.batch_size=1000000000", "batch_size"),
    ("model.d_model=65536 model.n_head=1", "d_model"),
    ("model.n_layer=1000000", "n_layer"),
):
    add(
        "memory",
        f"{_ov} under RLIMIT_AS 4 GB",
        f"refused in 1 line (naming {_needle} or memory) within 60 s",
        lambda c, o=_ov: c.train(*o.split(" "), timeout=60, mem_gb=4),
        refused(),
    )


# == config values ===========================================================================

for _ov, _needle in (
    ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("optimizer.betas=[0.9,nan]", "optimizer.betas"),
    ("optimizer.betas=0.9", "optimizer.betas"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps"),
    ("optimizer.grad_clip=nan", "optimizer.grad_clip"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.progress=bogus", "train.progress"),
    ("train.dtype=float16", "float16"),
    ("train.seed=abc", "train.seed"),
    ("model.d_model=0", "model.d_model"),
    ("model.dropout=nan", "model.dropout"),
    ("model.vocab_size=10", "model.vocab_size"),
    ("data.val_fraction=0.5", "data.val_fraction"),
    ("data.val_fraction=nan", "data.val_fraction"),
    ("data.num_proc=0", "data.num_proc"),
    ("data.tokenizer=bpe data.vocab_size=100", "data.vocab_size"),
    ("data.paths=[]", "data.paths"),
    ("logger.mode=bogus", "logger.mode"),
    ("cluster.backend=mpi", "cluster.backend"),
    ("resume=", "resume"),
    ("resume=/dev/null", "/dev/null"),
    ("+foo=1", "foo"),
    ("hydra.run.dir=/proc/hostile/run", "hydra.run.dir"),
):
    one_liner("config", _ov, _needle)

for _ov, _what in (
    ("model.block_size=1", "a context of one token"),
    ("data.split_seed=-1", "a negative split seed"),
    ("cluster.backend=nccl", "nccl for a single CPU process"),
):
    add(
        "config",
        f"{_ov} ({_what})",
        "exit 0 or refused in 1 line naming the key",
        lambda c, o=_ov: c.train(*o.split(" ")),
        works_or_refused(_key(_ov)),
    )
add(
    "config",
    "resume= a folder (the run's checkpoints/)",
    "refused in 1 line saying it is a folder",
    lambda c: c.base(f"resume={c.p('run', 'checkpoints')}", run="new"),
    refused("folder"),
    setup=do(lambda c: c.copy_base()),
    needs=("base",),
)
add(
    "config",
    "resume= a text file",
    "refused in 1 line naming it",
    lambda c: c.train(f"resume={c.p('notes.txt')}"),
    refused("notes.txt"),
    setup=do(lambda c: c.p("notes.txt").write_text("hello\n")),
)
add(
    "config",
    "data=hub data.name=nobody/nothing (offline)",
    "refused in 1 line naming the dataset, within 120 s",
    lambda c: c.train("data=hub", "data.name=nobody/nothing", drop=("data.paths",), timeout=120),
    refused("nobody/nothing"),
)
add(
    "config",
    "data.tokenizer=gpt2 with no network and no tiktoken cache",
    "exit 0 or refused in 1 line naming gpt2, within 120 s",
    lambda c: c.train(
        "data.tokenizer=gpt2",
        cache=c.p("cache"),
        timeout=120,
        env={"TIKTOKEN_CACHE_DIR": str(c.p("tk")), "HTTPS_PROXY": "http://127.0.0.1:9"},
    ),
    works_or_refused("gpt2"),
)
add(
    "config",
    "-m +sweep=nosuch",
    "refused in 1 line naming the sweep",
    lambda c: Cmd(
        [
            c.shared.py,
            str(c.shared.repo / "train.py"),
            "-m",
            "+sweep=nosuch",
            f"hydra.sweep.dir={c.p('sweep')}",
        ],
        "train.py -m +sweep=nosuch",
    ),
    refused("nosuch"),
)


# == environment ==============================================================================

add(
    "env",
    "HOME unset",
    "exit 0",
    lambda c: c.train(env={"HOME": None}),
    works(),
)
add(
    "env",
    "HOME is a regular file, default data.cache_dir (MINIGPT_CACHE_DIR unset)",
    "refused in 1 line naming data.cache_dir (the default under ~)",
    lambda c: c.train(
        drop=("data.cache_dir",), env={"HOME": str(c.p("homefile")), "MINIGPT_CACHE_DIR": None}
    ),
    refused("cache_dir"),
    setup=do(lambda c: c.p("homefile").write_text("x")),
)
add(
    "env",
    "TMPDIR=/nonexistent/tmp",
    "exit 0 or refused in 1 line naming TMPDIR",
    lambda c: c.train(cache=c.p("cache"), env={"TMPDIR": "/nonexistent/tmp"}),
    works_or_refused("TMPDIR"),
)
add(
    "env",
    "WANDB_MODE=bogus with logger=wandb",
    "exit 0 (offline, with a warning) or refused in 1 line naming WANDB_MODE",
    lambda c: c.train("logger=wandb", env={"WANDB_MODE": "bogus"}, timeout=180),
    works_or_refused("WANDB_MODE"),
)
for _val in ("0", "abc"):
    add(
        "env",
        f"OMP_NUM_THREADS={_val}",
        "exit 0 or refused in 1 line naming OMP_NUM_THREADS",
        lambda c, v=_val: c.train(env={"OMP_NUM_THREADS": v}),
        works_or_refused("OMP_NUM_THREADS"),
    )
add(
    "env",
    "MINIGPT_CACHE_DIR=/dev/null, no data.cache_dir",
    "refused in 1 line naming /dev/null",
    lambda c: c.train(drop=("data.cache_dir",), env={"MINIGPT_CACHE_DIR": "/dev/null"}),
    refused("/dev/null"),
)
add(
    "env",
    "CUDA_VISIBLE_DEVICES=garbage, train.device=auto",
    "exit 0 on the CPU",
    lambda c: c.train("train.device=auto", env={"CUDA_VISIBLE_DEVICES": "garbage"}),
    works(),
)


# == report =================================================================================


def _report_folder(kind: str) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        if kind == "empty":
            c.p("runs").mkdir()
        elif kind == "file":
            c.p("runs").write_text("x")
        elif kind in ("garbage", "list", "types", "metrics", "control"):
            c.copy_base("runs")
            if kind == "garbage":
                c.p("runs", "run.json").write_text("{oops")
            elif kind == "list":
                c.p("runs", "run.json").write_text("[]")
            elif kind == "types":
                c.p("runs", "run.json").write_text('{"status": 5, "steps": "abc", "config": 1}')
            elif kind == "metrics":
                with c.p("runs", "metrics.jsonl").open("a") as f:
                    f.write('garbage\n[1]\n{"step": "x", "train/loss": "y"}\n')
        elif kind == "sweep":
            c.shared.need("base")
            for job in ("0", "1"):
                shutil.copytree(c.shared.base_run, c.p("runs", job))
            metrics = c.p("runs", "1", "metrics.jsonl")
            metrics.unlink()
            metrics.mkdir()
        elif kind == "user_report":
            c.copy_base("runs")
            c.p("runs", "report.md").write_text("# my own notes\n")
            c.snap(c.p("runs", "report.md"), run=None)

    return setup


for _kind, _what, _check, _exp in (
    ("empty", "an empty folder", refused("runs"), "refused in 1 line"),
    ("file", "a regular file", refused("runs"), "refused in 1 line"),
    ("missing", "a missing folder", refused("runs"), "refused in 1 line"),
    (
        "garbage",
        "a run folder whose run.json is not JSON",
        works_or_refused("run.json"),
        "exit 0 (the run shown as unreadable) or refused in 1 line",
    ),
    (
        "list",
        "a run folder whose run.json is []",
        works_or_refused("run.json"),
        "exit 0 or refused in 1 line",
    ),
    (
        "types",
        "a run folder whose run.json has wrong types",
        works_or_refused("run.json"),
        "exit 0 or refused in 1 line",
    ),
    ("metrics", "a run folder with garbage metrics.jsonl lines", works(), "exit 0"),
    (
        "sweep",
        "a sweep whose job 1 has a folder named metrics.jsonl",
        works_or_refused("metrics.jsonl"),
        "exit 0 or refused in 1 line",
    ),
    ("control", "a finished run folder (control)", works("report.md"), "exit 0, report.md written"),
    (
        "user_report",
        "a run folder holding the user's own report.md",
        refused("report.md", intact=True),
        "refused in 1 line, the user's report.md intact",
    ),
):
    add(
        "report",
        f"report on {_what}",
        _exp,
        lambda c: c.report(str(c.p("runs"))),
        _check,
        setup=_report_folder(_kind),
        needs=("base",),
    )
add(
    "report",
    "report --out pointing at a regular file",
    "refused in 1 line naming it",
    lambda c: c.report(str(c.p("runs")), "--out", str(c.p("afile"))),
    refused("afile"),
    setup=do(_report_folder("control"), lambda c: c.p("afile").write_text("x")),
    needs=("base",),
)


# ---- running the pass -------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    case: Case
    command: str
    ok: bool | None  # None: skipped
    text: str
    seconds: float


def run_case(index: int, case: Case, shared: Shared, cases_dir: Path, keep: bool) -> Outcome:
    folder = cases_dir / f"{index:03d}"  # no words: needles must not match the path
    started = time.monotonic()
    c = Ctx(folder, shared, index)
    ok: bool | None
    try:
        for name in case.needs:
            shared.need(name)
        if case.setup is not None:
            case.setup(c)
        cmd = case.command(c)
        c.shown = _env_shown(cmd.env) + cmd.shown
        r = c.run(cmd)
        ok, text = case.check(c, r)
        if not ok and not text.startswith("FAILED"):
            text = f"FAILED: {text} -- {summary(r)}"
    except Skip as why:
        ok, text = None, f"SKIPPED: {why}"
    except SetupFailed as why:
        ok, text = False, f"FAILED: setup failed: {why}"
    except Exception as err:  # noqa: BLE001 - a case that crashes the harness is a failure
        where = traceback.extract_tb(err.__traceback__)[-1]
        ok = False
        text = f"FAILED: harness error {type(err).__name__}: {err} (line {where.lineno})"
    finally:
        c.cleanup()
    shown = c._short(c.shown or "(no command)")
    if ok and not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return Outcome(index, case, shown, ok, c._short(text), time.monotonic() - started)


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(outcomes: list[Outcome]) -> str:
    rows = ["| # | class | case | command | expected | outcome | verdict |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- |")
    for o in outcomes:
        mark = "SKIP" if o.ok is None else ("PASS" if o.ok else "FAIL")
        cells = [str(o.index), o.case.cls, o.case.name, f"`{o.command}`", o.case.expected, o.text]
        rows.append("| " + " | ".join(_cell(x) for x in cells) + f" | {mark} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run cases matching SUBSTRING")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1)")
    parser.add_argument("--base", type=Path, default=Path("/tmp/hostile"), help="base folder")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--python", default=sys.executable, help="python of the entry points")
    parser.add_argument("--keep", action="store_true", help="keep the folders of passing cases")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    selected = [
        (i, case)
        for i, case in enumerate(CASES, 1)
        if not args.k or any(k.lower() in f"{case.cls} {case.name}".lower() for k in args.k)
    ]
    if args.list:
        for i, case in selected:
            print(f"{i:3d}  {case.cls:10s} {case.name}")
        print(f"{len(selected)} of {len(CASES)} cases")
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    root = args.base.resolve() / f"pass-{stamp}"
    shared = Shared(root / "shared", args.repo.resolve(), args.python)
    cases_dir = root / "cases"
    cases_dir.mkdir(parents=True)
    print(
        f"hostile pass: {len(selected)} cases, repo {shared.repo}, folder {root}",
        file=sys.stderr,
        flush=True,
    )
    outcomes: list[Outcome] = []
    began = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {
                pool.submit(run_case, i, case, shared, cases_dir, args.keep): i
                for i, case in selected
            }
            for future in concurrent.futures.as_completed(futures):
                o = future.result()
                outcomes.append(o)
                mark = "SKIP" if o.ok is None else ("PASS" if o.ok else "FAIL")
                print(
                    f"[{len(outcomes)}/{len(selected)}] {mark} #{o.index} {o.case.name} "
                    f"({o.seconds:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    except KeyboardInterrupt:
        with _ACTIVE_LOCK:
            for proc in list(_ACTIVE):
                _kill_group(proc)
        raise
    outcomes.sort(key=lambda o: o.index)
    passed = sum(o.ok is True for o in outcomes)
    failed = sum(o.ok is False for o in outcomes)
    skipped = sum(o.ok is None for o in outcomes)
    text = table(outcomes)
    text += f"\n\n{len(outcomes)} cases in {time.monotonic() - began:.0f}s, {skipped} skipped"
    text += f"\n{passed} passed, {failed} failed"
    print(text)
    args.base.mkdir(parents=True, exist_ok=True)
    (args.base / "table.md").write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
