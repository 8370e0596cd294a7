"""`dispatcher verify` against the emulator in instance mode, as a user runs it."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from factories import verify_table

from dispatcher.commands.verify import InstanceReader, verify_results
from dispatcher.emulator import Emulator, EmulatorConfig, InstanceModel, Limit
from dispatcher.results.ledger import read_envelopes
from dispatcher.results.verify import classify
from dispatcher.sending.gate import RateGate

TOKEN = "verify-secret-token"
WAITS = InstanceModel(event_type="approval", timeout=3600.0)


def env_for(emu: Emulator) -> dict[str, str]:
    return dict(
        os.environ,
        CLOUDFLARE_API_TOKEN=TOKEN,
        CLOUDFLARE_ACCOUNT_ID="acc",
        CLOUDFLARE_BASE_URL=emu.base_url,
    )


async def cli(emu: Emulator, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", *args, env=env_for(emu),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def create(emu: Emulator, ids: list[str]) -> None:
    url = f"{emu.base_url}/accounts/acc/workflows/wf/instances/batch"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = [{"instance_id": i} for i in ids]
    async with aiohttp.ClientSession(headers=headers) as s, s.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()


async def send(
    emu: Emulator, tmp: Path, name: str, ids: list[str], event_type: str, *, code: int = 0
) -> Path:
    id_file = tmp / f"{name}.txt"
    id_file.write_text("".join(f"{i}\n" for i in ids))
    results = tmp / f"{name}.jsonl"
    exit_code, _, err = await cli(
        emu, "send", str(id_file), "--workflow", "wf", "--event-type", event_type,
        "--rate", "unlimited", "--results", str(results),
    )  # fmt: skip
    assert exit_code == code, err
    return results


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


def verify_args(results: Path, *extra: str) -> list[str]:
    return ["verify", str(results), "--rate", "1000/s", *extra]


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=WAITS)], indirect=True)
async def test_right_event_is_consumed_and_exit_0_with_cost_first(
    emulator: Emulator, tmp_path: Path
) -> None:
    ids = [f"ok-{n}" for n in range(12)]
    await create(emulator, ids)
    results = await send(emulator, tmp_path, "right", ids, "approval")
    before = len(emulator.log.accepted)
    code, out, err = await cli(emulator, *verify_args(results))
    assert code == 0, out + err
    first = out.splitlines()[0]
    assert first.startswith("dispatcher verify: 12 record(s), 12 confirmed, on 12 instance(s)")
    assert "12 request(s)" in first
    got = lines(tmp_path / "right.verify.jsonl")
    assert len(got) == 12
    assert {g["class"] for g in got} == {"consumed"}
    assert {g["instance_id"] for g in got} == set(ids)
    assert any(row.split() == ["consumed", "12"] for row in out.splitlines())
    assert len(emulator.log.accepted) == before  # verify reads, it sends nothing
    assert TOKEN not in out + err


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=WAITS)], indirect=True)
async def test_wrong_event_type_is_no_waiter_exit_1(emulator: Emulator, tmp_path: Path) -> None:
    ids = [f"typo-{n}" for n in range(5)]
    await create(emulator, ids)
    results = await send(emulator, tmp_path, "typo", ids, "aproval")
    out_file = tmp_path / "v.jsonl"
    code, out, err = await cli(emulator, *verify_args(results, "--results-out", str(out_file)))
    assert code == 1, out + err
    got = lines(out_file)
    assert len(got) == 5
    assert {g["class"] for g in got} <= {"no_waiter", "waiting"}
    assert all("'aproval'" in g["reason"] for g in got)
    assert all("it waits for 'approval'" in g["reason"] for g in got)
    assert "no_waiter" in out


TIMES_OUT = InstanceModel(event_type="approval", timeout=0.001)


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, instances=TIMES_OUT)], indirect=True
)
async def test_instance_that_ended_before_the_send_is_ended(
    emulator: Emulator, tmp_path: Path
) -> None:
    await create(emulator, ["late-1", "late-2"])
    await asyncio.sleep(0.01)  # past the 1 ms wait: both error before the send
    results = await send(emulator, tmp_path, "late", ["late-1", "late-2"], "approval")
    code, out, err = await cli(emulator, *verify_args(results))
    assert code == 1, out + err
    got = lines(tmp_path / "late.verify.jsonl")
    assert [g["class"] for g in got] == ["ended", "ended"]
    assert all("errored" in g["reason"] and "before our send" in g["reason"] for g in got)


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=WAITS)], indirect=True)
async def test_unknown_instance_and_unconfirmed_records_have_their_own_lines(
    emulator: Emulator, tmp_path: Path
) -> None:
    await create(emulator, ["real"])
    results = await send(emulator, tmp_path, "mixed", ["real"], "approval")
    (env,) = lines(results)
    ghost = dict(env, key="ghost-key", instance_id="ghost")
    refused = dict(env, key="refused-key", delivery="rejected", ok=False)
    results.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in (env, ghost, refused)))
    code, out, err = await cli(emulator, *verify_args(results))
    assert code == 1, out + err
    assert "2 confirmed" in out.splitlines()[0]
    by_key = {g["key"]: g for g in lines(tmp_path / "mixed.verify.jsonl")}
    assert len(by_key) == 3
    assert by_key[env["key"]]["class"] == "consumed"
    assert by_key["ghost-key"]["class"] == "unknown"
    assert "unknown instance" in by_key["ghost-key"]["reason"]
    assert "10400" in by_key["ghost-key"]["reason"]
    assert by_key["refused-key"]["class"] == "not_verified"


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


async def test_wait_up_to_reads_again_until_a_late_wait_consumes(tmp_path: Path) -> None:
    clock = Clock()
    model = InstanceModel(event_type="approval", wait_after=600.0, timeout=3600.0)
    async with Emulator(EmulatorConfig(limit=None, instances=model), clock=clock) as emu:
        await create(emu, ["slow"])
        results = await send(emu, tmp_path, "slow", ["slow"], "approval")
        envelopes = list(read_envelopes(str(results)))
        written: list[bytes] = []

        async def sleep(seconds: float) -> None:  # the emulator's time moves, not ours
            clock.t += seconds

        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            reader = InstanceReader(
                session, RateGate(None), target="api", base_url=emu.base_url, account_id="acc"
            )
            # Without waiting: the instance has not reached its wait yet.
            quick = await verify_results(envelopes, reader, written.append)
            assert quick.counts == {"no_waiter": 1}
            assert not quick.all_consumed
            written.clear()
            summary = await verify_results(
                envelopes, reader, written.append, wait_up_to=900.0, recheck_every=60.0,
                clock=clock, sleep=sleep,
            )  # fmt: skip
    assert summary.counts == {"consumed": 1}
    assert summary.all_consumed
    (line,) = [orjson.loads(w) for w in written]
    assert line["class"] == "consumed"
    assert line["reads"] == 11  # the first read, then one a minute until minute 10
    assert summary.requests == 11


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--wait-up-to", "soon"], "--wait-up-to"),
        (["--rate", "fast"], "--rate"),
        (["--workflow", "a/b"], "--workflow"),
    ],
)
async def test_bad_flags_exit_2_in_one_line(
    emulator: Emulator, tmp_path: Path, args: list[str], needle: str
) -> None:
    results = tmp_path / "r.jsonl"
    results.write_text("")
    code, _, err = await cli(emulator, *verify_args(results), *args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


async def test_missing_or_broken_results_file_exit_2(emulator: Emulator, tmp_path: Path) -> None:
    code, _, err = await cli(emulator, *verify_args(tmp_path / "nope.jsonl"))
    assert code == 2
    assert "nope.jsonl" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"key": "a"}\n')
    code, _, err = await cli(emulator, *verify_args(broken))
    assert code == 2
    assert f"{broken}:1" in err
    assert "Traceback" not in err
    assert TOKEN not in err


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=WAITS)], indirect=True)
async def test_report_shows_a_verify_section(emulator: Emulator, tmp_path: Path) -> None:
    await create(emulator, ["r-1", "r-2"])
    results = await send(emulator, tmp_path, "rep", ["r-1", "r-2", "r-ghost"], "approval", code=1)
    code, out, err = await cli(emulator, *verify_args(results))
    assert code == 0, out + err  # every confirmed record was consumed; r-ghost was not sent
    verified = tmp_path / "rep.verify.jsonl"
    code, out, err = await cli(emulator, "report", str(results), str(verified))
    assert code == 0, err
    section = out[out.index("Verify (") :]
    rows = [line.split() for line in section.splitlines()]
    assert ["consumed", "2"] in rows
    assert ["not_verified", "1"] in rows  # r-ghost: the send was rejected (404)
    code, out, err = await cli(emulator, "report", str(results), str(verified), "--format", "json")
    assert code == 0, err
    assert orjson.loads(out)["verify"]["counts"]["consumed"] == 2


LIMITED = EmulatorConfig(limit=Limit(quota=3, window=1.0), lockout=1.0, instances=WAITS)


@pytest.mark.parametrize("emulator", [LIMITED], indirect=True)
async def test_429_pauses_every_read_for_retry_after_then_finishes(
    emulator: Emulator, tmp_path: Path
) -> None:
    await create(emulator, ["lim-1", "lim-2", "lim-3", "lim-4"])
    envelopes = []
    for n in range(1, 5):  # one send per instance, a lockout's length apart, under the quota
        if n > 1:
            await asyncio.sleep(1.1)
        results = await send(emulator, tmp_path, f"lim{n}", [f"lim-{n}"], "approval")
        envelopes += list(read_envelopes(str(results)))
    await asyncio.sleep(1.1)
    emulator.log.status_counts.clear()
    written: list[bytes] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        reader = InstanceReader(
            session, RateGate(None), target="api", base_url=emulator.base_url, account_id="acc"
        )
        summary = await verify_results(envelopes, reader, written.append)
    assert emulator.log.status_counts[429] >= 1  # four reads at once, three allowed
    assert summary.counts == {"consumed": 4}
    assert reader.gate.stats.pauses >= 1
    assert summary.requests == 4 + emulator.log.status_counts[429]


SENT = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def wait_step(end: str | None, **extra: Any) -> dict[str, Any]:
    step = {"type": "waitForEvent", "name": "w", "start": "2026-12-01T11:00:00.000Z",
            "end": end, "finished": end is not None}  # fmt: skip
    return step | extra


@pytest.mark.parametrize(
    ("result", "cls", "needle"),
    [
        # No event_type on the step (wrangler dev's explorer): its output's type decides.
        (
            {
                "status": "running",
                "steps": [wait_step("2026-12-01T12:00:01Z", output={"type": "e", "payload": 1})],
            },
            "consumed",
            "",
        ),
        (
            {
                "status": "running",
                "steps": [wait_step("2026-12-01T12:00:01Z", output={"type": "go", "payload": 1})],
            },
            "no_waiter",
            "no waitForEvent step waits for 'e'",
        ),
        # Finished after the send, and nothing names its type: never claimed as consumed.
        (
            {"status": "running", "steps": [wait_step("2026-12-01T12:00:01Z")]},
            "unknown",
            "cannot be told",
        ),
        # Unfinished and untyped: it may wait for ours.
        ({"status": "running", "steps": [wait_step(None, output=None)]}, "waiting", "not finished"),
        # A wait that timed out got no event, though it ended after the send.
        (
            {
                "status": "errored",
                "end": "2026-12-01T12:00:05Z",
                "steps": [wait_step("2026-12-01T12:00:05Z", error={"name": "Timeout"})],
            },
            "ended",
            "after our send",
        ),
        # The one wait of this type finished long before the send.
        (
            {"status": "running", "steps": [wait_step("2026-12-01T11:00:00Z", event_type="e")]},
            "no_waiter",
            "before our send",
        ),
        ({"status": "running"}, "unknown", "steps"),
    ],
)
def test_classify_edges(result: dict[str, Any], cls: str, needle: str) -> None:
    verdict = classify(result, "e", SENT)
    assert verdict.cls == cls
    assert needle in verdict.reason
    if cls in {"consumed", "waiting"}:
        assert verdict.typed is False


def test_wrangler_dev_reads_the_local_explorer() -> None:
    reader = InstanceReader(
        None,  # type: ignore[arg-type]  # url() needs no session
        RateGate(None),
        target="wrangler-dev",
        base_url="http://127.0.0.1:8787/",
        account_id=None,
    )
    assert reader.url("wf", "a b") == (
        "http://127.0.0.1:8787/cdn-cgi/local/explorer/api/workflows/wf/instances/a%20b"
    )


# -- send --verify -------------------------------------------------------------------------


async def create_with(emu: Emulator, items: list[dict[str, Any]]) -> None:
    url = f"{emu.base_url}/accounts/acc/workflows/wf/instances/batch"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as s, s.post(url, json=items) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=WAITS)], indirect=True)
async def test_send_verify_prints_verify_summary_and_exit_0_when_all_consumed(
    emulator: Emulator, tmp_path: Path
) -> None:
    ids = [f"sv-{n}" for n in range(10)]
    await create(emulator, ids)
    id_file = tmp_path / "ids.txt"
    id_file.write_text("".join(f"{i}\n" for i in ids))
    results = tmp_path / "sv.jsonl"
    code, out, err = await cli(
        emulator, "send", str(id_file), "--workflow", "wf", "--event-type", "approval",
        "--rate", "unlimited", "--results", str(results), "--verify",
    )  # fmt: skip
    assert code == 0, err
    assert "dispatcher send --verify: 10 record(s), 10 confirmed, on 10 instance(s)" in err
    assert verify_table(err)["consumed"] == 10
    assert verify_table(err)["total"] == 10
    got = lines(tmp_path / "sv.verify.jsonl")
    assert {g["class"] for g in got} == {"consumed"}
    assert {g["instance_id"] for g in got} == set(ids)
    assert TOKEN not in out + err


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, instances=WAITS)], indirect=True)
async def test_send_verify_exit_1_when_some_instance_waits_for_another_type(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Every event is confirmed (send alone exits 0), but 3 instances wait for another type."""
    items: list[dict[str, Any]] = [{"instance_id": f"mix-{n}"} for n in range(7)]
    items += [{"instance_id": f"other-{n}", "params": {"wait_for": "refund"}} for n in range(3)]
    await create_with(emulator, items)
    id_file = tmp_path / "ids.txt"
    id_file.write_text("".join(f"{i['instance_id']}\n" for i in items))
    results = tmp_path / "mix.jsonl"
    args = ["send", str(id_file), "--workflow", "wf", "--event-type", "approval",
            "--rate", "unlimited", "--results", str(results)]  # fmt: skip
    code, _, err = await cli(emulator, *args, "--verify", "--wait-up-to", "0s")
    assert code == 1, err
    assert "confirmed: 10" in err  # the API confirmed all ten: send alone would exit 0
    rows = verify_table(err)
    assert rows["consumed"] == 7
    assert rows["no_waiter"] == 3
    by_id = {g["instance_id"]: g for g in lines(tmp_path / "mix.verify.jsonl")}
    assert all("'refund'" in by_id[f"other-{n}"]["reason"] for n in range(3))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--verify", "--target", "relay", "--base-url", "http://127.0.0.1:9", "SECRET"], "relay"),
        (["--verify", "--wait-up-to", "soon"], "--wait-up-to"),
        (["--wait-up-to", "5m"], "--wait-up-to: only with --verify"),
    ],
)
async def test_send_verify_mistakes_exit_2_in_one_line_before_sending(
    emulator: Emulator, tmp_path: Path, extra: list[str], needle: str
) -> None:
    id_file = tmp_path / "ids.txt"
    id_file.write_text("one\n")
    secret = tmp_path / "relay-secret"
    secret.write_text("relay-secret-value\n")
    if "SECRET" in extra:  # the relay's secret is there, so --verify is what is refused
        extra = [*extra[:-1], "--relay-secret-file", str(secret)]
    code, _, err = await cli(
        emulator, "send", str(id_file), "--workflow", "wf", "--event-type", "approval",
        "--results", str(tmp_path / "r.jsonl"), *extra,
    )  # fmt: skip
    assert code == 2, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert emulator.log.total_accepted() == 0
