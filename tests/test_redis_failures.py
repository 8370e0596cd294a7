"""``--redis`` when Redis is wrong or goes away, on real redis-servers of 127.0.0.1.

A bad URL, a wrong password, a missing database or an unreachable host is one line on
stderr naming ``--redis`` and the URL without its password, exit 2, within seconds; an
outage mid-run ends the run after ``--redis-outage-timeout`` with a summary that agrees
with the envelopes written and a command that finishes the job; the password shows
nowhere.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import pytest
from redis_server import RedisServer, free_port, needs_redis
from test_redis_job import envelopes, write_input

from dispatcher.commands.send import finish_command
from dispatcher.coordination.urls import check_redis_url, redact
from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.run.config import add_send_arguments, load_send_settings
from dispatcher.run.settings import ConfigError, Credentials, SendSettings

pytestmark = needs_redis

TOKEN = "redis-failure-token"
PASSWORD = "Sw0rdfish-s3cret"


def run_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    return {**base, "CLOUDFLARE_API_TOKEN": TOKEN, **extra}


def send_command(
    source: Path, results: Path, base_url: str, redis_url: str, *extra: str
) -> list[str]:
    return [
        sys.executable,
        *("-m", "dispatcher", "send", str(source)),
        *("--account-id", "acct1", "--base-url", base_url),
        *("--redis", redis_url, "--results", str(results), "--progress", "lines"),
        *extra,
    ]


def summary_counts(stderr: str) -> dict[str, int]:
    """``records N (C confirmed, F failed, U unknown)`` of the closing summary."""
    match = re.search(
        r"records\s+([\d,]+) \(([\d,]+) confirmed, ([\d,]+) failed, ([\d,]+) unknown\)", stderr
    )
    assert match is not None, stderr[-3000:]
    values = [int(g.replace(",", "")) for g in match.groups()]
    return dict(zip(("records", "confirmed", "failed", "unknown"), values, strict=True))


@pytest.fixture
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server that wants PASSWORD."""
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"))
    server.start()
    server.command("config", "set", "requirepass", PASSWORD)
    try:
        yield server
    finally:
        server.stop()


# --- the URL, checked before anything connects -----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PASSWORD}@h:6379/0",
        f"rediss://user:{PASSWORD}@h:6380/1",
        f"redis://h:6379/0?password={PASSWORD}",
        f"redis://h:6379/0?db=1&password={PASSWORD}&ssl_cert_reqs=none",
        f"redis://{PASSWORD}@h/0",
        f"unix://:{PASSWORD}@/run/redis.sock?db=2",
        f"redis://:{PASSWORD}@h:99999/0",
        f"redis://:{PASSWORD}@[::1",
    ],
)
def test_redact_covers_every_place_a_password_goes(url: str) -> None:
    shown = redact(url)
    assert PASSWORD not in shown
    assert "***" in shown
    assert shown.split("://")[0] == url.split("://")[0]


def test_redact_keeps_what_is_not_secret() -> None:
    assert redact("redis://10.0.0.5:6379/3") == "redis://10.0.0.5:6379/3"
    assert redact("rediss://app:pw@cache:6380/1") == "rediss://app:***@cache:6380/1"
    assert redact("redis://h/0?db=1&password=pw") == "redis://h/0?db=1&password=***"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:99999/0", "port"),
        ("redis://127.0.0.1:0/0", "port"),
        ("redis://127.0.0.1:port/0", "port"),
        ("redis://127.0.0.1:6379/x", "database"),
        ("redis://127.0.0.1:6379/0?db=one", "db"),
        ("redis:///0", "host"),
        ("http://127.0.0.1:6379/0", "redis://"),
        ("unix://", "path"),
    ],
)
def test_a_malformed_url_is_a_config_error_naming_the_problem(url: str, says: str) -> None:
    problem = check_redis_url(url)
    assert problem is not None
    assert says in problem
    with pytest.raises(ConfigError) as caught:
        SendSettings(inputs=("a.jsonl",), target="wrangler-dev", redis_url=url)
    assert caught.value.where == "redis_url"


