"""The server every contender sends to: nginx answering the success envelope, and wrk."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

from suite.config import (
    ACCOUNT,
    EVENT_BODY,
    NGINX_START_TIMEOUT,
    NGINX_STOP_TIMEOUT,
    SUCCESS_BODY,
    TOKEN,
    WORKFLOW,
    WRK_SECONDS,
    say,
)
from suite.machine import find_tool

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
