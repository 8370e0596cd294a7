"""One job shared by several processes through a real redis-server (``--job``)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import anyio.abc
import orjson
import pytest
from anyio.abc import SocketAttribute
from redis_server import RedisServer, needs_redis

from dispatcher.coordination.connection import Link
from dispatcher.coordination.job import Job
from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.emulator.faults import Faults
from dispatcher.inputs.keys import KeyDeriver

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


async def job_status(
    redis: RedisServer, job: str = "nightly", sample: str = "0.1"
) -> subprocess.CompletedProcess[bytes]:
    """``dispatcher status`` of ``job``, as a user runs it."""
    return await anyio.run_process(
        [
            *(sys.executable, "-m", "dispatcher", "status"),
            *("--redis", redis.url, "--job", job, "--sample", sample),
        ],
        check=False,
    )


def job_meta(redis: RedisServer) -> dict[bytes, bytes]:
    """The job's meta hash (shards, acked...)."""
    fields = redis.command("hgetall", "dispatcher:{job:nightly}:meta").split()
    return dict(zip(fields[::2], fields[1::2], strict=True))


async def finish_job(
    procs: list[anyio.abc.Process], waited: list[anyio.abc.Process], redis: RedisServer
) -> list[int]:
    """The exit codes of ``waited`` once they end: 60 s at most, else the job's status
    fails the test, and so does an exit code above 0, with what that process said (the
    caller kills what still runs, see ``kill_left``)."""
    with anyio.move_on_after(60):
        codes = [await p.wait() for p in waited]
    if any(p.returncode is None for p in procs):
        status = await job_status(redis)
        pytest.fail("the job did not finish:\n" + status.stdout.decode())
    for proc, code in zip(waited, codes, strict=True):
        if code > 0:
            said = b""
            with contextlib.suppress(anyio.EndOfStream):
                said = await proc.stderr.receive(65536) if proc.stderr else b""
            pytest.fail(f"a process of the job exited {code}:\n{said.decode()[-3000:]}")
    return codes


