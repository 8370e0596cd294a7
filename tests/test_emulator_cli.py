"""`dispatcher emulate` as a user runs it: a real subprocess, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from dispatcher.commands.cli import main

SECRET = "cli-secret-token-987"
URL_LINE = re.compile(r"base URL:\s+(http://127\.0\.0\.1:(\d+)/client/v4)")
START_TIMEOUT = 15.0


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, base_url: str, banner: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.banner = banner

    async def stop(self, signum: signal.Signals = signal.SIGINT) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        stdout, stderr = await asyncio.wait_for(self.proc.communicate(), START_TIMEOUT)
        assert self.proc.returncode is not None
        return self.proc.returncode, self.banner + stdout.decode(), stderr.decode()


async def start(*flags: str) -> Served:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "emulate",
        "--port",
        "0",
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    banner = ""
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode()
            if not line:
                _, err = await proc.communicate()
                raise AssertionError(f"emulator exited early: {banner}{err.decode()}")
            banner += line
            if line.startswith("Ctrl-C"):
                break
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    match = URL_LINE.search(banner)
    assert match is not None, banner
    assert int(match[2]) > 0  # port 0 prints the port actually bound
    return Served(proc, match[1], banner)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    session: aiohttp.ClientSession, url: str, token: str = SECRET
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url, headers={"Authorization": f"Bearer {token}"}, data=b"{}") as r:
        return r.status, dict(r.headers), await r.read()


async def test_serves_until_ctrl_c(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    known = tmp_path / "known.txt"
    known.write_text("# ids the emulator knows\ni-1\n\ni-2\n")
    served = await start(
        "--token", SECRET, "--limit", "3/1s", "--known-instances", str(known),
        "--fault", "500=5%", "--latency", "0..1ms", "--seed", "4",
    )  # fmt: skip
    try:
        url = served.base_url + "/accounts/acc/workflows/wf/instances/{}/events/ev"
        status, headers, _ = await post(session, url.format("i-1"))
        assert status == 200
        assert headers["Ratelimit-Policy"] == '"burst";q=3;w=1'
        assert (await post(session, url.format("i-3")))[0] == 404
        assert (await post(session, url.format("i-2"), token="wrong-token-xyz"))[0] == 401
        stats_url = served.base_url.removesuffix("/client/v4") + "/__emulator/stats"
        async with session.get(stats_url) as resp:
            stats = orjson.loads(await resp.read())
        assert stats["status_counts"] == {"200": 1, "401": 1, "404": 1}
    finally:
        code, out, err = await served.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert "limit:     3 requests per 1 s per credential (fixed window)" in out
    assert "faults:    500=5%, latency 0ms..1ms (seed 4)" in out
    assert "auth:      1 token(s)" in out
    assert "instances: 2 known" in out
    assert "stopped after 3 request(s)" in out
    assert SECRET not in out + err
    assert "wrong-token-xyz" not in out + err


async def test_sigterm_stops_cleanly_too() -> None:
    served = await start("--limit", "off")
    assert "limit:     off" in served.banner
    assert "faults:    none" in served.banner
    code, _, err = await served.stop(signal.SIGTERM)
    assert code == 0
    assert err == ""


async def test_bad_flag_in_a_real_process_exits_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "emulate", "--limit", "lots",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    assert proc.returncode == 2
    assert "--limit" in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--limit", "1200"], "--limit"),
        (["--limit", "0/5m"], "--limit"),
        (["--lockout", "soon"], "--lockout"),
        (["--port", "99999"], "--port"),
        (["--fault", "418=5%"], "--fault"),
        (["--fault", "500=5"], "--fault"),
        (["--fault", "500=60%", "--fault", "drop=50%"], "--fault"),
        (["--latency", "fast"], "--latency"),
        (["--faults-first", "0"], "--faults-first"),
        (["--seed", "x"], "--seed"),
        (["--known-instances", "/no/such/file"], "--known-instances"),
        (["--legacy-key", "no-colon"], "--legacy-key"),
        # the instance model's reaction flags (docs/load.md, --observe)
        (
            ["--instances", "e", "--reaction", "fast"],
            "argument --reaction: 'fast': 'fast' is not a duration",
        ),
        (["--instances", "e", "--never-consume", "2"], "argument --never-consume"),
        (["--instances", "e", "--step-jitter", "x"], "argument --step-jitter"),
        (["--reaction", "200ms"], "--reaction models instances: give --instances"),
        (["--instances", "e", "--reaction-capacity", "0/s"], "argument --reaction-capacity"),
        (["--reaction-capacity", "5/s"], "--reaction-capacity models instances"),
    ],
)
def test_bad_flag_values_name_the_flag_and_exit_2(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["emulate", *flags])
    except SystemExit as exit_:
        code = exit_.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert named in err
    assert "error" in err


def test_port_already_in_use_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["emulate", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