def test_settings_repr_shows_the_url_without_its_password() -> None:
    settings = SendSettings(
        inputs=("a.jsonl",),
        account_id="acct1",
        credentials=Credentials(token=TOKEN),
        redis_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    )
    for text in (repr(settings), str(settings)):
        assert PASSWORD not in text
        assert "redis_url='redis://:***@127.0.0.1:6379/0'" in text


def _settings_from(argv: list[str]) -> SendSettings:
    parser = argparse.ArgumentParser()
    add_send_arguments(parser)
    args = parser.parse_args(argv)
    return load_send_settings(args, {"CLOUDFLARE_API_TOKEN": TOKEN})


@pytest.mark.parametrize("form", ["two", "equals"])
def test_the_finish_command_never_prints_the_password(form: str) -> None:
    url = f"rediss://app:{PASSWORD}@cache:6380/0"
    flag = ["--redis", url] if form == "two" else [f"--redis={url}"]
    argv = ["send", "in.jsonl", "--account-id", "acct1", *flag]
    settings = _settings_from(argv[1:])
    for job in (None, "nightly"):
        if job is not None:
            argv = [*argv, "--job", job]
            settings = _settings_from(argv[1:])
        command = finish_command(argv, settings)
        assert command is not None
        assert PASSWORD not in command
        assert "rediss://app:***@cache:6380/0" in command
        assert "password back" in command


# --- a URL that cannot be used, at start ---------------------------------------------


async def _send_once(url: str, tmp_path: Path) -> tuple[int, str, float]:
    source = write_input(tmp_path / "in.jsonl", 3)
    results = tmp_path / "out.jsonl"
    # Nothing listens on the base URL: a run that got past the check would say so.
    command = send_command(source, results, f"http://127.0.0.1:{free_port()}", url)
    t0 = time.monotonic()
    done = await anyio.run_process(command, env=run_env(), check=False)
    took = time.monotonic() - t0
    shown = done.stdout.decode() + done.stderr.decode()
    assert not results.exists() or results.stat().st_size == 0
    return done.returncode, shown, took


def _one_line_naming_redis(code: int, shown: str, url: str) -> str:
    assert code == 2, shown
    assert "Traceback" not in shown
    lines = shown.strip().splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("dispatcher send: error: --redis: "), line
    assert redact(url) in line
    assert PASSWORD not in shown
    return line