def kill_left(procs: list[anyio.abc.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            p.kill()


def each_once(outs: list[Path], accepted: dict[str, int], total: int) -> set[str]:
    """Checks what any kill must leave: one final envelope per record, each `confirmed`
    or `unknown`, every record delivered or held in doubt, none delivered twice. Returns
    the instance ids held `unknown`."""
    envs = envelopes(outs)
    per_key = Counter(e["key"] for e in envs)
    assert len(per_key) == total
    assert set(per_key.values()) == {1}, "a record got two final envelopes"
    assert {e["delivery"] for e in envs} <= {"confirmed", "unknown"}
    unknown = {str(e["instance_id"]) for e in envs if e["delivery"] == "unknown"}
    assert set(accepted) | unknown == {f"j{i}" for i in range(total)}
    assert [k for k, n in accepted.items() if n > 1] == [], "delivered twice"
    return unknown


async def two_runs_one_interrupted(
    source: Path, outs: list[Path], emu: Emulator, redis: RedisServer, *, signals: int
) -> list[int]:
    """Two processes of one job at 40/s; the first gets ``signals`` SIGINTs once it has
    written some envelopes. Their exit codes, once both have ended."""
    procs = [
        await anyio.open_process(
            job_command(source, outs[i], emu.base_url, redis.url, "40/s"), env=job_env()
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (  # noqa: ASYNC110
            not outs[0].exists() or outs[0].stat().st_size < 1500
        ):
            await anyio.sleep(0.05)
        for n in range(signals):
            if n:
                await anyio.sleep(0.05)
            procs[0].send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            return [await p.wait() for p in procs]
    finally:
        kill_left(procs)


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
            codes = await finish_job(procs, procs, redis_server)
        finally:
            kill_left(procs)
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert codes[0] == -signal.SIGKILL
    assert codes[1:] == [0, 0, 0]
    # What the victim had in flight (its journal says so) is in doubt, as a one-process
    # resume would say: `unknown`, and never sent again by the process that took over.
    unknown = each_once(outs, accepted, total)
    assert len(unknown) <= 4 + 16, unknown
    meta = job_meta(redis_server)
    assert meta[b"acked"] == meta[b"shards"] == b"12"
    shown = await job_status(redis_server)
    text = shown.stdout.decode()
    assert shown.returncode == 0, shown.stderr
    assert "state     done" in text
    assert "12 of 12 done" in text
    assert f"{total} of {total} final" in text
    assert "account acct1" in text


async def test_a_record_sent_just_before_a_kill_on_another_host_is_not_sent_again(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The victim runs on "another host" (nobody can read its journal) and dies a moment
    after its first requests left, before any heartbeat could list them. Its requests
    still reach the API (0.3 s each, and the server goes on without its client). The
    processes that take its shard over must not send those records again: they were
    announced to Redis before they left, so they end `unknown`. So does a record the kill
    caught between its announcement and its request (announced, never sent): nobody can
    tell it from one that left, and such records are few."""
    total = 400
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(3)]
    config = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults(latency=(0.3, 0.3)))
    async with Emulator(config) as emu:
        victim = await anyio.open_process(
            job_command(source, outs[0], emu.base_url, redis_server.url, "100/s"),
            env=job_env(DISPATCHER_JOB_TIMEOUT="3", DISPATCHER_JOB_HOST="host-b"),
        )
        procs = [victim]
        try:
            with anyio.fail_after(20):
                while emu.log.total_accepted() == 0:  # noqa: ASYNC110 (another process)
                    await anyio.sleep(0.002)
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            # Its requests in flight end on the server (0.3 s) before anyone else sends.
            await anyio.sleep(0.5)
            delivered_by_victim = {key[1] for key in emu.log.accepted}
            env = job_env(DISPATCHER_JOB_TIMEOUT="3")
            procs += [
                await anyio.open_process(
                    job_command(source, outs[i], emu.base_url, redis_server.url, "200/s"),
                    env=env,
                )
                for i in (1, 2)
            ]
            codes = await finish_job(procs, procs[1:], redis_server)
        finally:
            kill_left(procs)
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert codes == [0, 0]
    assert delivered_by_victim
    unknown = each_once(outs, accepted, total)
    # The victim's requests were in flight when it died: announced, never listed in a
    # heartbeat, delivered all the same. None of them is sent again or called confirmed.
    assert delivered_by_victim <= unknown
    # In doubt but never delivered: only what the kill caught between announcement and
    # request (a Redis round trip's worth of records at 100/s), not the victim's shard.
    never_arrived = unknown - set(accepted)
    assert len(never_arrived) <= 5, sorted(never_arrived)


class KillAtClaimAnswer:
    """A TCP proxy in front of Redis that kill -9s its client the moment the answer to
    the client's first envelope claim comes back: the claim is made in Redis, and the
    process dies before it can write a single one of those envelopes."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.victim: int | None = None
        self.claimed: set[bytes] = set()  # the instance ids of the claim that killed it
        self.fired = False

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        await listener.serve(self._connection)

    async def _connection(self, client: anyio.abc.SocketStream) -> None:
        armed: list[bytes] = []  # the claim request, once this connection sent one
        async with client, await anyio.connect_tcp("127.0.0.1", self.redis_port) as upstream:

            async def up() -> None:
                tail = b""
                with contextlib.suppress(*GONE):
                    async for chunk in client:
                        if not self.fired and b'"delivery"' in tail + chunk:
                            armed.append(chunk)
                        # Enough to see the marker across two reads, too little to hold a
                        # whole one from a request before (no request ends with it).
                        tail = chunk[-16:]
                        await upstream.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(up)
                with contextlib.suppress(*GONE):
                    async for chunk in upstream:
                        if armed and chunk.startswith(b"-"):
                            # An error (NOSCRIPT: redis-py loads the script and calls it
                            # again): nothing was claimed yet.
                            armed.clear()
                        if armed and not self.fired and self.victim is not None:
                            self.fired = True
                            found = re.findall(rb'"instance_id":"([^"]+)"', b"".join(armed))
                            self.claimed = set(found)
                            os.kill(self.victim, signal.SIGKILL)
                            break
                        await client.send(chunk)
                tg.cancel_scope.cancel()


# A connection of the killed process, or of one that ended, just goes away.
GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


async def test_a_worker_killed_between_its_claim_and_its_write_loses_no_envelope(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Cross-host safe: nobody reads the dead worker's file (its process is gone, and so
    is its results file as far as the others know: it wrote nothing)."""
    total = 400
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(3)]
    env = job_env(DISPATCHER_JOB_TIMEOUT="3")
    proxy = KillAtClaimAnswer(redis_server.port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    proxy_url = f"redis://127.0.0.1:{listener.extra(SocketAttribute.local_port)}/0"
    async with (
        Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(proxy.serve, listener)
        procs = []
        try:
            for i in range(3):
                url = proxy_url if i == 0 else redis_server.url
                procs.append(
                    await anyio.open_process(
                        job_command(source, outs[i], emu.base_url, url, "100/s"), env=env
                    )
                )
                if i == 0:
                    proxy.victim = procs[0].pid
                    # The others start once the victim is dead: started together, a slow
                    # start-up of the victim on a loaded machine let them finish the whole
                    # job before it made a claim, and the proxy never fired.
                    with anyio.fail_after(60):
                        while not proxy.fired:
                            assert procs[0].returncode is None, "the victim never claimed"
                            await anyio.sleep(0.02)
            with anyio.fail_after(60):
                codes = [await p.wait() for p in procs]
        finally:
            kill_left(procs)
            tg.cancel_scope.cancel()
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert proxy.fired
    assert codes == [-signal.SIGKILL, 0, 0]
    assert proxy.claimed, "the victim's claim carried no keys"
    assert envelopes([outs[0]]) == [], "the victim wrote an envelope"
    per_key = Counter(e["key"] for e in envelopes(outs))
    assert len(per_key) == total
    assert set(per_key.values()) == {1}
    # The claimed records were not sent again: their envelopes, the victim's, were
    # written by the worker that took its shard over.
    claimed = {k.decode() for k in proxy.claimed}
    assert {accepted[k] for k in claimed} == {1}, {k: accepted[k] for k in claimed}
    pending = [
        v
        for v in redis_server.command("hvals", "dispatcher:{job:nightly}:final").splitlines()
        if v.startswith(b"p:")
    ]
    assert pending == []


async def test_a_run_stopped_by_ctrl_c_leaves_its_unfinished_records_to_the_others(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    total = 300
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(2)]
    # The default heartbeat timeout (30 s): the shards come back at once, not by timeout.
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        codes = await two_runs_one_interrupted(source, outs, emu, redis_server, signals=1)
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert codes == [130, 0]
    mine, theirs = envelopes([outs[0]]), envelopes([outs[1]])
    assert 0 < len(mine) < total // 2
    per_key = Counter(e["key"] for e in mine + theirs)
    assert len(per_key) == total
    assert set(per_key.values()) == {1}
    assert {e["delivery"] for e in mine + theirs} == {"confirmed"}
    assert [k for k, n in accepted.items() if n > 1] == []
    meta = job_meta(redis_server)
    assert meta[b"acked"] == meta[b"shards"] == b"6"


async def test_a_run_stopped_at_once_claims_what_it_cut_off(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Ctrl-C twice: the requests in flight are cut off, their records end ``unknown``
    (they may have arrived), claimed like any final envelope: nobody sends them again."""
    total = 200
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(2)]
    config = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults(latency=(0.3, 0.3)))
    async with Emulator(config) as emu:
        codes = await two_runs_one_interrupted(source, outs, emu, redis_server, signals=2)
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert codes == [130, 0]
    mine, theirs = envelopes([outs[0]]), envelopes([outs[1]])
    per_key = Counter(e["key"] for e in mine + theirs)
    assert len(per_key) == total
    assert set(per_key.values()) == {1}
    cut_off = [e for e in mine if e["delivery"] == "unknown"]
    assert 0 < len(cut_off) <= 4  # --concurrency 4
    assert {e["delivery"] for e in theirs} == {"confirmed"}
    assert [k for k, n in accepted.items() if n > 1] == []


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
            kill_left(procs)
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
    shown = await job_status(redis_server, "never-started", sample="0")
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


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DISPATCHER_JOB_TIMEOUT", "soon"),
        ("DISPATCHER_JOB_TIMEOUT", "1"),
        ("DISPATCHER_JOB_SHARD_LINES", "0"),
        ("DISPATCHER_JOB_SHARD_LINES", "2k"),
    ],
)
async def test_a_bad_job_setting_is_one_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", 3)
    result = await anyio.run_process(
        [
            *job_command(
                source, tmp_path / "out.jsonl", "http://127.0.0.1:9", "redis://127.0.0.1:9/0", "5/s"
            ),
        ],
        env={**job_env(), variable: value},
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert err.count("\n") == 1, err
    assert variable in err
    assert repr(value) in err


async def test_a_claim_call_repeated_after_its_answer_was_lost_still_wins(
    redis_server: RedisServer,
) -> None:
    """``Link.call`` repeats a call whose answer never came (a timeout, a broken
    connection): the claims it made the first time are this process's, not lost ones,
    whose envelopes nobody would then write. The same for adopting a dead one's claims."""
    link = Link(redis_server.url)
    try:
        job, other = Job(link, "retry", timeout=3), Job(link, "retry", timeout=3)
        await job.create()
        await other.create()
        claims = [("k1", b'{"key":"k1"}\n'), ("k2", b'{"key":"k2"}\n')]
        assert await job.settle(claims=claims) == [True, True]
        assert await job.settle(claims=claims) == [True, True]
        assert await other.settle(claims=claims) == [False, False]
        adopted = {"k1": b'{"key":"k1"}\n'}
        assert await other.adopt({"k1": job.tag}) == adopted
        assert await other.adopt({"k1": job.tag}) == adopted
        await other.settle(written=["k1"])
        assert await job.adopt({"k1": job.tag}) == {}
        meta = redis_server.command("hget", "dispatcher:{job:retry}:meta", "final")
        assert meta.strip() == b"2"
    finally:
        await link.aclose()


async def test_a_full_disk_under_a_job_is_exit_5_and_a_rerun_finishes_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from crashkit import tmpfs

    total = 600
    source = write_input(tmp_path / "in.jsonl", total)
    with tmpfs(tmp_path / "disk", "32k") as disk:
        out = disk / "out.jsonl"
        async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
            command = job_command(source, out, emu.base_url, redis_server.url, "unlimited")
            first = await anyio.run_process(
                command, env=job_env(DISPATCHER_JOB_TIMEOUT="3"), check=False
            )
            err = first.stderr.decode()
            assert first.returncode == 5, err
            assert "Traceback" not in err
            assert (
                err.strip()
                .splitlines()[-1]
                .startswith("dispatcher send: error: cannot write results to ")
            )
            assert "No space left on device" in err
            await anyio.run_process(["mount", "-o", "remount,size=16m", str(disk)])
            # The claims of the envelopes the disk refused carry them: after the first
            # process's heartbeat timed out, a rerun of the same job writes them.
            await anyio.sleep(3.5)
            # The summary's last line is the command that finishes the job: the same one.
            # The summary, then one line: what failed and the command that finishes the
            # job, which for a job is the same command (it resumes by itself).
            assert "run summary" in err
            last = err.strip().splitlines()[-1]
            assert "--resume" not in last, err
            assert last.endswith("--progress lines"), err
            second = await anyio.run_process(
                command, env=job_env(DISPATCHER_JOB_TIMEOUT="3"), check=False
            )
            assert second.returncode == 0, second.stderr.decode()
            accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
        per_key = Counter(e["key"] for e in envelopes([out]))
    assert len(per_key) == total
    assert set(per_key.values()) == {1}
    assert [k for k, n in accepted.items() if n > 1] == []


async def test_an_announcement_outliving_a_dead_worker_of_this_host_is_judged_by_its_journal(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A worker of this host dies (here kill -9; in CI's flake, a run that left while
    Redis was away and so could not release them) with records announced that its
    journal never named: nothing of them left, so whoever takes its shard sends them, once,
    instead of giving them `unknown`. What its journal does name stays in doubt."""
    total = 40
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / "out0.jsonl", tmp_path / "out1.jsonl"]
    env = job_env(DISPATCHER_JOB_TIMEOUT="3")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        victim = await anyio.open_process(
            job_command(source, outs[0], emu.base_url, redis_server.url, "5/s"), env=env
        )
        procs = [victim]
        try:
            with anyio.fail_after(30):
                while emu.log.total_accepted() < 2:  # noqa: ASYNC110 (another process)
                    await anyio.sleep(0.01)
            victim.kill()
            await victim.wait()
            fields = redis_server.command("hgetall", "dispatcher:{job:nightly}:workers").split()
            beats = [orjson.loads(v) for v in fields[1::2]]
            assert len(beats) == 1, beats
            assert "pid" in beats[0], beats
            # The last record, announced by the victim and never journaled: as if it died
            # between its announcement and its journal line.
            last = KeyDeriver().key_for(None, "wf", f"j{total - 1}", "go", None)
            redis_server.command("hset", "dispatcher:{job:nightly}:started", last, beats[0]["tag"])
            procs.append(
                await anyio.open_process(
                    job_command(source, outs[1], emu.base_url, redis_server.url, "200/s"),
                    env=env,
                )
            )
            codes = await finish_job(procs, procs[1:], redis_server)
        finally:
            kill_left(procs)
        accepted = {key[1]: len(times) for key, times in emu.log.accepted.items()}
    assert codes == [0]
    unknown = each_once(outs, accepted, total)
    assert f"j{total - 1}" not in unknown, "a record nothing had sent was given unknown"
    assert accepted[f"j{total - 1}"] == 1
