"""How well ``--rate auto`` finds a limit: nginx ``limit_req`` without rate headers, and the
emulator with them (``make bench-rate``, about 6 minutes).

Each case is one ``dispatcher send`` process, as a user runs it, with 25 s worth of records
at the limit R (12 s against the emulator) and 64 workers:

- **nginx** ``limit_req rate=R burst=5`` (``nodelay``: the burst passes at once; without it,
  nginx queues the burst and answers it at R), 429 with ``Retry-After: 1``, no rate headers.
  ``auto`` starts from nothing; ``auto, 2nd run`` runs again on the same ``--results``,
  so it starts from the ceiling the first run remembered (``<results>.ceiling.json``).
- **emulator** ``--limit R/1s``: ``Ratelimit`` and ``Ratelimit-Policy`` on every answer;
  the request over the budget starts a lockout of a whole window.

Figures, all as a share of R and from the server's own log: ``goodput`` = 2xx answers per
second from the first request the server saw to its last 2xx (the search and every pause
included; the process's start-up, which a loaded machine makes seconds long, is not);
``first 10 s`` = the same for the first 10 s worth of records (what a run of 10 s at R
would have got: the client cannot know the run is longer); ``after 3 s`` = 2xx per second
from 3 s after the first one to the last; ``429/attempts`` from the server's log.

    python benchmarks/rate_discovery.py [--quick] [--only nginx|emulator] [--write FILE]

``--write`` replaces the section between the rate-discovery markers of that file (or appends
it). nginx is installed with apt-get if missing (root only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import orjson

from dispatcher.emulator import Emulator, EmulatorConfig, Limit

ACCOUNT: Final = "acc"
TOKEN: Final = "tok-bench-rate"
WORKERS: Final = 64
SECONDS_AT_R: Final = 25  # of records at R, against nginx
EMULATOR_SECONDS: Final = 12  # the same against the emulator: headers need no search
FIRST_SECONDS: Final = 10
STEADY_FROM: Final = 3.0
TIMEOUT_S: Final = 90.0  # a case that takes longer is stopped (and its row says so)
START: Final = "<!-- rate-discovery:start -->"
END: Final = "<!-- rate-discovery:end -->"
OK_BODY: Final = '{"success":true,"errors":[],"messages":[],"result":{}}'
LIMITED_BODY: Final = (
    '{"success":false,"errors":[{"code":971,"message":"Please wait and consider throttling '
    'your request speed"}],"messages":[],"result":null}'
)

# limit_req runs in the preaccess phase, after `return` (rewrite phase) would have answered:
# so the success comes from the static handler, whose 405 for a POST is turned into 200.
NGINX_CONF: Final = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format st '$msec $status';
    access_log {tmp}/access.log st;
    client_body_temp_path {tmp}/cb;
    proxy_temp_path {tmp}/px;
    fastcgi_temp_path {tmp}/fc;
    uwsgi_temp_path {tmp}/uw;
    scgi_temp_path {tmp}/sc;
    keepalive_requests 10000000;
    limit_req_zone $binary_remote_addr zone=api:1m rate={rate}r/s;
    limit_req_status 429;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            limit_req zone=api burst={burst}{nodelay};
            root {tmp};
            try_files /ok.json =404;
            error_page 405 =200 @ok;
            error_page 429 @limited;
        }}
        location @ok {{ default_type application/json; return 200 '{ok}'; }}
        location @limited {{
            default_type application/json;
            add_header Retry-After 1 always;
            return 429 '{limited}';
        }}
    }}
}}
"""