@pytest.mark.parametrize(
    ("make_url", "says"),
    [
        (lambda port: "redis://127.0.0.1:99999/0", "port"),
        (lambda port: "redis://127.0.0.1:65536/0", "port"),
        (lambda port: f"redis://:{PASSWORD}@127.0.0.1:{port}/99", "no such database"),
        (lambda port: f"redis://:{PASSWORD}@127.0.0.1:{port}/16", "no such database"),
        (lambda port: f"redis://:wrong-{PASSWORD}@127.0.0.1:{port}/0", "authentication"),
        (lambda port: f"redis://someone:{PASSWORD}@127.0.0.1:{port}/0", "authentication"),
        (lambda port: f"redis://127.0.0.1:{port}/0", "authentication"),
        (lambda port: f"redis://127.0.0.1:{port}/0?password=no-{PASSWORD}", "authentication"),
        (lambda port: f"redis://:{PASSWORD}@127.0.0.1:{port}/0?bogus_option=1", "invalid URL"),
        (lambda port: f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0", "refused"),
        (lambda port: f"redis://:{PASSWORD}@nohost.invalid:6379/0", "cannot connect"),
    ],
)
async def test_a_redis_url_that_cannot_be_used_is_one_line_and_exit_2(
    tmp_path: Path, locked_redis: RedisServer, make_url: object, says: str
) -> None:
    assert callable(make_url)
    url = make_url(locked_redis.port)
    code, shown, took = await _send_once(url, tmp_path)
    line = _one_line_naming_redis(code, shown, url)
    assert says in line
    # Start-up plus at most the 3 s check (generous for a loaded machine; before, it
    # waited forever or ended in a traceback).
    assert took < 20.0


async def test_a_host_that_never_answers_is_one_line_within_the_connect_timeout(
    tmp_path: Path,
) -> None:
    """A listener that accepts and then says nothing (a firewall's black hole, a TLS
    port spoken to in plain text): the check gives up after its 3 s."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        held: list[anyio.abc.SocketStream] = []

        async def hold(stream: anyio.abc.SocketStream) -> None:
            held.append(stream)
            await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hold)
            url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
            code, shown, took = await _send_once(url, tmp_path)
            tg.cancel_scope.cancel()
    line = _one_line_naming_redis(code, shown, url)
    assert "no answer within 3 s" in line  # the probe's own timeout ended it
    assert took < 60, "it waited for the silent host"  # a hang guard, not a timing


async def test_status_with_a_bad_url_is_one_line(tmp_path: Path) -> None:
    for url in ("redis://127.0.0.1:99999/0", f"redis://:{PASSWORD}@127.0.0.1:1/0?bogus=1"):
        done = await anyio.run_process(
            [sys.executable, "-m", "dispatcher", "status", "--redis", url, "--job", "j"],
            env=run_env(),
            check=False,
        )
        shown = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 2, shown
        assert "Traceback" not in shown
        assert len(shown.strip().splitlines()) == 1
        assert PASSWORD not in shown


# --- an outage mid-run -----------------------------------------------------------------


async def _wait_for(predicate: object, seconds: float = 20) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():  # noqa: ASYNC110
        await anyio.sleep(0.02)


async def test_an_outage_longer_than_the_timeout_ends_the_run_resumably(
    tmp_path: Path, locked_redis: RedisServer
) -> None:
    total = 300
    source = write_input(tmp_path / "in.jsonl", total)
    results = tmp_path / "out.jsonl"
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        command = send_command(
            source, results, emu.base_url, url, "--rate", "40/s", "--concurrency", "4"
        )
        env = run_env(DISPATCHER_REDIS_OUTAGE_TIMEOUT="2s")
        code, took, stdout, stderr = await _stop_redis_under(command, env, emu, locked_redis)
        sent_before = len(emu.log.requests)
        assert code == 3, stderr[-3000:]
        assert 2.0 <= took < 15.0, took  # the 2 s timeout, not forever (as before)
        assert "Traceback" not in stderr
        assert "--redis-outage-timeout 2s" in stderr
        written = envelopes([results])
        counts = summary_counts(stderr)
        assert counts["records"] == len(written)
        assert counts["confirmed"] == sum(e["delivery"] == "confirmed" for e in written)
        assert 0 < len(written) < total
        finish = re.search(r"to finish  (.*)", stderr)
        assert finish is not None, stderr[-3000:]
        assert "--resume" in finish.group(1)
        assert PASSWORD not in stderr + stdout + results.read_text()

        # Redis back: the printed command (password put back) finishes the job.
        locked_redis.start()
        locked_redis.command("config", "set", "requirepass", PASSWORD)
        again = await anyio.run_process([*command, "--resume"], env=run_env(), check=False)
        assert again.returncode == 0, again.stderr.decode()[-3000:]
        assert len(emu.log.requests) > sent_before
    per_key = Counter(e["key"] for e in envelopes([results]) if e["delivery"] == "confirmed")
    assert len(per_key) == total
    assert set(per_key.values()) == {1}


async def _read_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    chunks = []
    try:
        while True:
            chunks.append(await stream.receive())
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        pass
    return b"".join(chunks)


def job_command(
    source: Path, results: Path, base_url: str, redis_url: str, job: str = "nightly"
) -> list[str]:
    return [
        *send_command(source, results, base_url, redis_url),
        *("--job", job, "--rate", "40/s", "--concurrency", "4"),
    ]


async def _stop_redis_under(
    command: list[str],
    env: dict[str, str],
    emu: Emulator,
    redis: RedisServer,
    *,
    interrupt: bool = False,
    after: int = 60,
    do: Callable[[], object] | None = None,
) -> tuple[int, float, str, str]:
    """Run ``command``; once ``after`` requests arrived, stop Redis (or ``do`` something
    else to it; and after 0.5 s send SIGINT if ``interrupt``). Exit code, seconds from
    then to the exit, stdout, stderr."""
    proc = await anyio.open_process(command, env=env)
    try:
        await _wait_for(lambda: len(emu.log.requests) >= after)
        (do or redis.stop)()
        if interrupt:
            await anyio.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        with anyio.fail_after(20):
            code = await proc.wait()
        took = time.monotonic() - stopped
        assert proc.stderr is not None
        assert proc.stdout is not None
        stderr = (await _read_all(proc.stderr)).decode()
        stdout = (await _read_all(proc.stdout)).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
    return code, took, stdout, stderr


@pytest.mark.parametrize("how", ["timeout", "ctrl-c"])
async def test_a_job_that_loses_redis_ends_soon_and_its_summary_matches_its_envelopes(
    tmp_path: Path, locked_redis: RedisServer, how: str
) -> None:
    total = 300
    source = write_input(tmp_path / "ids.jsonl", total)
    results = tmp_path / "out.jsonl"
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    env = run_env(DISPATCHER_JOB_SHARD_LINES="50", DISPATCHER_REDIS_OUTAGE_TIMEOUT="2")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        command = job_command(source, results, emu.base_url, url)
        code, took, stdout, stderr = await _stop_redis_under(
            command, env, emu, locked_redis, interrupt=how == "ctrl-c"
        )
        assert "Traceback" not in stderr
        assert "no records in" not in stderr
        if how == "ctrl-c":
            assert code == 130, stderr[-3000:]
            assert took < 10.0, took  # not the 30 s grace plus 3 s it took before
        else:
            assert code == 3, stderr[-3000:]
            assert took < 15.0, took  # the 2 s timeout, not forever (as before)
        written = envelopes([results])
        counts = summary_counts(stderr)
        assert counts["records"] == len(written), stderr[-3000:]
        assert counts["confirmed"] == sum(e["delivery"] == "confirmed" for e in written)
        assert counts["unknown"] == sum(e["delivery"] == "unknown" for e in written)
        # Nothing left over is written as if it were final.
        assert all(e["delivery"] in ("confirmed", "unknown") for e in written)
        assert PASSWORD not in stderr + stdout + results.read_text()

        # Redis back: the same command finishes the job.
        locked_redis.start()
        locked_redis.command("config", "set", "requirepass", PASSWORD)
        # What was written unclaimed is listed beside the results, and claimed first.
        unclaimed = Path(f"{results}.unclaimed.jsonl")
        listed = len(envelopes([unclaimed]))
        assert ("without their claim" in stderr) == (listed > 0)
        again = await anyio.run_process(command, env=env, check=False)
        assert again.returncode == 0, again.stderr.decode()[-3000:]
        assert not await anyio.Path(unclaimed).exists()
        twice = [key for key, times in emu.log.accepted.items() if len(times) > 1]
    assert twice == []
    # Every record confirmed once, but for what the first run itself held in doubt (a
    # request it cut as it stopped): `unknown` stays, and the rerun sends it no more.
    doubted = {e["key"] for e in written if e["delivery"] == "unknown"}
    final = envelopes([results])
    assert len({e["key"] for e in final}) == total
    per_key = Counter(e["key"] for e in final if e["delivery"] == "confirmed")
    assert set(per_key.values()) == {1}
    not_confirmed = [e for e in final if e["key"] not in per_key]
    assert {e["key"] for e in not_confirmed} <= doubted, not_confirmed


async def test_a_password_changed_mid_job_ends_the_run_at_once_not_after_the_timeout(
    tmp_path: Path, locked_redis: RedisServer
) -> None:
    """Redis refusing the run's password mid-run is no outage to wait out (60 s by
    default): the run stops at once, exit 3, and says why without the password."""
    total = 300
    source = write_input(tmp_path / "ids.jsonl", total)
    results = tmp_path / "out.jsonl"
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    new_password = "an0ther-s3cret"

    def change_password() -> None:
        cli = ["redis-cli", "-p", str(locked_redis.port), "-a", PASSWORD, "--no-auth-warning"]
        subprocess.run([*cli, "config", "set", "requirepass", new_password], check=True)
        # Its connections are authenticated already: they must connect again to notice.
        subprocess.run(
            ["redis-cli", "-p", str(locked_redis.port), "-a", new_password, "--no-auth-warning",
             "client", "kill", "type", "normal"],
            check=True, capture_output=True,
        )  # fmt: skip

    env = run_env(DISPATCHER_JOB_SHARD_LINES="50", DISPATCHER_REDIS_OUTAGE_TIMEOUT="60")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        command = job_command(source, results, emu.base_url, url)
        code, took, stdout, stderr = await _stop_redis_under(
            command, env, emu, locked_redis, do=change_password
        )
        sent = {key[1] for key in emu.log.accepted}
    assert code == 3, stderr[-3000:]
    assert took < 15.0, took  # not the 60 s outage timeout
    assert "Traceback" not in stderr
    assert "redis refused this run: authentication failed" in stderr
    for secret in (PASSWORD, new_password):
        assert secret not in stderr + stdout + results.read_text()
    written = envelopes([results])
    counts = summary_counts(stderr)
    assert counts["records"] == len(written)
    # Every record that reached the API has its envelope (claimed or listed unclaimed).
    assert sent <= {str(e["instance_id"]) for e in written}


async def test_redis_gone_between_the_url_check_and_the_job_ends_within_the_timeout(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The start-up probe gets through; every connection after it is refused (Redis died
    right then). Joining the job waits only as long as --redis-outage-timeout: exit 3,
    one line, nothing sent (it waited forever before)."""
    source = write_input(tmp_path / "ids.jsonl", 50)
    results = tmp_path / "out.jsonl"
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    only = listener.listeners[0]
    assert isinstance(only, anyio.abc.SocketListener)

    async def first_connection_only() -> None:
        client = await only.accept()  # the probe's
        async with client, await anyio.connect_tcp("127.0.0.1", redis_server.port) as up:

            async def pump(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream):
                    async for chunk in a:
                        await b.send(chunk)
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await b.send_eof()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, up)
                await pump(up, client)
                tg.cancel_scope.cancel()
        await listener.aclose()  # from now on: connection refused

    env = run_env(DISPATCHER_REDIS_OUTAGE_TIMEOUT="2")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        command = job_command(source, results, emu.base_url, f"redis://127.0.0.1:{port}/0")
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_connection_only)
            started = time.monotonic()
            with anyio.fail_after(20):
                done = await anyio.run_process(command, env=env, check=False)
            took = time.monotonic() - started
            tg.cancel_scope.cancel()
        sent = len(emu.log.requests)
    stderr = done.stderr.decode()
    assert done.returncode == 3, stderr[-3000:]
    assert took < 12.0, took
    assert "Traceback" not in stderr
    assert "while joining the job (--redis-outage-timeout 2s): nothing was sent" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert sent == 0


