"""One run at a time per results: an exclusive ``flock`` on ``<results>.lock``.

Two runs appending to the same results (a cron overlap, a wrapper that left its child
running) would both send the records neither has an envelope for yet: every one of them
twice. So a run takes an exclusive lock on a file beside its results before it reads or
writes anything there, and holds it for its whole life. The lock is the kernel's
(``fcntl.flock``): it belongs to the open file, so it goes away with the last process
holding that file open, however it ends (kill -9 included), and it never goes stale.
``--processes`` workers inherit the parent's descriptor, so the results stay locked until
the parent and every worker are gone.

The holder writes its pid into the file, for the message a second run prints, and removes
the file when it releases the lock, so a run leaves nothing behind. Removing a lock file
races with a run that opened it just before: that run would lock a file no longer in the
folder. So a run that gets the lock checks that the path still names the file it locked,
and starts over when it does not (the usual flock-and-unlink protocol). After kill -9 the
file stays, unlocked: the next run takes it over.

Standard library rather than the ``filelock`` package: that one's Unix lock is this same
``flock`` call, and it neither records nor reports the holder's pid, which is the one
thing the message needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Final

from dispatcher.model import UserError
from dispatcher.results.errors import cleanup_warning

SUFFIX: Final = ".lock"


class ResultsLocked(UserError):
    """Another live run holds the results (exit 2, before anything is sent)."""

    exit_code = 2

    def __init__(self, results: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
        super().__init__(
            f"--results {results} is in use by another dispatcher run ({who}); "
            "wait for it to end, or choose another --results path"
        )
        self.results = results
        self.pid = pid


def path_for(results: str) -> str | None:
    """The lock file beside a results file; none when results go to stdout."""
    return None if results == "-" else results + SUFFIX


class ResultsLock:
    """The held lock. :meth:`fileno` is what ``--processes`` passes on to its workers."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def release(self) -> str | None:
        """Remove the lock file (still holding it) and close this process's descriptor.

        Workers that inherited the descriptor are gone by the time their parent releases.
        Returns a warning when the file could not be removed (an immutable or read-only
        folder): the lock itself ends with the descriptor all the same.
        """
        if self._fd < 0:
            return None
        warning = None
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            warning = cleanup_warning(
                self.path,
                exc,
                "it is harmless: the lock ended with this run, and the next "
                "run takes the file over",
            )
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        return warning


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split()[0])
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def acquire(results: str) -> ResultsLock | None:
    """Lock ``results`` for this run, or raise :class:`ResultsLocked`. None for stdout."""
    path = path_for(results)
    if path is None:
        return None
    while True:
        # O_CLOEXEC: only the workers we hand it to on purpose (pass_fds) inherit it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise ResultsLocked(results, pid) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed it as we opened it: lock the file there now
    with contextlib.suppress(OSError):  # the pid is for the message only
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return ResultsLock(path, fd)
