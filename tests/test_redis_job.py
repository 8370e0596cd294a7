"""One job shared by several processes through a real redis-server (``--job``)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import orjson
import pytest
from redis_server import RedisServer, needs_redis

from dispatcher.emulator import Emulator, EmulatorConfig

pytestmark = needs_redis

TOKEN = "redis-job-token"


def write_input(path: Path, count: int) -> Path:
    lines = (
        orjson.dumps({"workflow": "wf", "instance_id": f"j{i}", "event_type": "go"})
        for i in range(count)
    )
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def job_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CLOUDFLARE_API_TOKEN": TOKEN,
        "DISPATCHER_JOB_SHARD_LINES": "50",
        **extra,
    }


def job_command(source: Path, results: Path, base_url: str, redis_url: str, rate: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "dispatcher", "send", str(source)),
        *("--account-id", "acct1", "--base-url", base_url),
        *("--redis", redis_url, "--job", "nightly", "--results", str(results)),
        *("--rate", rate, "--concurrency", "4", "--progress", "lines"),
    ]


def envelopes(paths: list[Path]) -> list[dict[str, object]]:
    return [
        orjson.loads(line)
        for path in paths
        if path.exists()
        for line in path.read_bytes().splitlines()
    ]


async def test_a_killed_worker_s_shards_are_finished_by_the_others(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    total = 600
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(4)]
    env = job_env(DISPATCHER_JOB_TIMEOUT="3")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        procs = [
            await anyio.open_process(
                job_command(source, outs[i], emu.base_url, redis_server.url, "120/s"), env=env
            )
            for i in range(4)
        ]
        try:
            # Mid-shard: wait until the victim has written some envelopes.
            deadline = time.monotonic() + 20
            # (polls: the file is written by another process, there is no event to wait on)
            while time.monotonic() < deadline and (  # noqa: ASYNC110
                not outs[0].exists() or outs[0].stat().st_size < 2000
            ):
                await anyio.sleep(0.05)
            procs[0].send_signal(signal.SIGKILL)
            with anyio.move_on_after(60):
                codes = [await p.wait() for p in procs]
            if any(p.returncode is None for p in procs):
                status = await anyio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "dispatcher",
                        "status",
                        "--redis",
                        redis_server.url,
                        "--job",
                        "nightly",
                        "--sample",
                        "0.1",
                    ],
                    check=False,
                )
                pytest.fail("the job did not finish:\n" + status.stdout.decode())
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert codes[0] == -signal.SIGKILL
    assert codes[1:] == [0, 0, 0]
    envs = envelopes(outs)
    per_key = Counter(e["key"] for e in envs)
    assert len(per_key) == total
    assert set(per_key.values()) == {1}, "a record got two final envelopes"
    assert {e["delivery"] for e in envs} == {"confirmed"}
    assert set(accepted) == {f"j{i}" for i in range(total)}
    twice = [k for k, n in accepted.items() if n > 1]
    # At most what the victim had in flight was delivered again: a record is in flight
    # from its first request until its envelope is claimed, so that is its 4 requests
    # (--concurrency 4) plus the answers waiting in its engine's output buffer (4 per
    # worker) for their claim's round trip.
    assert len(twice) <= 4 + 16, twice
    fields = redis_server.command("hgetall", "dispatcher:{job:nightly}:meta").split()
    meta = dict(zip(fields[::2], fields[1::2], strict=True))
    assert meta[b"acked"] == meta[b"shards"] == b"12"
    shown = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "dispatcher",
            "status",
            "--redis",
            redis_server.url,
            "--job",
            "nightly",
            "--sample",
            "0.1",
        ],
        check=False,
    )
    text = shown.stdout.decode()
    assert shown.returncode == 0, shown.stderr
    assert "state     done" in text
    assert "12 of 12 done" in text
    assert f"{total} of {total} final" in text
    assert "account acct1" in text


async def test_nothing_is_sent_while_redis_is_down_then_the_job_completes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    total = 300
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(2)]
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        procs = [
            await anyio.open_process(
                job_command(source, outs[i], emu.base_url, redis_server.url, "40/s"),
                env=job_env(),
            )
            for i in range(2)
        ]
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(emu.log.requests) < 60:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            redis_server.stop()
            stopped = time.monotonic()
            await anyio.sleep(10)
            restarted = time.monotonic()
            redis_server.start()
            with anyio.fail_after(60):
                codes = [await p.wait() for p in procs]
            stderr = b"".join([await p.stderr.receive() for p in procs if p.stderr])
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
        arrivals = [r.t for r in emu.log.requests]
    assert codes == [0, 0]
    # What was in flight when Redis stopped may still arrive (requests take ~ms here).
    during = [t - stopped for t in arrivals if stopped + 0.2 < t < restarted]
    assert during == []
    assert any(t > restarted for t in arrivals)
    per_key = Counter(e["key"] for e in envelopes(outs))
    assert len(per_key) == total
    assert set(per_key.values()) == {1}
    assert b"redis unreachable" in stderr


async def test_status_of_an_unknown_job_is_one_line_and_exit_2(redis_server: RedisServer) -> None:
    shown = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "dispatcher",
            "status",
            "--redis",
            redis_server.url,
            "--job",
            "never-started",
            "--sample",
            "0",
        ],
        check=False,
    )
    assert shown.returncode == 2
    assert shown.stderr.decode().strip().count("\n") == 0
    assert "never-started" in shown.stderr.decode()


async def test_a_job_without_redis_is_refused_before_sending(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", 3)
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "dispatcher",
            "send",
            str(source),
            "--account-id",
            "a",
            "--job",
            "nightly",
            "--results",
            str(tmp_path / "out.jsonl"),
        ],
        env={**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN, "DISPATCHER_REDIS_URL": ""},
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert err.count("\n") == 1
    assert "--job" in err
    assert "--redis" in err
