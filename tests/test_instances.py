"""The emulator's opt-in instance mode, as a client sees it over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dispatcher.emulator import Emulator, EmulatorConfig, InstanceModel

AUTH = {"Authorization": "Bearer tok"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def emu(clock: Clock) -> AsyncIterator[Emulator]:
    model = InstanceModel(event_type="approval", timeout=60.0, wait_after=5.0, steps=(2.0, 3.0))
    async with Emulator(EmulatorConfig(limit=None, instances=model), clock=clock) as e:
        yield e


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        yield s


def url(emu: Emulator, tail: str = "") -> str:
    return f"{emu.base_url}/accounts/acc/workflows/wf/instances{tail}"


async def call(
    session: aiohttp.ClientSession, method: str, target: str, **kw: Any
) -> tuple[int, Any]:
    async with session.request(method, target, **kw) as resp:
        return resp.status, await resp.json()


async def test_batch_create_then_list_by_cursor(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    body = [{"instance_id": f"i-{n:03d}", "params": {"n": n}} for n in range(100)]
    status, doc = await call(session, "POST", url(emu, "/batch"), json=body)
    assert status == 200
    assert doc["success"] is True
    assert [r["id"] for r in doc["result"]] == [f"i-{n:03d}" for n in range(100)]
    ids: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"per_page": "30", "direction": "asc"}
        if cursor:
            params["cursor"] = cursor
        status, doc = await call(session, "GET", url(emu), params=params)
        assert status == 200
        pages += 1
        ids += [item["id"] for item in doc["result"]]
        assert set(doc["result"][0]) >= {"id", "status", "created_on", "ended_on"}
        cursor = doc["result_info"].get("cursor")
        if not cursor:
            break
    assert pages == 4
    assert ids == [f"i-{n:03d}" for n in range(100)]
    assert emu.log.creations[("wf", "i-042")] == 1


async def test_batch_limits_and_existing_ids(emu: Emulator, session: aiohttp.ClientSession) -> None:
    too_many = [{"instance_id": f"x{n}"} for n in range(101)]
    status, doc = await call(session, "POST", url(emu, "/batch"), json=too_many)
    assert status == 400
    assert doc["success"] is False
    assert (await call(session, "POST", url(emu), json={"instance_id": "a"}))[0] == 200
    status, doc = await call(
        session, "POST", url(emu, "/batch"), json=[{"instance_id": "b"}, {"instance_id": "a"}]
    )
    assert status == 409
    assert doc["errors"][0]["code"] == 10405
    assert ("wf", "b") not in emu.log.creations  # a refused batch creates none of its ids
    status, doc = await call(session, "GET", url(emu, "/nope"))
    assert status == 404
    assert doc["errors"][0]["code"] == 10400


async def test_get_with_steps_and_event_kept_until_wait(
    emu: Emulator, session: aiohttp.ClientSession, clock: Clock
) -> None:
    await call(session, "POST", url(emu), json={"instance_id": "early"})
    await call(session, "POST", url(emu), json={"instance_id": "late"})
    # Before the wait starts: an event for "early" is accepted and kept.
    status, _ = await call(session, "POST", url(emu, "/early/events/approval"), json={})
    assert status == 200
    _, doc = await call(session, "GET", url(emu, "/early"))
    assert doc["result"]["status"] == "running"
    assert doc["result"]["steps"] == []
    clock.t += 5.0  # both wait now; "early" consumes its kept event as the wait starts
    _, doc = await call(session, "GET", url(emu, "/early"))
    wait = doc["result"]["steps"][0]
    assert wait["type"] == "waitForEvent"
    assert wait["event_type"] == "approval"
    assert wait["finished"] is True
    assert wait["end"] == wait["start"]
    _, doc = await call(session, "GET", url(emu, "/late"))
    wait = doc["result"]["steps"][0]
    assert wait["finished"] is False
    assert wait["end"] is None
    assert doc["result"]["status"] == "running"
    _, doc = await call(session, "GET", url(emu, "/late"), params={"simple": "true"})
    assert "steps" not in doc["result"]
    clock.t += 5.0
    _, doc = await call(session, "GET", url(emu, "/early"))
    assert doc["result"]["status"] == "complete"
    assert [s["name"] for s in doc["result"]["steps"]] == ["approval", "step-1", "step-2"]
    # Status filter: one complete, one still running (parked in its wait).
    _, doc = await call(session, "GET", url(emu), params={"status": "complete"})
    assert [i["id"] for i in doc["result"]] == ["early"]
    _, doc = await call(session, "GET", url(emu), params={"status": "running"})
    assert [i["id"] for i in doc["result"]] == ["late"]
    clock.t += 60.0  # the wait times out
    _, doc = await call(session, "GET", url(emu, "/late"))
    assert doc["result"]["status"] == "errored"
    assert doc["result"]["error"]["name"] == "WorkflowTimeoutError"


async def test_event_to_unknown_instance_is_10400(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    status, doc = await call(session, "POST", url(emu, "/ghost/events/approval"), json={})
    assert status == 404
    assert doc["errors"][0]["code"] == 10400


async def test_error_share_is_reproducible(clock: Clock) -> None:
    model = InstanceModel(event_type="go", error_share=0.5, steps=(1.0,))
    config = EmulatorConfig(limit=None, instances=model)
    async with Emulator(config, clock=clock) as emu, aiohttp.ClientSession(headers=AUTH) as s:
        body = [{"instance_id": f"e{n}"} for n in range(40)]
        await call(s, "POST", url(emu, "/batch"), json=body)
        for n in range(40):
            await call(s, "POST", url(emu, f"/e{n}/events/go"))
        clock.t += 2
        _, doc = await call(s, "GET", url(emu), params={"status": "errored", "per_page": "100"})
        assert 5 < len(doc["result"]) < 35


def test_emulate_flags_turn_the_instance_mode_on() -> None:
    from dispatcher.commands.cli import build_parser
    from dispatcher.emulator.cli import build_config

    parser = build_parser("emulate").commands["emulate"]
    assert build_config(parser.parse_args([])).instances is None  # event-only by default
    args = parser.parse_args(
        ["--instances", "approval", "--wait-timeout", "5m", "--steps", "1s,500ms",
         "--error-share", "5%"]
    )  # fmt: skip
    model = build_config(args).instances
    assert model == InstanceModel(
        event_type="approval", timeout=300.0, steps=(1.0, 0.5), error_share=0.05
    )
