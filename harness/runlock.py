"""One writer per run directory: the lock file ``<run dir>/.lock``.

Two processes running in the same directory would both run every case and write each row twice.
``RunLock`` lets only one in: the second is refused with ``RunLockedError``, which names the holder
(pid, host, since when, command line) and the directory.

How: the lock file is opened (created if missing) and locked with ``fcntl.flock`` (exclusive,
non-blocking). The kernel drops such a lock when its holder ends in any way, SIGKILL included, so
a lock file whose lock is free was left by a process that is gone. Its JSON content (pid, host,
start time, command line) names the holder in messages, and tells hosts apart: ``flock`` does not
reach across hosts on every network file system, so a free lock file written on another host is
refused rather than taken over (only a person can know that the other host's run is over), and
a free one written on this host is taken over with a warning. The holder deletes the file when it
releases the lock, on normal exit and on exceptions (``with RunLock(dir): ...``).

POSIX only: where ``fcntl`` is missing (Windows) the directory is not locked, with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run directory's lock: what its lock file says."""

    pid: int
    host: str
    since: str  # local time with UTC offset, ISO 8601
    command: str

    @classmethod
    def me(cls) -> Holder:
        """This process."""
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   since=datetime.now().astimezone().isoformat(timespec="seconds"),
                   command=shlex.join(sys.orig_argv))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a lock file's text names, or None when the text is not one (empty, torn, foreign)."""
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]), host=str(d["host"]), since=str(d["since"]), command=str(d["command"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """``pid 123 on host since 2025-01-01T10:00:00+01:00 (python -m harness ...)``."""
        command = self.command if len(self.command) <= 200 else self.command[:197] + "..."
        return f"pid {self.pid} on {self.host} since {self.since} ({command})"


class RunLockedError(RuntimeError):
    """A run directory is locked by another run.

    Attributes:
        run_dir: the directory.
        holder: what its lock file says, or None when it could not be read.
    """

    def __init__(self, message: str, run_dir: Path, holder: Holder | None) -> None:
        super().__init__(message)
        self.run_dir, self.holder = run_dir, holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """The lock of one run directory; a context manager (``with RunLock(out): ...``).

    Args:
        run_dir: the run directory; created if missing (the lock file lives in it).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock (never waits), or raise.

        Returns:
            self, holding the lock.

        Raises:
            RunLockedError: another process holds it (named in the message), or the lock file
                was written on another host and may still be in use there.
            RuntimeError: this object holds it already.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            log.warning("%s is not locked: run-directory locks need fcntl (POSIX)", self.run_dir)
            return self
        for _ in range(10):  # the file can be deleted by a releasing holder between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if taken:
                self._fd = fd
                return self
            os.close(fd)
        raise RunLockedError(f"{self.path} kept being replaced while this process tried to lock it; is another "
                             f"run starting in {self.run_dir}?", self.run_dir, None)

    def _take(self, fd: int) -> bool:
        """Lock ``fd`` and write this process into it; False if the file was replaced meanwhile."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder_of_busy_lock()
            who = holder.describe() if holder else "another process (its lock file names no holder yet)"
            raise RunLockedError(f"{self.run_dir} is in use by {who}; wait for that run to end, or choose "
                                 "another run directory (hydra.run.dir=...)", self.run_dir, holder) from None
        if not self._is_our_file(fd):
            return False
        old = Holder.parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        me = Holder.me()
        if old is not None and old.host != me.host:
            raise RunLockedError(
                f"{self.run_dir} is locked by {old.describe()}, another host, where this process cannot tell "
                f"whether that run still goes on. If that host is known to be gone (or the run over), delete "
                f"{self.path} and rerun", self.run_dir, old)
        if old is not None:
            why = "is gone" if not _pid_alive(old.pid) else "no longer holds it (its pid was reused)"
            log.warning("%s: taking over the lock of %s: that process %s", self.run_dir, old.describe(), why)
        elif os.fstat(fd).st_size:
            log.warning("%s: taking over an unreadable lock file left by a process that is gone", self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me), indent=1).encode("utf-8"), 0)
        os.fsync(fd)
        return True

    def _is_our_file(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at ``self.path`` (not one deleted by a releasing holder)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _holder_of_busy_lock(self) -> Holder | None:
        """The holder named in the lock file (which it writes right after locking: wait a moment)."""
        for _ in range(20):
            try:
                holder = Holder.parse(self.path.read_text(encoding="utf-8", errors="replace"))
            except FileNotFoundError:
                holder = None
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    def release(self) -> None:
        """Delete the lock file and drop the lock; nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._is_our_file(fd):  # delete before unlocking: no one can take a file about to vanish
                os.unlink(self.path)
        finally:
            os.close(fd)