async def test_ctrl_c_of_a_job_does_not_say_the_input_was_empty(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    total = 300
    source = write_input(tmp_path / "ids.jsonl", total)
    results = tmp_path / "out.jsonl"
    env = run_env(DISPATCHER_JOB_SHARD_LINES="50")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        # Another process of the job has done it all: this one takes no record.
        first = job_command(source, tmp_path / "first.jsonl", emu.base_url, redis_server.url)
        done = await anyio.run_process(first, env=env, check=False)
        assert done.returncode == 0
        command = job_command(source, results, emu.base_url, redis_server.url)
        again = await anyio.run_process(command, env=env, check=False)
        assert "no records in" not in again.stderr.decode()
        # And one interrupted early.
        proc = await anyio.open_process(
            job_command(source, results, emu.base_url, redis_server.url, job="other"), env=env
        )
        try:
            await anyio.sleep(1.5)
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(20):
                await proc.wait()
            assert proc.stderr is not None
            stderr = (await _read_all(proc.stderr)).decode()
        finally:
            if proc.returncode is None:
                proc.kill()
    assert "no records in" not in stderr
    assert "Traceback" not in stderr


def test_a_bad_url_from_the_environment_names_the_flag_and_the_variable() -> None:
    parser = argparse.ArgumentParser()
    add_send_arguments(parser)
    args = parser.parse_args(["in.jsonl", "--account-id", "acct1"])
    url = f"redis://:{PASSWORD}@127.0.0.1:0/0"
    with pytest.raises(ConfigError) as caught:
        load_send_settings(args, {"CLOUDFLARE_API_TOKEN": TOKEN, "DISPATCHER_REDIS_URL": url})
    assert str(caught.value).startswith("--redis (DISPATCHER_REDIS_URL): redis://:***@")
    assert PASSWORD not in str(caught.value)


def test_the_outage_timeout_is_a_duration_from_flag_env_or_default() -> None:
    parser = argparse.ArgumentParser()
    add_send_arguments(parser)
    base = ["in.jsonl", "--account-id", "acct1"]
    env = {"CLOUDFLARE_API_TOKEN": TOKEN}
    assert load_send_settings(parser.parse_args(base), env).redis_outage_timeout == 60.0
    flag = parser.parse_args([*base, "--redis-outage-timeout", "2m"])
    assert load_send_settings(flag, env).redis_outage_timeout == 120.0
    from_env = {**env, "DISPATCHER_REDIS_OUTAGE_TIMEOUT": "500ms"}
    assert load_send_settings(parser.parse_args(base), from_env).redis_outage_timeout == 0.5
    with pytest.raises(ConfigError) as caught:
        load_send_settings(parser.parse_args([*base, "--redis-outage-timeout", "0"]), env)
    assert caught.value.where == "--redis-outage-timeout"


async def test_status_never_shows_the_password(locked_redis: RedisServer) -> None:
    for url in (
        f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0",
        f"redis://127.0.0.1:{locked_redis.port}/0?password={PASSWORD}",
        f"redis://:wrong-{PASSWORD}@127.0.0.1:{locked_redis.port}/0",
    ):
        done = await anyio.run_process(
            [sys.executable, "-m", "dispatcher", "status", "--redis", url, "--job", "none"],
            env=run_env(),
            check=False,
        )
        shown = done.stdout.decode() + done.stderr.decode()
        assert done.returncode in (2, 3), shown
        assert len(shown.strip().splitlines()) == 1, shown
        assert PASSWORD not in shown
        assert "Traceback" not in shown


def test_unrecord_takes_back_what_record_counted() -> None:
    from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind
    from dispatcher.sending.stats import RunStats

    env = Envelope(
        key="k",
        source="in.jsonl",
        line=1,
        workflow="wf",
        instance_id="i",
        event_type="go",
        delivery=Delivery.NOT_SENT,
        ok=False,
        status=503,
        attempts=1,
        error=EnvelopeError(kind=ErrorKind.STOPPED, code=None, message="stopped"),
        started_at=None,
        finished_at=datetime.now(UTC),
        latency_ms=12.0,
        elapsed_ms=12.0,
    )
    stats = RunStats()
    stats.record(env)
    stats.unrecord(env)
    assert stats.records == 0
    assert not stats.deliveries
    assert not stats.statuses
    assert not stats.errors
    assert stats.latency_count == 0


async def test_ctrl_c_while_redis_is_away_ends_at_once(
    tmp_path: Path, locked_redis: RedisServer
) -> None:
    source = write_input(tmp_path / "in.jsonl", 300)
    results = tmp_path / "out.jsonl"
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        command = send_command(
            source, results, emu.base_url, url, "--rate", "40/s", "--concurrency", "4"
        )
        code, took, _, stderr = await _stop_redis_under(
            command, run_env(), emu, locked_redis, interrupt=True, after=40
        )
    assert code == 130, stderr[-3000:]
    assert took < 10.0, took  # at once, not the 33 s it took before
    assert "Traceback" not in stderr
    assert "no records in" not in stderr
    written = envelopes([results])
    counts = summary_counts(stderr)
    assert counts["records"] == len(written)
    assert counts["confirmed"] == sum(e["delivery"] == "confirmed" for e in written)
    assert PASSWORD not in stderr
