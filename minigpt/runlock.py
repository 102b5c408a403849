"""Who holds a run folder: one run at a time, and a holder that died never blocks it.

Rank 0 of a job holds ``run.lock`` while it trains: a second process on the same folder is
refused with one line naming the holder. The lock is a file made with ``link(2)``, which is atomic
on local disks, NFS and Lustre alike (``flock`` is not available on every Lustre mount, and NFS
emulates it). Its holder refreshes the file's mtime every :data:`HEARTBEAT_S` seconds, so a holder
that was killed outright stops blocking the folder: on its own host as soon as its pid is gone,
seen from another host once the heartbeat is :data:`STALE_AFTER_S` seconds old, and at once for
the next attempt of the same SLURM job (a requeue).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from minigpt.config import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
# Seen from another host, a holder whose heartbeat is older than this is gone. Generous, so that
# clock skew between nodes and a stalled file server do not break a live run's lock.
STALE_AFTER_S = 120.0


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked (printed as one line; nothing was changed)."""


@dataclass(frozen=True)
class Holder:
    """The process that holds a run folder, as its lock file says."""

    host: str
    pid: int
    since: str
    token: str
    pid_start: int | None = None
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


class RunLock:
    """A held run folder: the heartbeat runs until :meth:`release`."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._still_ours():
                return  # taken over (we were judged dead): never touch another run's lock
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _still_ours(self) -> bool:
        current = read_holder(self.path)
        return current is not None and current.token == self.holder.token

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def acquire(
    run_dir: Path, slurm_job_id: str | None = None, slurm_restart_count: int = 0
) -> RunLock:
    """Take ``run_dir``; raises RunFolderError naming the live holder when another run has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        token=uuid.uuid4().hex,
        pid_start=_process_start(os.getpid()),
        slurm_job_id=slurm_job_id,
        slurm_restart_count=slurm_restart_count,
    )
    for _ in range(20):
        if _try_link(path, me):
            return RunLock(path, me)
        holder = read_holder(path)
        if holder is None:  # unreadable: being replaced right now, or damaged
            if _age(path) < 5.0:
                time.sleep(0.1)
                continue
        elif not _is_gone(holder, me, path):
            raise RunFolderError(
                f"{run_dir} is in use by another run ({holder.describe()}); wait for it to "
                "end, or give this run its own hydra.run.dir"
            )
        _break(path, holder)
    raise RunFolderError(f"could not take {path}: other processes keep taking it")


def _try_link(path: Path, me: Holder) -> bool:
    """Publish our lock file whole with link(2), which fails if the name exists."""
    tmp = path.with_name(f".{path.name}.{me.token}")
    try:
        tmp.write_text(json.dumps(asdict(me)) + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            if os.stat(tmp).st_nlink == 2:  # NFS may report a failed link that happened
                return True
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_holder(path: Path) -> Holder | None:
    """The holder a lock file names; None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**data)
    except (OSError, ValueError, TypeError):
        return None


def holder_of(run_dir: Path) -> Holder | None:
    """The live holder of ``run_dir``, if any (for the report: a run with none is not running)."""
    path = Path(run_dir) / LOCK_FILE
    holder = read_holder(path)
    if holder is None or _is_gone(holder, None, path):
        return None
    return holder


def _is_gone(holder: Holder, me: Holder | None, path: Path) -> bool:
    """Whether the holder is dead (or an earlier attempt of our own SLURM job)."""
    same_job = (
        me is not None and bool(holder.slurm_job_id) and holder.slurm_job_id == me.slurm_job_id
    )
    if same_job and holder.slurm_restart_count < me.slurm_restart_count:
        return True  # SLURM requeued the job: its previous attempt is over
    if holder.host == socket.gethostname():
        start = _process_start(holder.pid)
        return start is None or (holder.pid_start is not None and start != holder.pid_start)
    return _age(path) > STALE_AFTER_S


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None when it does not exist.

    Comparing it with the lock's record tells a live holder from a new process that was given
    the same pid after the holder died.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _break(path: Path, stale: Holder | None) -> None:
    """Remove a dead holder's lock, taking care not to remove a live one that replaced it."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = read_holder(aside)
    if stale is not None and (moved is None or moved.token != stale.token):
        # Someone took the folder between our look and the rename: put their lock back.
        with contextlib.suppress(OSError):
            os.link(aside, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
