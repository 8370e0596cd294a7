"""`dispatcher create` against the emulator in instance mode: batches, resume, kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from dispatcher.emulator import Emulator, EmulatorConfig, Faults, InstanceModel, Limit

MODEL = InstanceModel(event_type="approval")


def command(emu: Emulator, results: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dispatcher", "create", "--workflow", "wf",
        "--account-id", "acc", "--base-url", emu.base_url, "--results", str(results),
        "--rate", "1000/s", *extra,
    ]  # fmt: skip


async def run(cmd: list[str]) -> tuple[int, str]:
    env = dict(os.environ, CLOUDFLARE_API_TOKEN="tok")
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def outcomes(results: Path) -> dict[str, str]:
    final: dict[str, str] = {}
    for line in results.read_bytes().splitlines():
        obj = orjson.loads(line)
        if obj["outcome"] != "pending":
            final[obj["instance_id"]] = obj["outcome"]
    return final


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=MODEL)], indirect=True)
async def test_jsonl_input_and_existing_ids(emulator: Emulator, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(f'{{"instance_id": "o-{n}", "params": {{"n": {n}}}}}\n' for n in range(150))
        + '{"params": {"no_id": true}}\n'
    )
    results = tmp_path / "r.jsonl"
    code, err = await run(command(emulator, results, str(src)))
    assert code == 0, err
    got = outcomes(results)
    assert len(got) == 151
    assert set(got.values()) == {"created"}
    assert "in-151" in got  # an id made from the stem and the line number
    # A second file naming some of the same ids: those are `exists`, the rest created.
    again = tmp_path / "again.jsonl"
    again.write_text('{"instance_id": "o-3"}\n{"instance_id": "fresh"}\n')
    results2 = tmp_path / "r2.jsonl"
    code, err = await run(command(emulator, results2, str(again)))
    assert code == 0, err
    assert outcomes(results2) == {"o-3": "exists", "fresh": "created"}
    assert max(emulator.log.creations.values()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--count", "0"], "--count"),
        (["--count", "3", "--params", "{nope"], "--params"),
        (["--count", "3", "--id-prefix", "a/b"], "--id-prefix"),
        (["--count", "3", "--creation-rate", "fast"], "--creation-rate"),
        (["--count", "3", "--account-creation-rate", "unlimited"], "--account-creation-rate"),
    ],
)
@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=MODEL)], indirect=True)
async def test_bad_flags_exit_2_in_one_line(
    emulator: Emulator, tmp_path: Path, args: list[str], needle: str
) -> None:
    code, err = await run(command(emulator, tmp_path / "r.jsonl", *args))
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=MODEL)], indirect=True)
async def test_bad_input_line_names_file_and_line(emulator: Emulator, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"instance_id": "ok"}\n[1, 2]\n')
    code, err = await run(command(emulator, tmp_path / "r.jsonl", str(src)))
    assert code == 2
    assert f"{src}:2" in err
    assert "Traceback" not in err
    assert emulator.log.creations == {}


DROPS = EmulatorConfig(limit=None, instances=MODEL, faults=Faults(drop=0.3), seed=7)


@pytest.mark.parametrize("emulator", [DROPS], indirect=True)
async def test_lost_answers_are_read_back_not_created_again(
    emulator: Emulator, tmp_path: Path
) -> None:
    results = tmp_path / "r.jsonl"
    code, err = await run(command(emulator, results, "--count", "300", "--id-prefix", "d-"))
    assert code == 0, err
    assert emulator.log.faults["drop"] > 0
    assert set(outcomes(results).values()) == {"created"}
    assert len(emulator.log.creations) == 300
    assert max(emulator.log.creations.values()) == 1


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=MODEL)], indirect=True)
async def test_kill_9_mid_run_then_resume_makes_no_duplicate_and_loses_none(
    emulator: Emulator, tmp_path: Path
) -> None:
    results = tmp_path / "r.jsonl"
    cmd = command(emulator, results, "--count", "500", "--id-prefix", "k-")
    env = dict(os.environ, CLOUDFLARE_API_TOKEN="tok")
    proc = await asyncio.create_subprocess_exec(
        *cmd, "--creation-rate", "200/s", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    while sum(emulator.log.creations.values()) < 200:
        await asyncio.sleep(0.01)
        assert proc.returncode is None
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert 0 < len(emulator.log.creations) < 500
    code, err = await run([*cmd, "--resume"])
    assert code == 0, err
    created = emulator.log.creations
    assert len(created) == 500  # none lost
    assert max(created.values()) == 1  # none twice
    assert set(outcomes(results).values()) == {"created"}
    code, err = await run([*cmd, "--resume"])  # a rerun of a finished run creates nothing
    assert code == 0, err
    assert sum(emulator.log.creations.values()) == 500


# --- CSV input -------------------------------------------------------------------------------


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=MODEL)], indirect=True)
async def test_csv_input_with_a_json_params_cell(emulator: Emulator, tmp_path: Path) -> None:
    src = tmp_path / "load.csv"
    src.write_text(
        "instance_id,params\n"
        'c-1,"{""n"": 1, ""tags"": [""a"", ""b""]}"\n'
        "c-2,\n"  # no params
        '\n,"{""no_id"": true}"\n'  # a blank line, then an id made from the line number
    )
    results = tmp_path / "r.jsonl"
    code, err = await run(command(emulator, results, str(src)))
    assert code == 0, err
    assert outcomes(results) == {"c-1": "created", "c-2": "created", "load-5": "created"}
    url = f"{emulator.base_url}/accounts/acc/workflows/wf/instances"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as session:
        for iid, params in [("c-1", {"n": 1, "tags": ["a", "b"]}), ("load-5", {"no_id": True})]:
            async with session.get(f"{url}/{iid}") as resp:
                assert (await resp.json())["result"]["params"] == params
    assert max(emulator.log.creations.values()) == 1


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("instance_id,body\nx,{}\n", 1),  # an unknown column
        ('instance_id,params\nok,\nbad,"{nope"\n', 3),  # params not JSON
        ("instance_id,params\nok,,extra\n", 2),  # a cell too many
        ("instance_id\na/b\n", 2),  # a bad id
        ("instance_id\nsame\nsame\n", 3),  # a repeated id
    ],
)
@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=MODEL)], indirect=True)
async def test_bad_csv_names_file_and_line_and_creates_nothing(
    emulator: Emulator, tmp_path: Path, text: str, line: int
) -> None:
    src = tmp_path / "in.csv"
    src.write_text(text)
    code, err = await run(command(emulator, tmp_path / "r.jsonl", str(src)))
    assert code == 2, err
    assert err.startswith("dispatcher")
    assert f"{src}:{line}:" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert emulator.log.creations == {}


# --- 429 and Retry-After -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=Limit(quota=2, window=1.0), instances=MODEL)], indirect=True
)
async def test_a_429_waits_its_retry_after_and_loses_nothing(
    emulator: Emulator, tmp_path: Path
) -> None:
    results = tmp_path / "r.jsonl"
    cmd = command(emulator, results, "--count", "500", "--id-prefix", "rl-")
    started = time.monotonic()
    code, err = await run([*cmd, "--creation-rate", "100000/s"])
    assert code == 0, err
    assert emulator.log.status_counts.get(429, 0) > 0
    assert "answered 429 and waited" in err
    # 5 batches at 2 per second: the 429s were waited out, not retried at once.
    assert time.monotonic() - started >= 1.0
    assert set(outcomes(results).values()) == {"created"}
    assert len(emulator.log.creations) == 500
    assert max(emulator.log.creations.values()) == 1


async def test_a_retry_after_of_0_still_waits_1_s(tmp_path: Path) -> None:
    seen: list[float] = []

    async def batch(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        if len(seen) == 1:
            return web.json_response(
                {"success": False, "errors": [{"code": 971, "message": "slow down"}]},
                status=429,
                headers={"Retry-After": "0"},
            )
        return web.json_response({"success": True, "errors": [], "result": []})

    app = web.Application()
    app.router.add_post("/accounts/acc/workflows/wf/instances/batch", batch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        cmd = [
            sys.executable, "-m", "dispatcher", "create", "--workflow", "wf", "--account-id",
            "acc", "--base-url", f"http://127.0.0.1:{port}", "--results",
            str(tmp_path / "r.jsonl"), "--count", "3",
        ]  # fmt: skip
        code, err = await run(cmd)
    finally:
        await runner.cleanup()
    assert code == 0, err
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 1.0
    assert set(outcomes(tmp_path / "r.jsonl").values()) == {"created"}


async def test_a_target_that_cannot_be_reached_stops_with_exit_3(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = tmp_path / "r.jsonl"
    cmd = [
        sys.executable, "-m", "dispatcher", "create", "--workflow", "wf", "--account-id",
        "acc", "--base-url", f"http://127.0.0.1:{port}", "--results", str(results),
        "--count", "3",
    ]  # fmt: skip
    code, err = await run(cmd)
    assert code == 3, err
    assert "could not connect" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    # Nothing settled: the ids stay pending, and --resume reads them back first.
    assert outcomes(results) == {}
    assert {obj["outcome"] for obj in map(orjson.loads, results.read_bytes().splitlines())} == {
        "pending"
    }


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


@pytest.mark.parametrize(
    ("per_workflow", "per_account", "seconds"),
    [
        (100.0, 300.0, 9.0),  # the defaults: the workflow's 100/s sets the pace
        (1000.0, 300.0, 3.0),  # a faster workflow rate: the account's 300/s holds
        (1000.0, 50.0, 18.0),  # an account shared with other runs: its share holds
    ],
)
async def test_creation_waits_for_both_limits_the_slower_sets_the_pace(
    per_workflow: float, per_account: float, seconds: float
) -> None:
    from dispatcher.commands.create import CreationPacer

    clock = FakeClock()
    pacer = CreationPacer(per_workflow, per_account, clock=clock, sleep=clock.sleep)
    for _ in range(10):  # ten batches of 100 instances, each started when both allow
        await pacer.wait(100)
    # The tenth batch starts after nine batches' worth of the slower rate.
    assert clock.t - 100.0 == pytest.approx(seconds)
