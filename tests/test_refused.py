"""A target where nothing listens: the run stops at once, and says so in one line.

Issue 22: `dispatcher send ids.txt --base-url http://127.0.0.1:8787` with no wrangler dev
running made ~150 attempts in ~10 s. Refusals before any connection was accepted stop the
run (exit 3); a refusal after the target had answered (a restart) is still retried.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import anyio
import orjson
import pytest

from dispatcher.clients.aiohttp_client import HttpTransport
from dispatcher.clients.base import Transport, TransportConfig, is_refused, nothing_listens
from dispatcher.clients.fast import FastTransport
from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.model import ErrorKind, Event

TOKEN = "tok-refused-SECRET-77aa"
CLIENTS = ["fast", "aiohttp"]


def free_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def transport(kind: str, base_url: str) -> Transport:
    config = TransportConfig(
        base_url=base_url,
        account_id="acc",
        auth_headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=2.0,
        connect_timeout=1.0,
    )
    return FastTransport(config) if kind == "fast" else HttpTransport(config)


def event(k: int = 0) -> Event:
    return Event(
        key=f"k{k}",
        source="t",
        line=k + 1,
        workflow="wf",
        instance_id=f"i{k}",
        event_type="evt",
        body=b"{}",
    )


def test_the_message_names_the_address_and_wrangler_dev_only_on_this_machine() -> None:
    assert nothing_listens("127.0.0.1", 8787) == (
        "nothing listens on 127.0.0.1:8787; is wrangler dev running?"
    )
    assert "wrangler dev" in nothing_listens("localhost", 8787)
    assert "[::1]:8787" in nothing_listens("::1", 8787)
    remote = nothing_listens("api.example.com", 443)
    assert remote.startswith("nothing listens on api.example.com:443")
    assert "wrangler" not in remote


def test_refusal_is_told_apart_from_other_connect_failures() -> None:
    assert is_refused(ConnectionRefusedError(111, "Connect call failed"))
    both = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 1, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 1)"
    )
    assert is_refused(both)
    mixed = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 1, 0, 0), "
        "[Errno 101] Network is unreachable"
    )
    assert not is_refused(mixed)
    assert not is_refused(TimeoutError())
    assert not is_refused(OSError(-2, "Name or service not known"))


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_target_that_never_accepted_a_connection_stops_the_run(kind: str) -> None:
    port = free_port()
    tx = transport(kind, f"http://127.0.0.1:{port}/client/v4")
    try:
        outcome = await tx.send(event())
    finally:
        await tx.aclose()
    assert outcome.error_kind is ErrorKind.CONNECT
    assert outcome.sent is False
    assert outcome.stop_run == f"nothing listens on 127.0.0.1:{port}; is wrangler dev running?"
    assert TOKEN not in str(outcome.message)


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_refusal_after_the_target_answered_is_a_restart_and_retried(kind: str) -> None:
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        tx = transport(kind, emu.base_url)
        assert (await tx.send(event(0))).ok
    # The server is gone; the transport had connected before: no stop, a plain failure.
    try:
        outcomes = [await tx.send(event(k)) for k in range(1, 4)]
    finally:
        await tx.aclose()
    assert all(not o.ok and o.stop_run is None for o in outcomes)
    assert ErrorKind.CONNECT in {o.error_kind for o in outcomes}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc")
    return env


@pytest.mark.parametrize("kind", CLIENTS)
async def test_send_to_a_port_nothing_listens_on_stops_in_one_line(
    kind: str, tmp_path: Path
) -> None:
    port = free_port()
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"i{k}\n" for k in range(200)))
    out = tmp_path / "r.jsonl"
    args = [sys.executable, "-m", "dispatcher", "send", str(ids), "--workflow", "wf"]
    args += ["--event-type", "evt", "--base-url", f"http://127.0.0.1:{port}"]
    args += ["--results", str(out), "--rate", "unlimited", "--concurrency", "8"]
    args += ["--http-client", kind]
    t0 = time.monotonic()
    done = await anyio.run_process(args, env=_env(), check=False)
    took = time.monotonic() - t0
    err = done.stderr.decode()
    assert done.returncode == 3, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"dispatcher send: stopped: nothing listens on 127.0.0.1:{port}; is wrangler dev running?"
    )
    assert "--resume" in lines[0]
    assert "Traceback" not in err
    envs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    # At most one attempt per worker, not retries for seconds; every one of them not_sent.
    assert 1 <= len(envs) <= 8
    assert {e["delivery"] for e in envs} == {"not_sent"}
    assert {e["attempts"] for e in envs} == {1}
    assert took < 8  # the old behaviour spent ~10 s in retries before its first line


@pytest.mark.parametrize("kind", CLIENTS)
async def test_load_against_a_port_nothing_listens_on_stops_early(
    kind: str, tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "r.jsonl"
    args = [sys.executable, "-m", "dispatcher", "load", "--workflow", "wf"]
    args += ["--event-type", "evt", "--instance-prefix", "i", "--instance-count", "5"]
    args += ["--base-url", f"http://127.0.0.1:{port}", "--rate", "50/s", "--duration", "5s"]
    args += ["--results", str(out), "--http-client", kind, "--quiet"]
    t0 = time.monotonic()
    done = await anyio.run_process(args, env=_env(), check=False)
    took = time.monotonic() - t0
    err = done.stderr.decode()
    assert done.returncode == 3, err
    assert f"stopped: nothing listens on 127.0.0.1:{port}; is wrangler dev running?" in err
    envs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert envs
    assert len(envs) < 50  # 250 arrivals were planned over 5 s
    assert {e["delivery"] for e in envs} == {"not_sent"}
    assert took < 5
