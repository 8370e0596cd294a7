"""The benchmark: `dispatcher send` against a hand-written aiohttp pool and the official SDK.

    .venv/bin/python benchmarks/run.py            # full run, writes BENCHMARKS.md
    .venv/bin/python benchmarks/run.py --quick    # fewer rounds and events, no 1M-record run

One command, one run, three contenders sending the same generated JSONL events to the same
local server, each as a whole process (JSONL in, one result line per event out):

- ``dispatcher``: ``dispatcher send --rate unlimited --concurrency 64 --quiet ...``;
- ``baseline``: ``benchmarks/baseline_aiohttp.py``, the simplest competent hand-written
  aiohttp worker pool;
- ``sdk``: ``benchmarks/sdk_cloudflare.py``, the official ``cloudflare`` SDK's
  ``AsyncCloudflare`` behind a bounded worker pool.

The server is nginx from Debian answering the API's success envelope on 127.0.0.1 (installed
with apt-get if missing, started as a child process with its config in a temporary
directory, stopped at the end, whatever happens). wrk measures its ceiling first, and its
worker's CPU time is read during every run, to show it is not the bottleneck.

The machine is shared and noisy, so the runs are interleaved (the order rotates each
round), every figure is a median over rounds, and the verdicts are ratios between
contenders measured in the same run. Every contender runs under a small launcher that
reaps it with ``os.wait4``, which gives its own peak RSS and CPU time. The script also
measures `dispatcher send`'s peak RSS at 100k and 1M records, and its rate accuracy at
``--rate 500/s``.

Traffic goes to 127.0.0.1 only. Every loop is bounded in count, every wait in time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent
REPORT: Final = REPO / "BENCHMARKS.md"

ACCOUNT: Final = "bench-account"
WORKFLOW: Final = "bench-wf"
TOKEN: Final = "bench-token"
SUCCESS_BODY: Final = (
    '{"success":true,"errors":[],"messages":[],'
    '"result":{"instanceId":"x","timestamp":"2026-01-01T00:00:00Z"}}'
)
EVENT_BODY: Final = '{"order":42,"amount_cents":1999,"currency":"EUR"}'
CONCURRENCY: Final = 64
SDK_EVENTS: Final = 2500

# Targets from the issue.
TARGET_VS_BASELINE: Final = 1.5
TARGET_VS_SDK: Final = 10.0
TARGET_RSS_MIB: Final = 60.0
TARGET_RATE_ERROR: Final = 0.02
FLAT_TOLERANCE: Final = 0.10  # peak RSS at 1M within 10% of the peak at 100k

NGINX_START_TIMEOUT: Final = 10.0
NGINX_STOP_TIMEOUT: Final = 10.0
WRK_SECONDS: Final = 5
CHILD_KILL_GRACE: Final = 5.0

CONTENDERS: Final = ("dispatcher", "baseline", "sdk")


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


# --- tools and machine ------------------------------------------------------------------


def ensure_tools() -> None:
    """nginx and wrk, installed from Debian with apt-get if missing."""
    missing = [tool for tool in ("nginx", "wrk") if find_tool(tool) is None]
    if not missing:
        say(f"nginx and wrk found ({find_tool('nginx')}, {find_tool('wrk')})")
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"bench: {' and '.join(missing)} missing and not root: "
            "run `apt-get install -y nginx wrk` first"
        )
    say(f"{' and '.join(missing)} missing: installing nginx and wrk with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "nginx", "wrk"], check=True, env=env, timeout=900
    )
    still = [tool for tool in ("nginx", "wrk") if find_tool(tool) is None]
    if still:
        raise SystemExit(f"bench: apt-get did not provide {', '.join(still)}")
    say("installed nginx and wrk")


def find_tool(name: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-login root shell may not have on its PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def tool_version(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0] if text else "?"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    git = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
        git = head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} (nproc {len(os.sched_getaffinity(0))})",
        "cpu": cpu,
        "ram": ram,
        "os": f"{platform.system()} {platform.release()} ({_os_release()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "aiohttp": package_version("aiohttp"),
        "cloudflare": package_version("cloudflare"),
        "httpx": package_version("httpx"),
        "anyio": package_version("anyio"),
        "orjson": package_version("orjson"),
        "uvloop": package_version("uvloop"),
        "nginx": tool_version([find_tool("nginx") or "nginx", "-v"]),
        "wrk": tool_version([find_tool("wrk") or "wrk", "-v"]).split(" Copyright")[0],
        "git": git,
        "loops": event_loops(),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return "?"


def event_loops() -> str:
    """Which event loop each contender runs on."""
    try:
        from dispatcher.run import runner
    except ImportError:
        return "?"
    options = getattr(runner, "backend_options", None)
    uses_uvloop = callable(options) and bool(options().get("use_uvloop"))
    dispatcher_loop = (
        f"uvloop {package_version('uvloop')} (installed, so dispatcher uses it)"
        if uses_uvloop
        else "asyncio's default loop"
    )
    return f"dispatcher: {dispatcher_loop}; baseline and sdk: asyncio's default loop"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# --- nginx --------------------------------------------------------------------------------

NGINX_CONF: Final = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    log_format arrival '$msec';
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # `return` discards the request body; bodies up to the API's 1 MiB limit are accepted.
    client_max_body_size 2m;
    client_body_buffer_size 1m;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        {location}
        location / {{ return 404; }}
    }}
    # The same answer, with every request's arrival time logged: for the rate test only.
    server {{
        listen 127.0.0.1:{log_port};
        access_log {tmp}/arrivals.log arrival;
        {location}
        location / {{ return 404; }}
    }}
}}
"""

