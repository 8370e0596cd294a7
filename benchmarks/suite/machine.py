"""The machine and the tools: nginx and wrk (installed if missing), versions, load."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from suite.config import REPO, say


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
        "httptools": package_version("httptools"),
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
    """The two event loops every contender runs on."""
    return (
        f"asyncio's default loop (CPython {platform.python_version()}, epoll selector) and "
        f"uvloop {package_version('uvloop')}, each for every tool"
    )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"
