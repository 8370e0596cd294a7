"""A ``--job`` keeps the promise one process keeps, whatever happens to Redis's state of it:
another input under its name, Redis restarted empty, Redis restored from an older
snapshot. Counted by the emulator's own log: no record delivered twice, none delivered
without an envelope, no ``confirmed`` for a record that did not arrive."""

from __future__ import annotations

import shutil
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_server import RedisServer, needs_redis
from test_redis_job import TOKEN, envelopes, job_command, job_env, write_input

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.inputs.records import line_offsets

pytestmark = needs_redis


async def run_all(
    commands: list[list[str]], logs: list[Path], *, env: dict[str, str], limit: float = 90
) -> list[int]:
    """Run the processes to their end; stderr of each in ``logs``."""
    procs: list[Any] = []
    files = [log.open("ab") for log in logs]
    try:
        for command, file in zip(commands, files, strict=True):
            procs.append(await anyio.open_process(command, env=env, stdout=file, stderr=file))
        with anyio.fail_after(limit):
            return [await p.wait() for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
        for file in files:
            file.close()


def check_truth(emu: Emulator, outs: list[Path], total: int) -> Counter[str]:
    """The job's promise, from the emulator's log and every results file."""
    accepted = Counter({key[1]: len(times) for key, times in emu.log.accepted.items()})
    envs = envelopes(outs)
    per_record = Counter(str(e["instance_id"]) for e in envs)
    assert len(per_record) == total, "a record has no envelope"
    assert set(per_record.values()) == {1}, "a record has two envelopes"
    twice = sorted(k for k, n in accepted.items() if n > 1)
    assert twice == [], f"delivered twice: {twice}"
    by_id = {str(e["instance_id"]): e for e in envs}
    for instance in accepted:
        assert by_id[instance]["delivery"] in ("confirmed", "unknown"), by_id[instance]
    for instance, env in by_id.items():
        if env["delivery"] == "confirmed":
            assert instance in accepted, f"confirmed, never arrived: {instance}"
        assert env["delivery"] != "not_sent" or instance not in accepted
    return Counter(str(e["delivery"]) for e in envs)


async def wait_for_envelopes(outs: list[Path], count: int, deadline: float = 30) -> None:
    with anyio.fail_after(deadline):
        while sum(len(envelopes([o])) for o in outs) < count:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # written by other processes: nothing to wait on


def no_traceback(logs: list[Path]) -> str:
    text = "".join(log.read_text(errors="replace") for log in logs)
    assert "Traceback" not in text, text[-3000:]
    return text


async def test_a_job_name_with_another_input_is_refused_in_one_line(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    day1 = write_input(tmp_path / "day1.jsonl", 60)
    day2 = tmp_path / "day2.jsonl"
    day2.write_bytes(day1.read_bytes().replace(b'"j1', b'"k1'))  # same size, other records
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        first = await anyio.run_process(
            job_command(day1, tmp_path / "a.jsonl", emu.base_url, redis_server.url, "200/s"),
            env=job_env(),
            check=False,
        )
        assert first.returncode == 0, first.stderr.decode()
        second = await anyio.run_process(
            job_command(day2, tmp_path / "b.jsonl", emu.base_url, redis_server.url, "200/s"),
            env=job_env(),
            check=False,
        )
        sent = sum(len(t) for t in emu.log.accepted.values())
    err = second.stderr.decode()
    assert second.returncode == 2
    assert err.count("\n") == 1, err
    assert "--job: nightly is bound to another input" in err
    assert "day1.jsonl" in err  # what it is bound to
    assert sent == 60  # nothing of day2 was sent
    assert not (tmp_path / "b.jsonl").exists() or envelopes([tmp_path / "b.jsonl"]) == []


async def test_two_inputs_started_together_under_one_name_one_is_refused(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    inputs = [write_input(tmp_path / "day1.jsonl", 200)]
    inputs.append(tmp_path / "day2.jsonl")
    inputs[1].write_bytes(inputs[0].read_bytes().replace(b'"j', b'"k'))
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        commands = [
            job_command(src, out, emu.base_url, redis_server.url, "200/s")
            for src, out in zip(inputs, outs, strict=True)
        ]
        codes = await run_all(commands, logs, env=job_env())
        prefixes = {key[1][0] for key in emu.log.accepted}
    assert sorted(codes) == [0, 2]
    winner = codes.index(0)
    assert prefixes == {"jk"[winner]}, "the refused input sent records, or the other did not"
    assert "is bound to another input" in logs[1 - winner].read_text()
    no_traceback(logs)


@pytest.mark.parametrize("how", ["restarted empty", "restored from an older snapshot"])
async def test_redis_losing_the_job_stops_the_run_and_a_rerun_sends_nothing_twice(
    tmp_path: Path, redis_server: RedisServer, how: str
) -> None:
    total = 900
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / f"out{i}.jsonl" for i in range(3)]
    logs = [tmp_path / f"p{i}.log" for i in range(3)]
    env = job_env(DISPATCHER_JOB_TIMEOUT="3")
    snapshot = tmp_path / "snapshot.rdb"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        commands = [
            job_command(source, out, emu.base_url, redis_server.url, "150/s") for out in outs
        ]
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def first_run() -> None:
                codes.extend(await run_all(commands, logs, env=env))

            tg.start_soon(first_run)
            # All three joined (a loaded machine starts Python slowly): each has sent.
            for out in outs:
                await wait_for_envelopes([out], 30, deadline=60)
            await wait_for_envelopes(outs, 150)
            if how == "restored from an older snapshot":
                redis_server.command("save")
                shutil.copy(redis_server.folder / "dump.rdb", snapshot)
                await wait_for_envelopes(outs, 350)
            redis_server.kill()
            redis_server.wipe()
            if snapshot.exists():
                shutil.copy(snapshot, redis_server.folder / "dump.rdb")
            await anyio.sleep(1)
            redis_server.start()
        text = no_traceback(logs)
        assert codes == [3, 3, 3], text[-2000:]
        assert text.count("Redis no longer holds job nightly's state") == 3
        # Every delivered record has its envelope already, before any rerun.
        delivered = {key[1] for key in emu.log.accepted}
        written = {str(e["instance_id"]) for e in envelopes(outs)}
        assert delivered <= written
        # The same commands again: each claims what the results hold, then goes on.
        again = await run_all(commands, logs, env=env)
        assert again == [0, 0, 0], no_traceback(logs)[-2000:]
        deliveries = check_truth(emu, outs, total)
    assert deliveries["confirmed"] + deliveries["unknown"] == total
    assert "claimed again before sending" in logs[0].read_text()


async def test_after_a_loss_no_host_sends_before_every_host_of_the_job_has_rejoined(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two hosts (a and b: nobody reads the other's files). Redis restarts empty; only
    host a starts again. It must not send what b's results already settle: it waits for
    b, and after DISPATCHER_JOB_RECOVERY_WAIT stops (exit 3, naming b), sending nothing.
    Both started again: the job completes with nothing sent twice."""
    total = 600
    source = write_input(tmp_path / "in.jsonl", total)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    wait = {"DISPATCHER_JOB_TIMEOUT": "3", "DISPATCHER_JOB_RECOVERY_WAIT": "3"}
    envs = [job_env(DISPATCHER_JOB_HOST=host, **wait) for host in ("host-a", "host-b")]
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        commands = [
            job_command(source, out, emu.base_url, redis_server.url, "150/s") for out in outs
        ]

        async def run(i: int) -> int:
            return (await run_all([commands[i]], [logs[i]], env=envs[i]))[0]

        async def both() -> list[int]:
            codes = [0, 0]

            async def one(i: int) -> None:
                codes[i] = await run(i)

            async with anyio.create_task_group() as tg:
                for i in (0, 1):
                    tg.start_soon(one, i)
            return codes

        async with anyio.create_task_group() as tg:
            first: list[int] = []

            async def first_run() -> None:
                first.extend(await both())

            tg.start_soon(first_run)
            for out in outs:
                await wait_for_envelopes([out], 60, deadline=60)
            redis_server.kill()
            redis_server.wipe()
            await anyio.sleep(1)
            redis_server.start()
        assert first == [3, 3], no_traceback(logs)[-2000:]
        sent = emu.log.total_accepted()
        # Host a alone: it waits for b, then stops; nothing sent meanwhile.
        alone = await run(0)
        text = logs[0].read_text()
        assert alone == 3, text[-2000:]
        assert "host(s) host-b did not rejoin within 3 s" in text
        assert emu.log.total_accepted() == sent
        # Both again: each claims what its results hold, then the job completes.
        assert await both() == [0, 0], no_traceback(logs)[-2000:]
        deliveries = check_truth(emu, outs, total)
    assert deliveries["confirmed"] + deliveries["unknown"] == total


def test_planning_a_job_reads_a_huge_line_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as file:
        file.write(b'{"a": 1}\n')
        for _ in range(64):
            file.write(b"x" * (1 << 20))  # 64 MiB, and no newline at the end
    tracemalloc.start()
    try:
        ranges = list(line_offsets(str(path), 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ranges == [(1, 0, 1), (2, 9, 1)]
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB to cut a 64 MiB line"