def say(text: str) -> None:
    print(f"[rate] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def ensure_nginx() -> str:
    found = find_nginx()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise SystemExit("nginx is missing: run `apt-get install -y nginx` first")
    say("nginx missing: installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=True, env=env)
    found = find_nginx()
    if found is None:
        raise SystemExit("apt-get installed nginx but it cannot be found")
    return found


@contextlib.contextmanager
def nginx(tmp: Path, rate: int, *, nodelay: bool, burst: int = 5) -> Iterator[tuple[int, Path]]:
    """nginx limit_req at ``rate``/s on a free port; yields (port, access log path)."""
    where = tmp / f"nginx-{rate}-{burst}-{'nodelay' if nodelay else 'delay'}"
    where.mkdir()
    (where / "ok.json").write_text("{}")
    # nginx's workers run as nobody when started by root: they must reach the file.
    for path in (tmp, where):
        path.chmod(0o755)
    (where / "ok.json").chmod(0o644)
    port = free_port()
    conf = where / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=where,
            rate=rate,
            burst=burst,
            port=port,
            nodelay=" nodelay" if nodelay else "",
            ok=OK_BODY,
            limited=LIMITED_BODY,
        )
        .replace(" burst=0 nodelay", "")
        .replace(" burst=0", "")  # nginx's default: none
    )
    proc = subprocess.Popen(
        [ensure_nginx(), "-p", str(where), "-c", str(conf), "-e", str(where / "e.log")],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(where / 'e.log').read_text()}")
            time.sleep(0.05)
        yield port, where / "access.log"
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True, slots=True)
class Case:
    server: str  # a row label
    limit: int
    client: str  # a row label
    rate: str  # --rate
    records: int


@dataclass(frozen=True, slots=True)
class Measured:
    case: Case
    wall_s: float
    confirmed: int
    attempts: int
    refused: int
    steady: float | None  # 2xx/s after STEADY_FROM, as a share of the limit
    exit_code: int
    goodput: float | None  # 2xx/s from the first request to the last 2xx, share of the limit
    first: float | None  # the same over the first FIRST_SECONDS worth of records

    @property
    def refused_share(self) -> float:
        return self.refused / max(1, self.attempts)


def write_input(path: Path, n: int) -> None:
    path.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": f"r{k}", "event_type": "e"}) + b"\n" for k in range(n)
        )
    )


async def run_send(base_url: str, inp: Path, out: Path, rate: str, *, fresh: bool) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env |= {
        "CLOUDFLARE_API_TOKEN": TOKEN,
        "CLOUDFLARE_ACCOUNT_ID": ACCOUNT,
        "CLOUDFLARE_BASE_URL": base_url,
    }
    argv = [sys.executable, "-m", "dispatcher", "send", str(inp), "--workflow", "wf"]
    argv += ["--results", str(out), "--rate", rate, "--concurrency", str(WORKERS)]
    argv += ["--quiet", "--progress", "off", "--overwrite"]
    if fresh:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{out}.ceiling.json")
    t0 = time.monotonic()
    quiet = subprocess.DEVNULL
    async with await anyio.open_process(argv, env=env, stdout=quiet, stderr=quiet) as proc:
        with anyio.move_on_after(TIMEOUT_S):
            await proc.wait()
        if proc.returncode is None:
            say(f"stopped at the {TIMEOUT_S:.0f} s time limit")
            proc.kill()
            await proc.wait()
    wall = time.monotonic() - t0
    return wall if proc.returncode == 0 else -wall


def read_results(out: Path) -> tuple[int, int]:
    confirmed = attempts = 0
    for line in out.read_bytes().splitlines():
        try:
            env = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the torn last line of a run stopped at its time limit
        confirmed += env["delivery"] == "confirmed"
        attempts += env["attempts"]
    return confirmed, attempts


def run_shares(
    first_request: float, ok_times: list[float], limit: int
) -> tuple[float | None, float | None]:
    """Goodput over the whole run and over its first FIRST_SECONDS worth of records."""
    ok_times = sorted(ok_times)
    if not ok_times or ok_times[-1] <= first_request:
        return None, None
    whole = len(ok_times) / (ok_times[-1] - first_request) / limit
    n = FIRST_SECONDS * limit
    first = None
    if len(ok_times) >= n and ok_times[n - 1] > first_request:
        first = n / (ok_times[n - 1] - first_request) / limit
    return whole, first