NGINX_LOCATION: Final = (
    "location ~ ^/client/v4/accounts/[^/]+/workflows/[^/]+/instances/[^/]+/events/[^/]+$ "
    "{ default_type application/json; return 200 '" + SUCCESS_BODY + "'; }"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/client/v4"


def event_path(instance_id: str = "inst-1", event_type: str = "approval") -> str:
    return (
        f"/client/v4/accounts/{ACCOUNT}/workflows/{WORKFLOW}"
        f"/instances/{instance_id}/events/{event_type}"
    )


class Nginx:
    """nginx as a foreground child process with everything in a temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "nginx"
        self.dir.mkdir()
        self.port = free_port()
        self.log_port = free_port()
        while self.log_port == self.port:  # bounded in practice: the kernel hands out new ports
            self.log_port = free_port()
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(
                tmp=self.dir, port=self.port, log_port=self.log_port, location=NGINX_LOCATION
            )
        )
        self.arrivals = self.dir / "arrivals.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        nginx = find_tool("nginx") or "nginx"
        argv = [nginx, "-p", str(self.dir), "-c", str(self.conf), "-e", str(self.dir / "e.log")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected its config:\n{check.stderr}")
        # Its own session: a Ctrl-C on the terminal reaches us, and we stop nginx ourselves.
        self.proc = subprocess.Popen(
            [*argv, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "wb"),  # noqa: SIM115 (the child holds it)
            start_new_session=True,
        )
        deadline = time.monotonic() + NGINX_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {self.proc.returncode}: "
                    + (self.dir / "stderr.log").read_text(errors="replace")
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                with socket.create_connection(("127.0.0.1", self.log_port), timeout=0.5):
                    pass
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start listening in time") from None
                time.sleep(0.05)
        say(
            f"nginx {self.proc.pid} started on 127.0.0.1:{self.port} "
            f"(and :{self.log_port} logging arrivals), config {self.conf}"
        )

    def check_answer(self) -> None:
        """A POST with a JSON body gets 200 and the success envelope; other paths 404."""
        for port in (self.port, self.log_port):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(
                    "POST",
                    event_path(),
                    body=EVENT_BODY.encode(),
                    headers={
                        "Content-Type": "application/json",
                        "Authorization": f"Bearer {TOKEN}",
                    },
                )
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status != 200 or json.loads(body) != json.loads(SUCCESS_BODY):
                    raise RuntimeError(f"nginx answered {resp.status} {body!r}")
                # Keep-alive: a second POST on the same connection.
                conn.request("POST", event_path("inst-2"), body=b"{}")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"nginx answered {resp.status} on a kept-alive connection")
                conn.request("POST", "/client/v4/elsewhere", body=b"{}")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 404:
                    raise RuntimeError(f"nginx answered {resp.status} for an unknown path")
            finally:
                conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.arrivals.write_bytes(b"")  # drop the checks' own lines

    def worker_pid(self) -> int | None:
        if self.proc is None:
            return None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    return int(stat.parent.name)
        return None

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                proc.wait(timeout=NGINX_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=NGINX_STOP_TIMEOUT)
        say(f"nginx {proc.pid} stopped (exit {proc.returncode})")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_ceiling(nginx: Nginx, tmp: Path, connections: int) -> tuple[float, str]:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{EVENT_BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
    )
    argv = [
        find_tool("wrk") or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{WRK_SECONDS}s",
        "-s",
        str(script),
        f"http://127.0.0.1:{nginx.port}{event_path()}",
    ]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=WRK_SECONDS + 30, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        say(f"warning: wrk saw errors:\n{out}")
    return float(match.group(1)), f"wrk -t1 -c{connections} -d{WRK_SECONDS}s -s post.lua URL"


# --- inputs and children -------------------------------------------------------------------


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


@dataclass(slots=True)
class Setup:
    tmp: Path
    nginx: Nginx
    env: dict[str, str]
    concurrency: int
    python: str = sys.executable


def child_env(port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLOUDFLARE_", "DISPATCHER_")) and k != "PYTHONPATH"
    }
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN,
        CLOUDFLARE_ACCOUNT_ID=ACCOUNT,
        CLOUDFLARE_BASE_URL=base_url(port),
    )
    return env


def dispatcher_argv(
    setup: Setup, inp: Path, out: Path, *, rate: str = "unlimited", port: int | None = None
) -> list[str]:
    argv = [
        setup.python,
        "-m",
        "dispatcher",
        "send",
        str(inp),
        "--workflow",
        WORKFLOW,
        "--results",
        str(out),
        "--rate",
        rate,
        "--concurrency",
        str(setup.concurrency),
        "--quiet",
        "--overwrite",
        "--progress",
        "off",
    ]
    if port is not None:
        argv += ["--base-url", base_url(port)]
    return argv


def script_argv(setup: Setup, script: str, inp: Path, out: Path) -> list[str]:
    return [
        setup.python,
        str(BENCH_DIR / script),
        str(inp),
        str(out),
        "--base-url",
        base_url(setup.nginx.port),
        "--account-id",
        ACCOUNT,
        "--workflow",
        WORKFLOW,
        "--concurrency",
        str(setup.concurrency),
    ]


def contender_argv(setup: Setup, name: str, inp: Path, out: Path) -> list[str]:
    if name == "dispatcher":
        return dispatcher_argv(setup, inp, out)
    if name == "baseline":
        return script_argv(setup, "baseline_aiohttp.py", inp, out)
    return script_argv(setup, "sdk_cloudflare.py", inp, out)


def run_timeout(events: int) -> float:
    return 60.0 + events / 50.0  # even a slow contender does 50 events/s here


def run_checked(
    setup: Setup,
    name: str,
    inp: Path,
    events: int,
    *,
    label: str,
    timeout: float | None = None,
    sample_every: float | None = None,
) -> ChildResult:
    out = setup.tmp / f"{name}-{label}.results.jsonl"
    log = setup.tmp / f"{name}-{label}.log"
    timeout = timeout if timeout is not None else run_timeout(events)
    result = run_child(
        name,
        contender_argv(setup, name, inp, out),
        setup.env,
        events=events,
        timeout=timeout,
        log=log,
        nginx=setup.nginx,
        sample_every=sample_every,
    )
    lines, ok = count_ok(out) if out.exists() else (0, 0)
    problems = []
    if result.timed_out:
        problems.append(f"stopped after the {timeout:.0f} s time limit")
    if result.exit_code != 0:
        problems.append(f"exit code {result.exit_code}")
    if lines != events or ok != events:
        problems.append(f"{ok} ok results in {lines} lines for {events} events")
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    if not problems:
        return result
    tail = log.read_text(errors="replace")[-2000:]
    say(f"warning: {name} ({label}): {'; '.join(problems)}; its output ends with:\n{tail}")
    return dataclasses.replace(result, problem="; ".join(problems))


# --- the three parts ----------------------------------------------------------------------


@dataclass(slots=True)
class Comparison:
    events: dict[str, int]
    rounds: list[dict[str, ChildResult]] = field(default_factory=list)
    startup: list[dict[str, ChildResult]] = field(default_factory=list)

    def results(self, name: str) -> list[ChildResult]:
        """The runs of ``name`` that count: exit code 0, one ok result per event."""
        return [r[name] for r in self.rounds if r[name].problem is None]

    def failed(self) -> list[ChildResult]:
        return [r for rnd in self.rounds for r in rnd.values() if r.problem is not None]

    def median_rate(self, name: str) -> float:
        return statistics.median(r.rate for r in self.results(name))

    def median_startup(self, name: str) -> float:
        return statistics.median(s[name].wall_s for s in self.startup if s[name].problem is None)

    def steady_rate(self, name: str) -> float:
        """Events/s with the median 1-event run's wall time (start-up, imports) taken out."""
        startup = self.median_startup(name)
        rates = [
            (r.events - 1) / (r.wall_s - startup) for r in self.results(name) if r.wall_s > startup
        ]
        return statistics.median(rates) if rates else 0.0

    def round_ratios(self, a: str, b: str) -> list[float]:
        return [
            r[a].rate / r[b].rate
            for r in self.rounds
            if r[a].problem is None and r[b].problem is None and r[b].rate > 0
        ]


def compare(setup: Setup, rounds: int, events: int, sdk_events: int) -> Comparison:
    counts = {"dispatcher": events, "baseline": events, "sdk": sdk_events}
    inputs: dict[int, Path] = {}
    for n in sorted({*counts.values(), 1}):
        inputs[n] = setup.tmp / f"input-{n}.jsonl"
        write_input(inputs[n], n)  # each is a prefix of the largest: the same events
    comparison = Comparison(events=counts)
    for rnd in range(rounds):
        order = CONTENDERS[rnd % 3 :] + CONTENDERS[: rnd % 3]
        say(f"round {rnd + 1}/{rounds} ({', '.join(order)}), load {load()}")
        startup: dict[str, ChildResult] = {}
        for name in order:
            startup[name] = run_checked(setup, name, inputs[1], 1, label=f"start{rnd}")
        comparison.startup.append(startup)
        results: dict[str, ChildResult] = {}
        for name in order:
            r = run_checked(setup, name, inputs[counts[name]], counts[name], label=f"r{rnd}")
            results[name] = r
            say(
                f"  {name:<10} {r.events:>7} events {r.wall_s:7.2f} s {r.rate:8.0f} events/s  "
                f"CPU {r.cpu_us_per_event:5.0f} us/event  peak RSS {r.maxrss_mib:5.1f} MiB  "
                f"nginx busy {_pct(r.nginx_busy)}"
            )
        comparison.rounds.append(results)
    for path in inputs.values():
        path.unlink()
    for name in CONTENDERS:
        if not comparison.results(name) or not any(
            s[name].problem is None for s in comparison.startup
        ):
            raise RuntimeError(f"every run of {name} failed: see the warnings above")
    return comparison


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRun:
    records: int
    result: ChildResult


def memory_runs(setup: Setup, sizes: Sequence[int], big_timeout: float) -> list[MemoryRun]:
    runs = []
    for n in sizes:
        inp = setup.tmp / f"memory-{n}.jsonl"
        write_input(inp, n)
        timeout = big_timeout if n > 100_000 else min(big_timeout, run_timeout(n))
        say(f"memory: dispatcher send with {n:,} records (time limit {timeout:.0f} s)")
        r = run_checked(
            setup, "dispatcher", inp, n, label=f"mem{n}", timeout=timeout, sample_every=1.0
        )
        inp.unlink()
        say(
            f"  {n:>9,} records {r.wall_s:7.1f} s {r.rate:8.0f} events/s  "
            f"peak RSS {r.maxrss_mib:5.1f} MiB; RSS by tenths: {_deciles(r.rss_samples)}"
        )
        runs.append(MemoryRun(records=n, result=r))
    return runs


@dataclass(frozen=True, slots=True, kw_only=True)
class RateRun:
    requested: float
    events: int
    result: ChildResult
    server_rate: float
    server_span_s: float
    client_rate: float
    max_per_second: int
    arrivals: int


def achieved(times: Sequence[float]) -> tuple[float, float]:
    """Requests per second between the first and the last request: (n - 1) / span."""
    if len(times) < 2:
        return 0.0, 0.0
    span = max(times) - min(times)
    return ((len(times) - 1) / span if span > 0 else 0.0), span


def max_in_window(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def rate_run(setup: Setup, rate: float, seconds: float) -> RateRun:
    events = round(rate * seconds)
    inp = setup.tmp / "rate.jsonl"
    out = setup.tmp / "rate.results.jsonl"
    write_input(inp, events)
    setup.nginx.arrivals.write_bytes(b"")
    say(f"rate: dispatcher send --rate {rate:g}/s with {events} events")
    result = run_child(
        "dispatcher",
        dispatcher_argv(setup, inp, out, rate=f"{rate:g}/s", port=setup.nginx.log_port),
        setup.env,
        events=events,
        timeout=seconds * 3 + 60,
        log=setup.tmp / "rate.log",
        nginx=setup.nginx,
    )
    # nginx writes each access-log line as its request ends; no buffering is configured.
    arrivals = [float(x) for x in setup.nginx.arrivals.read_text().split()]
    server_rate, span = achieved(arrivals)
    # Client side: an envelope's finished_at minus its latency is when its request left.
    sent: list[float] = []
    ok = 0
    with contextlib.suppress(FileNotFoundError), out.open("rb") as f:
        for raw in f:
            env = json.loads(raw)
            ok += env.get("ok") is True
            if env.get("finished_at") and env.get("latency_ms") is not None:
                finished = dt.datetime.fromisoformat(env["finished_at"]).timestamp()
                sent.append(finished - env["latency_ms"] / 1000.0)
    client_rate, _ = achieved(sent)
    if result.exit_code != 0 or result.timed_out or ok != events or len(arrivals) != events:
        tail = (setup.tmp / "rate.log").read_text(errors="replace")[-2000:]
        say(
            f"warning: rate run: exit code {result.exit_code}, {ok} ok envelopes and "
            f"{len(arrivals)} requests seen for {events} events; its output ends with:\n{tail}"
        )
    inp.unlink()
    out.unlink(missing_ok=True)
    run = RateRun(
        requested=rate,
        events=events,
        result=result,
        server_rate=server_rate,
        server_span_s=span,
        client_rate=client_rate,
        max_per_second=max_in_window(arrivals, 1.0),
        arrivals=len(arrivals),
    )
    say(
        f"  server saw {run.arrivals} requests over {span:.3f} s = {server_rate:.1f}/s "
        f"({_signed_pct(server_rate / rate - 1)}); client envelopes {client_rate:.1f}/s; "
        f"max {run.max_per_second} in any 1 s"
    )
    return run


# --- the report ---------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _signed_pct(x: float) -> str:
    return f"{x:+.2%}"


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "not checked"
    return "**met**" if ok else "**NOT met**"


def _range(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(min(values))} - {fmt(max(values))}" if values else "n/a"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _deciles(samples: Sequence[tuple[float, float]]) -> str:
    """RSS at 10%, 20%, ... 100% of the run's samples, MiB."""
    if not samples:
        return "n/a"
    n = len(samples)
    return " ".join(f"{samples[min(n - 1, (n * k) // 10)][1]:.0f}" for k in range(1, 11))


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass(slots=True)
class Report:
    command: str
    mode: str
    machine: dict[str, str]
    load_start: str
    concurrency: int
    load_end: str = ""
    wrk_rates: list[float] = field(default_factory=list)
    wrk_command: str = ""
    comparison: Comparison | None = None
    memory: list[MemoryRun] = field(default_factory=list)
    rate: RateRun | None = None
    elapsed_s: float = 0.0

    # -- figures

    def ratio(self, a: str, b: str) -> float:
        c = self.comparison
        assert c is not None
        return c.median_rate(a) / c.median_rate(b)

    def steady_ratio(self, a: str, b: str) -> float:
        c = self.comparison
        assert c is not None
        return c.steady_rate(a) / c.steady_rate(b)

    def cpu_ratio(self, a: str, b: str) -> float:
        """CPU per event of ``b`` over that of ``a``: above 1, ``a`` is cheaper."""
        c = self.comparison
        assert c is not None
        return statistics.median(r.cpu_us_per_event for r in c.results(b)) / statistics.median(
            r.cpu_us_per_event for r in c.results(a)
        )

    def memory_pair(self) -> tuple[MemoryRun, MemoryRun] | None:
        """The smallest and the largest memory run, if both ran to the end."""
        done = [m for m in self.memory if not m.result.timed_out]
        if len(done) < 2:
            return None
        return done[0], done[-1]

    def verdicts(self) -> list[Verdict]:
        out = []
        if self.comparison is not None:
            for other, target in (("baseline", TARGET_VS_BASELINE), ("sdk", TARGET_VS_SDK)):
                ratio = self.ratio("dispatcher", other)
                out.append(
                    Verdict(
                        target=f"dispatcher >= {target:g}x {other}'s events/s",
                        measured=f"{_x(ratio)} (excl. start-up "
                        f"{_x(self.steady_ratio('dispatcher', other))})",
                        met=ratio >= target,
                    )
                )
        pair = self.memory_pair()
        if pair is not None and pair[1].records >= 1_000_000:
            small, big = pair
            out.append(
                Verdict(
                    target=f"peak RSS <= {TARGET_RSS_MIB:g} MiB at {big.records:,} records",
                    measured=f"{big.result.maxrss_mib:.1f} MiB",
                    met=big.result.maxrss_mib <= TARGET_RSS_MIB,
                )
            )
            grow = big.result.maxrss_mib - small.result.maxrss_mib
            out.append(
                Verdict(
                    target=f"peak RSS flat from {small.records:,} to {big.records:,} records "
                    f"(within {FLAT_TOLERANCE:.0%})",
                    measured=f"{small.result.maxrss_mib:.1f} -> {big.result.maxrss_mib:.1f} MiB "
                    f"({grow:+.1f} MiB)",
                    met=big.result.maxrss_mib <= small.result.maxrss_mib * (1 + FLAT_TOLERANCE),
                )
            )
        else:
            largest = max((m for m in self.memory), key=lambda m: m.records, default=None)
            out.append(
                Verdict(
                    target=f"peak RSS <= {TARGET_RSS_MIB:g} MiB at 1,000,000 records, flat",
                    measured="1M-record run not done"
                    + (
                        f"; {largest.result.maxrss_mib:.1f} MiB at {largest.records:,}"
                        if largest is not None
                        else ""
                    ),
                    met=None,
                )
            )
        if self.rate is not None:
            r = self.rate
            err = r.server_rate / r.requested - 1
            out.append(
                Verdict(
                    target=f"rate within {TARGET_RATE_ERROR:.0%} of {r.requested:g}/s "
                    f"over {r.events / r.requested:g} s",
                    measured=f"{r.server_rate:.1f}/s ({_signed_pct(err)})",
                    met=abs(err) <= TARGET_RATE_ERROR,
                )
            )
        return out

    # -- tables

    def contender_table(self) -> list[str]:
        c = self.comparison
        assert c is not None
        rows = [
            "| contender | events | events/s | range | excl. start-up | CPU us/event "
            "| peak RSS MiB | start-up s | nginx busy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in CONTENDERS:
            rs = c.results(name)
            busy = [r.nginx_busy for r in rs if r.nginx_busy is not None]
            rows.append(
                f"| {name} | {c.events[name]:,} | **{c.median_rate(name):,.0f}** | "
                f"{_range([r.rate for r in rs], lambda x: f'{x:,.0f}')} | "
                f"{c.steady_rate(name):,.0f} | "
                f"{statistics.median(r.cpu_us_per_event for r in rs):,.0f} | "
                f"{statistics.median(r.maxrss_mib for r in rs):.1f} | "
                f"{c.median_startup(name):.2f} | "
                f"{_pct(statistics.median(busy)) if busy else 'n/a'} |"
            )
        return rows

    def ratio_table(self) -> list[str]:
        c = self.comparison
        assert c is not None
        rows = [
            "| ratio | of the medians | per round | excl. start-up | CPU per event | target |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for other, target in (("baseline", TARGET_VS_BASELINE), ("sdk", TARGET_VS_SDK)):
            ratio = self.ratio("dispatcher", other)
            rows.append(
                f"| dispatcher / {other} | **{_x(ratio)}** | "
                f"{_range(c.round_ratios('dispatcher', other), _x)} | "
                f"{_x(self.steady_ratio('dispatcher', other))} | "
                f"{_x(self.cpu_ratio('dispatcher', other))} | "
                f">= {target:g}x: {_verdict(ratio >= target)} |"
            )
        return rows

    def memory_table(self) -> list[str]:
        rows = [
            "| records | wall s | events/s | peak RSS MiB "
            "| RSS at 10%, 20% ... 100% of the run, MiB |",
            "| ---: | ---: | ---: | ---: | --- |",
        ]
        for m in self.memory:
            r = m.result
            flag = " (stopped at its time limit)" if r.timed_out else ""
            rows.append(
                f"| {m.records:,}{flag} | {r.wall_s:.1f} | {r.rate:,.0f} | "
                f"**{r.maxrss_mib:.1f}** | {_deciles(r.rss_samples)} |"
            )
        return rows

    def rate_table(self) -> list[str]:
        r = self.rate
        assert r is not None
        return [
            "| requested | requests seen | span s | achieved (server) | error "
            "| achieved (envelopes) | max in any 1 s | wall s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r.requested:g}/s | {r.arrivals:,} | {r.server_span_s:.3f} | "
            f"**{r.server_rate:.1f}/s** | {_signed_pct(r.server_rate / r.requested - 1)} | "
            f"{r.client_rate:.1f}/s | {r.max_per_second} | {r.result.wall_s:.2f} |",
        ]

    def verdict_table(self) -> list[str]:
        rows = ["| target | measured | |", "| --- | --- | --- |"]
        rows += [f"| {v.target} | {v.measured} | {_verdict(v.met)} |" for v in self.verdicts()]
        return rows

    # -- outputs

    def text_summary(self) -> str:
        lines = ["", "=" * 100]
        lines.append(
            "nginx ceiling (wrk): " + ", ".join(f"{w:,.0f}" for w in self.wrk_rates) + " req/s"
        )
        if self.comparison is not None:
            lines += ["", *self.contender_table(), "", *self.ratio_table()]
        if self.memory:
            lines += ["", *self.memory_table()]
        if self.rate is not None:
            lines += ["", *self.rate_table()]
        lines += ["", *self.verdict_table(), "=" * 100]
        return "\n".join(lines)

    def markdown(self) -> str:
        m = self.machine
        conc = self.concurrency
        out = [
            "# Benchmarks",
            "",
            "Written by `benchmarks/run.py` (`make bench`); run it again rather than edit. "
            f"Mode: **{self.mode}**; the whole run took {self.elapsed_s / 60:.1f} min:",
            "",
            "```",
            self.command,
            "```",
            "",
            "Read the ratios: absolute figures move with the machine and its load, ratios "
            "between contenders measured in the same run, interleaved, much less.",
            "",
            "## Targets",
            "",
            *self.verdict_table(),
            "",
            "## Machine",
            "",
            "| | |",
            "| --- | --- |",
            f"| date | {m['date']} |",
            f"| CPUs | {m['cpus']}: {m['cpu']} |",
            f"| RAM | {m['ram']} |",
            f"| OS | {m['os']} |",
            f"| Python | {m['python']} |",
            f"| packages | aiohttp {m['aiohttp']}, cloudflare {m['cloudflare']} "
            f"(httpx {m['httpx']}), anyio {m['anyio']}, orjson {m['orjson']}, "
            f"uvloop {m['uvloop']} |",
            f"| event loops | {m['loops']} |",
            f"| server | {m['nginx']} |",
            f"| load generator | {m['wrk']} |",
            f"| code measured | git {m['git']} |",
            f"| load average (1, 5, 15 min) | {self.load_start} at the start, "
            f"{self.load_end} at the end |",
            "",
            "The machine is shared with other work (see the load average): expect noise in "
            "absolute figures.",
            "",
            "## The server: nginx, not the bottleneck",
            "",
            "nginx answers the success envelope with `return 200` on 127.0.0.1 (1 worker "
            "process, access log off), for any path of the send-event endpoint. Its ceiling, "
            f"measured with `{self.wrk_command}` posting a {len(EVENT_BODY)}-byte JSON body "
            "at the start and at the end of the run: **"
            + " and ".join(f"{w:,.0f}" for w in self.wrk_rates)
            + " requests/s**.",
        ]
        if self.comparison is not None:
            c = self.comparison
            fastest = max(c.median_rate(n) for n in CONTENDERS)
            out += [
                f"The lower of the two is {min(self.wrk_rates) / fastest:.0f}x the fastest "
                "contender below, and the `nginx busy` column (CPU time of the nginx worker "
                "during a run / the run's wall time) shows how little of one core it needed.",
                "",
                "## Events per second: three contenders, interleaved",
                "",
                f"{len(c.rounds)} rounds; in each, every contender runs once, in an order that "
                f"rotates from round to round, with {conc} requests in flight at most. Each run "
                "is a whole process: start the interpreter, read the JSONL, send every event, "
                "write one result line per event, exit. events/s = events / wall time of that "
                "process. CPU and peak RSS come from `os.wait4` (the process's own "
                "`ru_utime + ru_stime` and `ru_maxrss`, taken by a bare `python -S` launcher "
                "that posix_spawns the contender: Linux carries the peak RSS across exec, so a "
                "contender forked from the benchmark itself would inherit its size as a "
                "floor). Every run is checked: exit code 0 and one `ok` result line per "
                "event. Figures are medians over the rounds.",
                "",
                "- **dispatcher**: `dispatcher send INPUT --workflow W --results OUT "
                f"--rate unlimited --concurrency {conc} --quiet --overwrite --progress off`",
                "- **baseline**: `benchmarks/baseline_aiohttp.py`, the simplest hand-written "
                f"aiohttp worker pool: one `ClientSession`, an `asyncio.Queue`, {conc} workers, "
                "`json.loads` per line, `session.post(url, json=body, headers=auth)`, "
                "`json.dumps` per result line",
                "- **sdk**: `benchmarks/sdk_cloudflare.py`, the official `cloudflare` SDK's "
                "`AsyncCloudflare` (default retries) behind the same kind of pool, "
                "`client.workflows.instances.events.create(...)` per event",
                "",
            ]
            if c.events["sdk"] != c.events["dispatcher"]:
                out += [
                    f"The SDK is much slower per event, so it sends the first "
                    f"{c.events['sdk']:,} events of the same input instead of all "
                    f"{c.events['dispatcher']:,}; its runs still last about as long as the "
                    "others'.",
                    "",
                ]
            out += [
                *self.contender_table(),
                "",
                "`range`: slowest and fastest round. `excl. start-up`: events/s with the median "
                "wall time of a 1-event run of the same contender (interpreter start, imports, "
                "set-up, exit; one in every round) taken out. `CPU us/event`: the process's "
                "CPU time / events, less sensitive to the machine's load than wall time.",
                "",
                *self.ratio_table(),
                "",
                "`per round`: the ratio within each round, lowest and highest. "
                "`CPU per event`: the other's CPU per event / dispatcher's (above 1: "
                "dispatcher spends less CPU per event).",
            ]
        out += ["", "## Peak RSS of `dispatcher send` by input size", ""]
        if self.memory:
            out += [
                "The same command and server, with inputs of "
                + " and ".join(f"{mr.records:,}" for mr in self.memory)
                + " generated records. Peak RSS from `os.wait4`; RSS also read from "
                "`/proc/PID/status` once a second, shown at each tenth of the run.",
                "",
                *self.memory_table(),
            ]
            pair = self.memory_pair()
            if pair is None or pair[1].records < 1_000_000:
                out += ["", "The 1M-record run was not done (quick mode, or its time limit)."]
        else:
            out.append("Not run.")
        out += ["", "## Rate accuracy", ""]
        if self.rate is not None:
            r = self.rate
            out += [
                f"`dispatcher send --rate {r.requested:g}/s --concurrency {conc}` with "
                f"{r.events:,} events, against a second nginx server block that logs every "
                "request's arrival time (`$msec`, millisecond resolution). Achieved rate = "
                "(requests - 1) / (last arrival - first arrival): the pace from the first to "
                "the last request, leaving out start-up and shut-down. `achieved "
                "(envelopes)` is the same from the client's side: each envelope's "
                "`finished_at - latency_ms` is when its request left. `max in any 1 s`: the "
                "most requests nginx saw in any sliding second.",
                "",
                *self.rate_table(),
            ]
        else:
            out.append("Not run.")
        if self.comparison is not None:
            out += [
                "",
                "## Every run",
                "",
                "| round | contender | events | wall s | events/s | CPU s | peak RSS MiB "
                "| nginx busy | 1-event run s |",
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for i, (rnd, start) in enumerate(
                zip(self.comparison.rounds, self.comparison.startup, strict=True), 1
            ):
                for name, one in rnd.items():
                    mark = f" (failed: {one.problem}; not counted)" if one.problem else ""
                    out.append(
                        f"| {i} | {name}{mark} | {one.events:,} | {one.wall_s:.2f} | "
                        f"{one.rate:,.0f} | {one.cpu_s:.2f} | {one.maxrss_mib:.1f} | "
                        f"{_pct(one.nginx_busy)} | {start[name].wall_s:.2f} |"
                    )
        return "\n".join(out) + "\n"


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop nginx and the children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark dispatcher send against an aiohttp baseline and the official "
        "SDK, on a local nginx; writes BENCHMARKS.md."
    )
    p.add_argument("--quick", action="store_true", help="3 rounds of 10k events, no 1M run")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 3)")
    p.add_argument("--events", type=int, help="events per run (default 20000; quick 10000)")
    p.add_argument(
        "--sdk-events",
        type=int,
        help=f"events per SDK run (default {SDK_EVENTS:,}: the SDK is slow)",
    )
    p.add_argument(
        "--big", type=int, default=1_000_000, help="records of the large memory run (full mode)"
    )
    p.add_argument(
        "--big-timeout",
        type=float,
        default=1200.0,
        help="time limit of the large memory run, seconds (default 1200)",
    )
    p.add_argument("--rate", type=float, default=500.0, help="rate of the accuracy run, per s")
    p.add_argument("--rate-seconds", type=float, default=10.0, help="length of that run")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("compare", "memory", "rate"),
        help="leave a part out (repeatable)",
    )
    p.add_argument("--report", default=str(REPORT), help="where to write the report")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.events = args.events or (10_000 if args.quick else 20_000)
    args.sdk_events = args.sdk_events or min(args.events, SDK_EVENTS)
    if args.rounds < 1 or args.rounds > 50 or args.events < 100 or args.concurrency < 1:
        p.error("--rounds 1..50, --events >= 100 and --concurrency >= 1, please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for module in ("dispatcher", "aiohttp", "cloudflare"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(
                f"bench: {module} is not importable by {sys.executable}: run this with the "
                "project's virtualenv (.venv/bin/python benchmarks/run.py, or make bench)"
            )
    command = "python benchmarks/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    started = time.monotonic()
    ensure_tools()
    report = Report(
        command=command,
        mode="quick" if args.quick else "full",
        machine=machine(),
        load_start=load(),
        concurrency=args.concurrency,
    )
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as t:
        tmp = Path(t)
        nginx = Nginx(tmp)
        try:
            nginx.start()
            nginx.check_answer()
            say("nginx answers POSTs with the success envelope (checked, keep-alive too)")
            ceiling, report.wrk_command = wrk_ceiling(nginx, tmp, args.concurrency)
            report.wrk_rates.append(ceiling)
            say(f"nginx ceiling: {ceiling:,.0f} requests/s ({report.wrk_command})")
            setup = Setup(
                tmp=tmp, nginx=nginx, env=child_env(nginx.port), concurrency=args.concurrency
            )
            if "compare" not in args.skip:
                report.comparison = compare(setup, args.rounds, args.events, args.sdk_events)
            if "memory" not in args.skip:
                sizes = [100_000] if args.quick else [100_000, args.big]
                report.memory = memory_runs(setup, sizes, args.big_timeout)
            if "rate" not in args.skip:
                report.rate = rate_run(setup, args.rate, args.rate_seconds)
            ceiling, _ = wrk_ceiling(nginx, tmp, args.concurrency)
            report.wrk_rates.append(ceiling)
            say(f"nginx ceiling at the end: {ceiling:,.0f} requests/s")
        except KeyboardInterrupt:
            say("interrupted: stopping")
            return 130
        finally:
            nginx.stop()
    report.load_end = load()
    git_end = machine()["git"]
    if git_end != report.machine["git"]:
        report.machine["git"] += f" at the start; {git_end} at the end"
    report.elapsed_s = time.monotonic() - started
    print(report.text_summary(), flush=True)
    Path(args.report).write_text(report.markdown())
    say(f"wrote {args.report} ({report.elapsed_s / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
