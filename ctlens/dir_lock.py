"""Which process owns something on disk, and a lock on a directory for one process at a time.

`Owner` names a process by pid, host and start time. Whatever ctlens leaves on disk while
it works (a lock file, a hidden temporary of an atomic write) carries its owner, so a later
process can tell a live writer from a dead one: on the same host the pid is checked
(a pid reused by another process is told apart by its start time); a process on another
host cannot be checked and counts as alive.

`DirLock` keeps a second process off a directory (a run directory: two ``ctlens tune`` on
one ``--out``, e.g. a job requeued while the first still runs):

- taken with ``flock`` on ``.ctlens.lock`` inside the directory, which names its holder;
- held for the life of the holder: released when the ``with`` block or `DirLock.release`
  ends it, and by the kernel on any exit, SIGKILL included (the file then names a dead
  process on this host: stale, and taken over by the next process);
- a lock whose file names a live process (this host), or any process on another host
  (whose liveness cannot be checked), refuses with `DirLockedError`, one line naming it;
- re-entrant within a process: a second `DirLock` on a directory this process holds is a
  no-op (the command line takes the lock before loading the model, the tuner again).

Standard library only (and `ctlens.files`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from ctlens.files import parent_directory

LOCK_NAME = ".ctlens.lock"
"""The lock file inside a locked directory (hidden: never a user's file, never foreign)."""


class DirLockedError(ValueError):
    """Another process holds the directory's lock (the message names it)."""


@dataclass(frozen=True)
class Owner:
    """A process: pid, host and start time (clock ticks since boot; None where unknown)."""

    pid: int
    host: str
    start: int | None = None

    @classmethod
    def current(cls) -> Owner:
        """This process."""
        return cls(os.getpid(), socket.gethostname(), _start_ticks(os.getpid()))

    def alive(self) -> bool:
        """Whether this process still runs (a process on another host: assumed so)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, under another user
        now = _start_ticks(self.pid)
        return self.start is None or now is None or now == self.start

    def tag(self) -> str:
        """``HOST-PID``, for names of files this process writes (`parse_tag` reads it)."""
        return f"{self.host.replace('-', '_')}-{self.pid}"

    @classmethod
    def parse_tag(cls, text: str) -> Owner | None:
        """The owner a `tag` names (its host with ``_`` for ``-``), or None."""
        host, _, pid = text.rpartition("-")
        if not host or not pid.isdigit():
            return None
        here = socket.gethostname()
        return cls(int(pid), here if host == here.replace("-", "_") else host)


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (the process's start time), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 else None


class DirLock:
    """An exclusive lock on ``directory`` for this process (see the module docstring).

    Args:
        directory: the directory to lock (created if missing, removed again on release if
            the lock was all it held).
        what: what the lock protects, for the refusal ("ctlens tune", say).
    """

    def __init__(self, directory: str | Path, what: str = "a ctlens process") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> DirLock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise `DirLockedError` naming the process that holds it."""
        me = Owner.current()
        self._created = not self.directory.exists()
        parent_directory(self.path)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._holder()
                if holder is not None and holder[0] == me:
                    return  # this process holds it already (re-entrant)
                raise DirLockedError(self._refusal(holder)) from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder removed the file while we waited: try the new one
        holder = self._holder()
        if holder is not None and holder[0] != me and holder[0].alive():
            # flock said free, but the file names a live process: flock does not work on
            # this file system (or the holder is on another host): trust the file
            os.close(fd)
            raise DirLockedError(self._refusal(holder))
        os.ftruncate(fd, 0)
        record = {**asdict(me), "since": _now(), "command": " ".join(sys.argv)[:300]}
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (a no-op if this `DirLock` did not take it)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if the lock was all it held

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> tuple[Owner, dict[str, object]] | None:
        """The owner the lock file names, with its record (None: empty or unreadable)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            return Owner(int(record["pid"]), str(record["host"]), record.get("start")), record
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _refusal(self, holder: tuple[Owner, dict[str, object]] | None) -> str:
        if holder is None:
            return (f"{self.directory} is in use by another process (its lock {self.path} is "
                    "held); wait for it to finish, or choose another directory")
        owner, record = holder
        here = owner.host == socket.gethostname()
        where = "" if here else f" on host {owner.host}"
        gone = (f"; if it is gone (its host is down), delete {self.path}" if not here else "")
        return (
            f"{self.directory} is in use by {self.what} (pid {owner.pid}{where}, since "
            f"{record.get('since', '?')}): wait for it to finish or stop it, or choose "
            f"another directory{gone}"
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