def steady_share(ok_times: list[float], limit: int) -> float | None:
    ok_times.sort()
    if not ok_times:
        return None
    late = [t for t in ok_times if t >= ok_times[0] + STEADY_FROM]
    if len(late) < 2 or late[-1] <= late[0]:
        return None
    return (len(late) - 1) / (late[-1] - late[0]) / limit


async def measure_nginx(
    case: Case, tmp: Path, port: int, log: Path, *, fresh: bool, via: int | None = None
) -> Measured:
    """One run of ``case`` against nginx on ``port`` (sent to ``via``, a relay in front of
    it, when given), read off nginx's access ``log``."""
    inp, out = tmp / f"in-{case.records}.jsonl", tmp / f"out-{port}.jsonl"
    if not inp.exists():
        write_input(inp, case.records)
    log.write_bytes(b"")  # noqa: ASYNC240 (nginx appends: the log starts afresh)
    await anyio.sleep(1.2)  # the limiter's bucket refills between runs
    base = f"http://127.0.0.1:{via or port}/client/v4"
    wall = await run_send(base, inp, out, case.rate, fresh=fresh)
    await anyio.sleep(0.2)
    lines = [line.split() for line in log.read_text().splitlines()]  # noqa: ASYNC240
    # $msec is when the answer was logged; a 429 goes out at once, a 2xx possibly queued.
    first_request = min((float(t) for t, _ in lines), default=0.0)
    ok_times = [float(t) for t, status in lines if status == "200"]
    refused = sum(status == "429" for _, status in lines)
    confirmed, attempts = read_results(out)
    steady = steady_share(ok_times, case.limit)
    whole, first = run_shares(first_request, ok_times, case.limit)
    return Measured(
        case, abs(wall), confirmed, attempts, refused, steady, int(wall < 0), whole, first
    )


