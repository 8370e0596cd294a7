"""Running one contender as a whole process: its wall time, CPU time and peak RSS."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from suite.config import CHILD_KILL_GRACE
from suite.servers import Nginx, cpu_seconds


def write_input(path: Path, count: int) -> None:
    with path.open("w") as f:
        chunk: list[str] = []
        for i in range(count):
            chunk.append(
                f'{{"instance_id":"inst-{i:07d}","event_type":"approval",'
                f'"body":{{"order":{i},"amount_cents":1999,"currency":"EUR"}}}}\n'
            )
            if len(chunk) >= 10_000:
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildResult:
    name: str
    events: int
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    exit_code: int
    timed_out: bool
    nginx_cpu_s: float | None
    rss_samples: tuple[tuple[float, float], ...] = ()  # (seconds since start, MiB)
    problem: str | None = None  # why the run does not count, if it does not

    @property
    def rate(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s / self.events * 1e6 if self.events else 0.0

    @property
    def nginx_busy(self) -> float | None:
        if self.nginx_cpu_s is None or self.wall_s <= 0:
            return None
        return self.nginx_cpu_s / self.wall_s


def _rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


# Every contender runs under this small launcher, which reports the contender's own figures.
# Linux carries a process's peak RSS across execve: a child forked from this (large) process
# would start with our RSS as its peak, so ru_maxrss would never read lower than ours. The
# launcher is a bare interpreter (-S: no site, about 6 MiB), and posix_spawn runs the
# contender in the launcher's memory until its exec, so the floor is the launcher's size.
LAUNCHER: Final = """\
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
with open(report, "w") as f:
    f.write(f"{wall} {usage.ru_utime} {usage.ru_stime} {usage.ru_maxrss} {code}")
sys.exit(code if code >= 0 else 128 - code)
"""


def _child_of(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    return None


def run_child(
    name: str,
    argv: Sequence[str],
    env: dict[str, str],
    *,
    events: int,
    timeout: float,
    log: Path,
    nginx: Nginx | None = None,
    sample_every: float | None = None,
) -> ChildResult:
    """Run one contender to its end, with its own wall time, CPU time and peak RSS."""
    if not os.path.isabs(argv[0]):
        raise ValueError(f"the launcher needs an absolute path, got {argv[0]!r}")
    worker = nginx.worker_pid() if nginx is not None else None
    nginx_before = cpu_seconds(worker)
    report = log.with_suffix(".usage")
    report.unlink(missing_ok=True)
    reaped: list[tuple[float, int, resource.struct_rusage]] = []
    with log.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER, str(report), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            # Its own process group: a Ctrl-C on the terminal reaches only us, and we stop
            # the launcher and the contender together.
            start_new_session=True,
        )

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped.append((time.perf_counter(), status, usage))

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        samples: list[tuple[float, float]] = []
        contender: int | None = None
        deadline = started + timeout
        timed_out = False
        try:
            while not reaped:
                now = time.perf_counter()
                if now >= deadline:
                    timed_out = True
                    break
                waiter.join(min(sample_every or 1.0, deadline - now))
                if sample_every is not None and not reaped:
                    contender = contender or _child_of(proc.pid)
                    rss = _rss_mib(contender) if contender is not None else None
                    if rss is not None:
                        samples.append((time.perf_counter() - started, rss))
        finally:
            # Not waiter.is_alive(): after a KeyboardInterrupt in join() it can say False
            # while the thread still waits for the child.
            if not reaped:
                _stop_child(proc.pid, reaped)
        if not reaped:
            raise RuntimeError(f"{name}: could not reap process {proc.pid}")
        ended, status, usage = reaped[0]
        proc.returncode = os.waitstatus_to_exitcode(status)
    nginx_after = cpu_seconds(worker)
    try:
        wall, utime, stime, maxrss, code = report.read_text().split()
        wall_s, cpu_s, maxrss_kib, exit_code = (
            float(wall),
            float(utime) + float(stime),
            int(maxrss),
            int(code),
        )
    except (OSError, ValueError):
        # The launcher was stopped before its contender ended: the launcher's own figures.
        wall_s = ended - started
        cpu_s = usage.ru_utime + usage.ru_stime
        maxrss_kib = usage.ru_maxrss
        exit_code = proc.returncode
    return ChildResult(
        name=name,
        events=events,
        wall_s=wall_s,
        cpu_s=cpu_s,
        maxrss_mib=maxrss_kib / 1024,  # KiB on Linux
        exit_code=exit_code,
        timed_out=timed_out,
        nginx_cpu_s=(
            nginx_after - nginx_before
            if nginx_before is not None and nginx_after is not None
            else None
        ),
        rss_samples=tuple(samples),
    )


def _stop_child(pid: int, reaped: Sequence[object]) -> None:
    """SIGTERM, then SIGKILL, to the child's process group, until the reaper has it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + CHILD_KILL_GRACE
        while not reaped and time.monotonic() < deadline:
            time.sleep(0.05)
        if reaped:
            return


def count_ok(results: Path) -> tuple[int, int]:
    """(lines, lines whose "ok" is true) of a results file."""
    lines = ok = 0
    with results.open("rb") as f:
        for raw in f:
            lines += 1
            with contextlib.suppress(ValueError):
                if json.loads(raw).get("ok") is True:
                    ok += 1
    return lines, ok