async def measure_emulator(case: Case, tmp: Path) -> Measured:
    inp, out = tmp / f"in-{case.records}.jsonl", tmp / f"out-emu-{case.limit}.jsonl"
    if not inp.exists():
        write_input(inp, case.records)
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=Limit(quota=case.limit, window=1.0))
    async with Emulator(cfg) as emu:
        wall = await run_send(emu.base_url, inp, out, case.rate, fresh=True)
        ok_times = [t for times in emu.log.accepted.values() for t in times]
        refused = emu.log.status_counts[429]
    confirmed, attempts = read_results(out)
    # The emulator logs the 2xx it admitted; the first of them is the run's first request.
    whole, first = run_shares(min(ok_times, default=0.0), ok_times, case.limit)
    return Measured(
        case,
        abs(wall),
        confirmed,
        attempts,
        refused,
        steady_share(ok_times, case.limit),
        0 if wall > 0 else 1,
        whole,
        first,
    )


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table(rows: list[Measured]) -> str:
    lines = [
        "| server | R /s | client | records | process wall s | goodput (whole run) "
        f"| first {FIRST_SECONDS} s | after 3 s | 429s | 429/attempts |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in rows:
        c = m.case
        flag = " (stopped)" if m.exit_code else ""
        lines.append(
            f"| {c.server} | {c.limit} | {c.client} | {c.records:,} | {m.wall_s:.1f}{flag} "
            f"| **{pct(m.goodput)}** | {pct(m.first)} | {pct(m.steady)} | {m.refused} "
            f"| {pct(m.refused_share)} |"
        )
    return "\n".join(lines)


def section(rows: list[Measured], took: float, quick: bool, load: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mode = ", --quick" if quick else ""
    head = (
        "## `--rate auto` against a limit nobody announced\n\n"
        f"Written by `benchmarks/rate_discovery.py` (`make bench-rate`{mode}; "
        f"{took / 60:.1f} min, {when}; load average {load}). "
        f"One `dispatcher send --concurrency {WORKERS}` process per row, "
        f"{SECONDS_AT_R} s of records at R against nginx, {EMULATOR_SECONDS} s against the "
        "emulator. nginx `limit_req rate=R burst=5` answers 429 with "
        "`Retry-After: 1` and no rate headers (`nodelay`: the burst passes at once; `queue`: "
        "nginx holds the burst and answers it at R); the emulator sends `Ratelimit` and "
        "`Ratelimit-Policy`. All shares are of R and from the server's log: `goodput` = 2xx "
        "per second from the first request the server saw to its last 2xx, the search and "
        "every pause included (the process's start-up is not: `process wall s` shows it); "
        f"`first {FIRST_SECONDS} s` = the same over the first {FIRST_SECONDS} s worth of "
        f"records, what a {FIRST_SECONDS} s run would have got; `after 3 s` = 2xx per second "
        "from 3 s after the first one; `auto, 2nd run` starts from the ceiling the first run "
        "remembered; `(known)` is the limit given in advance, just under it.\n"
    )
    return f"{START}\n{head}\n{table(rows)}\n{END}\n"


def write_section(path: Path, text: str, start: str = START, end: str = END) -> None:
    """Put ``text`` (which begins with ``start`` and ends with ``end``) where the section
    between those markers is in ``path``, or at its end when there is none."""
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        before, rest = old.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        new = before + text + ("\n" + after if after else "")
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text
    path.write_text(new)


async def main_async(quick: bool, only: str | None, limits: list[int] | None) -> list[Measured]:
    limits = limits or ([20, 200] if quick else [5, 10, 20, 50, 200, 500])
    rows: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as d:
        tmp = Path(d)
        for limit in limits if only in (None, "nginx") else []:
            n = limit * SECONDS_AT_R
            for nodelay in (True, False) if limit == 200 else (True,):
                kind = "nodelay" if nodelay else "queue"
                with nginx(tmp, limit, nodelay=nodelay) as (port, log):
                    case = Case(f"nginx ({kind})", limit, "`--rate auto`", "auto", n)
                    say(f"{case.server} R={limit}: auto")
                    rows.append(await measure_nginx(case, tmp, port, log, fresh=True))
                    if nodelay:
                        again = Case(case.server, limit, "`--rate auto`, 2nd run", "auto", n)
                        say(f"{case.server} R={limit}: auto, second run")
                        rows.append(await measure_nginx(again, tmp, port, log, fresh=False))
                        # The limit known in advance: what a fixed rate just under it gets.
                        known = f"{0.98 * limit:g}/s"
                        base = Case(case.server, limit, f"`--rate {known}` (known)", known, n)
                        say(f"{case.server} R={limit}: {known}")
                        rows.append(await measure_nginx(base, tmp, port, log, fresh=True))
        emulated = ((20, "auto"), (20, "19/s"), (200, "auto"), (200, "196/s"))
        for limit, rate in emulated if only in (None, "emulator") else ():
            if quick and limit == 200:
                continue
            n = limit * EMULATOR_SECONDS
            case = Case("emulator (headers)", limit, f"`--rate {rate}`", rate, n)
            say(f"{case.server} R={limit}: {rate}")
            rows.append(await measure_emulator(case, tmp))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="R = 20 and 200 only")
    parser.add_argument("--write", metavar="FILE", help="put the table into FILE's section")
    parser.add_argument("--limits", help="comma-separated R for nginx (default 5,10,20,50,200,500)")
    parser.add_argument("--only", choices=("nginx", "emulator"), help="one server only")
    args = parser.parse_args()
    if args.only != "emulator":
        ensure_nginx()
    t0 = time.monotonic()
    limits = [int(x) for x in args.limits.split(",")] if args.limits else None
    load = "{:.1f} / {:.1f} / {:.1f} (1/5/15 min) at the start".format(*os.getloadavg())
    rows = anyio.run(main_async, args.quick, args.only, limits)
    load += f", {os.getloadavg()[0]:.1f} at the end"
    text = section(rows, time.monotonic() - t0, args.quick, load)
    print(text)
    if args.write:
        write_section(Path(args.write), text)
        say(f"wrote the section in {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
