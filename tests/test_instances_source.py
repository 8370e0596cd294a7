"""`send --instances-of` and `instances list` against the emulator in instance mode.

250 instances of one workflow (more than two pages of 100): 100 parked in
waitForEvent("approval"), 60 parked in waitForEvent("other"), 90 complete. The CLI runs
as a subprocess, the emulator in the test's loop with a clock the test moves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from dispatcher.emulator import Emulator, EmulatorConfig, InstanceModel
from dispatcher.run.instances import verdict

TOKEN = "tok-instances-SECRET-5b7d20c4"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAITING = [f"a-{n:03d}" for n in range(100)]
OTHER = [f"o-{n:03d}" for n in range(60)]
DONE = [f"c-{n:03d}" for n in range(90)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    clock = Clock()
    model = InstanceModel(event_type="approval", timeout=3600.0, steps=(1.0,))
    config = EmulatorConfig(tokens=(TOKEN,), limit=None, instances=model)
    async with Emulator(config, clock=clock) as e, aiohttp.ClientSession(headers=AUTH) as s:
        base = f"{e.base_url}/accounts/acc/workflows/wf/instances"
        # Interleaved, so that every page holds some of each kind.
        items: list[dict[str, Any]] = []
        for n in range(100):
            items.append({"instance_id": WAITING[n]})
            if n < 60:
                items.append({"instance_id": OTHER[n], "params": {"wait_for": "other"}})
            if n < 90:
                items.append({"instance_id": DONE[n]})
        for start in range(0, len(items), 100):
            async with s.post(f"{base}/batch", json=items[start : start + 100]) as resp:
                assert resp.status == 200
        for iid in DONE:
            async with s.post(f"{base}/{iid}/events/approval", json={}) as resp:
                assert resp.status == 200
        clock.t += 5.0  # the DONE ones finish their step and complete
        yield e


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


async def cli(args: list[str], emu: Emulator) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", *args], env=env_for(emu), check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def sent_to(emu: Emulator, event_type: str = "approval") -> dict[str, int]:
    """Instance id -> events of ``event_type`` the emulator took, but the test's own."""
    out: dict[str, int] = {}
    for (_wf, iid, et, _sha), times in emu.log.accepted.items():
        if et == event_type and not iid.startswith("c-"):
            out[iid] = out.get(iid, 0) + len(times)
    return out


def envelopes(path: Path) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().splitlines():
        env = orjson.loads(line)
        last[env["instance_id"]] = env
    return last


SEND = ["send", "--instances-of", "wf", "--event-type", "approval", "--rate", "unlimited"]


async def test_waiting_for_reaches_exactly_the_waiting_ones(emu: Emulator, tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    code, _, err = await cli([*SEND, "--waiting-for", "approval", "--results", str(results)], emu)
    assert code == 0, err
    assert sent_to(emu) == dict.fromkeys(WAITING, 1)
    assert not [k for k in emu.log.accepted if k[2] != "approval"]
    envs = envelopes(results)
    assert len(envs) == 250
    assert {i for i, e in envs.items() if e["delivery"] == "confirmed"} == set(WAITING)
    for iid in OTHER:
        error = envs[iid]["error"]
        assert envs[iid]["delivery"] == "not_sent"
        assert error["kind"] == "skipped"
        assert "[not_waiting]" in error["message"]
        assert "waits for 'other', not 'approval'" in error["message"]
    for iid in DONE:
        assert envs[iid]["error"]["kind"] == "skipped"
        assert "[ended]" in envs[iid]["error"]["message"]
        assert "complete" in envs[iid]["error"]["message"]
    # 3 pages of 100, and one step read per instance not listed as ended (160).
    assert "250 instances listed: 3 list requests, 160 step reads" in err
    assert "100 confirmed, 0 failed, 0 unknown, 150 skipped: not waiting" in err

    # A rerun with --resume sends nothing twice and reads no confirmed instance again.
    before = len(emu.log.requests)
    code, _, err = await cli(
        [*SEND, "--waiting-for", "approval", "--results", str(results), "--resume"], emu
    )
    assert code == 0, err
    assert sent_to(emu) == dict.fromkeys(WAITING, 1)
    reads = [r for r in emu.log.requests[before:] if r.instance_id is not None]
    assert not [r for r in reads if r.instance_id in WAITING]
    assert "skipped    100 already confirmed" in err
    # A dry run of the resume reads neither: 60 reads (the ones waiting for "other").
    code, out, err = await cli(
        [*SEND, "--waiting-for", "approval", "--results", str(results), "--resume", "--dry-run"],
        emu,
    )
    assert code == 0, err
    assert "160 instances' steps read" not in out
    assert "250 listed by 3 list requests, 60 instances' steps read" in out
    assert "skipped    100 confirmed" in out
    assert "to send    0 events" in out


async def test_without_waiting_for_every_listed_instance_gets_the_event(
    emu: Emulator, tmp_path: Path
) -> None:
    results = tmp_path / "r.jsonl"
    code, _, err = await cli([*SEND, "--status", "running", "--results", str(results)], emu)
    assert code == 0, err
    # The status filter is the API's: the complete ones are not listed at all.
    assert set(sent_to(emu)) == set(WAITING) | set(OTHER)
    assert "list requests, 0 step reads" in err


async def test_dry_run_counts_and_costs_without_sending(emu: Emulator, tmp_path: Path) -> None:
    code, out, err = await cli(
        [*SEND, "--waiting-for", "approval", "--dry-run", "--results", str(tmp_path / "r")], emu
    )
    assert code == 0, err
    assert emu.log.total_accepted() == len(DONE)  # only the test's own events
    assert "250 listed by 3 list requests, 160 instances' steps read" in out
    assert "to send    100 events of type 'approval'" in out
    assert "skipped    90 ended" in out
    assert "skipped    60 not_waiting" in out
    assert "3 list + 160 step reads + 100 sends = 263 requests" in out
    code, out, _ = await cli(
        ["send", "--instances-of", "wf", "--event-type", "approval", "--waiting-for",
         "approval", "--dry-run", "--rate", "6000/m"],
        emu,
    )  # fmt: skip
    assert code == 0
    # The dry run's own GETs go at --rate too (163 at 100/s here); at 1200/5m the real
    # run would take 263 / 4 s, about 1m06s.
    assert "about 2.6s for 263 requests at 6000/m" in out


async def test_instances_list_writes_the_ids_file_send_reads(emu: Emulator, tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    args = ["instances", "list", "--workflow", "wf", "--waiting-for", "approval"]
    code, _, err = await cli([*args, "--out", str(ids), "--rate", "unlimited"], emu)
    assert code == 0, err
    lines = ids.read_text().splitlines()
    assert lines[0].startswith("#")
    assert sorted(lines[1:]) == WAITING
    assert "100 of 250 listed instances selected" in err
    assert "3 list requests, 160 step reads" in err
    assert emu.log.total_accepted() == len(DONE)
    results = tmp_path / "r.jsonl"
    code, _, err = await cli(
        ["send", str(ids), "--workflow", "wf", "--event-type", "approval", "--rate",
         "unlimited", "--results", str(results)],
        emu,
    )  # fmt: skip
    assert code == 0, err
    assert sent_to(emu) == dict.fromkeys(WAITING, 1)
    # Same keys as --instances-of: resuming from the listing sends nothing again.
    code, _, err = await cli(
        [*SEND, "--waiting-for", "approval", "--results", str(results), "--resume"], emu
    )
    assert code == 0, err
    assert sent_to(emu) == dict.fromkeys(WAITING, 1)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["send", "ids.txt", "--instances-of", "wf", "--event-type", "e"], "--instances-of"),
        (["send", "ids.txt", "--workflow", "wf", "--waiting-for", "e"], "--waiting-for"),
        (["send", "--instances-of", "wf"], "--event-type"),
        (["send", "--instances-of", "wf", "--event-type", "e", "--status", "nap"], "--status"),
        (["send", "--instances-of", "nope", "--event-type", "e"], "--instances-of"),
        (["send", "--event-type", "e", "--workflow", "wf"], "INPUT"),
    ],
)
async def test_mistakes_are_one_line_naming_the_flag(
    emu: Emulator, tmp_path: Path, args: list[str], flag: str
) -> None:
    (tmp_path / "ids.txt").write_text("a-000\n")
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", *args, "--results", str(tmp_path / "r.jsonl")],
        env=env_for(emu),
        cwd=tmp_path,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err
    assert "Traceback" not in err
    assert emu.log.total_accepted() == len(DONE)


async def test_relay_refuses_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env["DISPATCHER_RELAY_SECRET"] = "relay-secret-0123456789"
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", "send", "--instances-of", "wf", "--event-type",
         "e", "--target", "relay", "--base-url", "http://127.0.0.1:9"],
        env=env,
        check=False,
    )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2
    assert len(err.strip().splitlines()) == 1
    assert "cannot list instances" in err


def test_verdict_reads_the_steps() -> None:
    wait = {"type": "waitForEvent", "event_type": "approval", "finished": False}
    assert verdict("running", [wait], "approval").send
    assert not verdict("running", [{**wait, "finished": True}], "approval").send
    other = verdict("running", [{**wait, "event_type": "x"}], "approval")
    assert other.rule == "not_waiting"
    assert other.reason == "waits for 'x', not 'approval'"
    assert verdict("running", [], "approval").rule == "not_waiting"
    assert verdict("errored", [wait], "approval").rule == "ended"


async def test_sending_starts_with_the_first_page(emu: Emulator, tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    code, _, err = await cli([*SEND, "--waiting-for", "approval", "--results", str(results)], emu)
    assert code == 0, err
    log = emu.log.requests
    lists = [n for n, r in enumerate(log) if r.instance_id is None and r.workflow == "wf"]
    events = [
        n for n, r in enumerate(log) if r.event_type == "approval" and r.instance_id in WAITING
    ]
    assert len(lists) >= 3
    assert events[0] < lists[-1]  # an event left before the last page was read


class LocalExplorer:
    """wrangler dev's local explorer API, as far as the listing uses it: list with
    page/per_page (no cursor), get with steps, events; no auth, no /accounts/{id}."""

    def __init__(
        self, waiting: int, other: int, refuse: int = 0, broken_page: int | None = None
    ) -> None:
        self.refuse = refuse  # answer this many list calls 429 first
        self.broken_page = broken_page  # a page answered 500 every time
        self.items = [(f"w{n}", "approval") for n in range(waiting)]
        self.items += [(f"x{n}", "other") for n in range(other)]
        self.events: list[str] = []
        self.pages: list[str] = []

    def app(self) -> Any:
        from aiohttp import web

        root = "/cdn-cgi/local/explorer/api/workflows/wf/instances"

        async def listing(request: web.Request) -> web.Response:
            assert "cursor" not in request.query
            self.pages.append(request.query["page"])
            if self.broken_page is not None and int(request.query["page"]) == self.broken_page:
                return web.json_response({"success": False, "errors": []}, status=500)
            if self.refuse:
                self.refuse -= 1
                return web.json_response(
                    {"success": False, "errors": [{"code": 971, "message": "slow down"}]},
                    status=429,
                    headers={"Retry-After": "0"},
                )
            page, per = int(request.query["page"]), int(request.query["per_page"])
            rows = self.items[(page - 1) * per : page * per]
            doc = {
                "success": True, "errors": [], "messages": [],
                "result": [{"id": iid, "status": "running"} for iid, _ in rows],
                "result_info": {"page": page, "per_page": per, "count": len(rows),
                                "total_count": len(self.items)},
            }  # fmt: skip
            return web.json_response(doc)

        async def get(request: web.Request) -> web.Response:
            kind = dict(self.items)[request.match_info["id"]]
            step = {"type": "waitForEvent", "name": kind, "event_type": kind, "finished": False}
            result = {"status": "running", "steps": [step]}
            return web.json_response({"success": True, "errors": [], "result": result})

        async def event(request: web.Request) -> web.Response:
            self.events.append(request.match_info["id"])
            return web.json_response({"success": True, "errors": [], "result": None})

        app = web.Application()
        app.router.add_get(root, listing)
        app.router.add_get(root + "/{id}", get)
        app.router.add_post(root + "/{id}/events/{type}", event)
        return app


async def test_wrangler_dev_pages_by_page_number(tmp_path: Path) -> None:
    from aiohttp import web

    fake = LocalExplorer(waiting=130, other=40)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
        result = await anyio.run_process(
            [sys.executable, "-m", "dispatcher", *SEND, "--waiting-for", "approval",
             "--target", "wrangler-dev", "--base-url", f"http://127.0.0.1:{port}",
             "--results", str(tmp_path / "r.jsonl")],
            env=env,
            check=False,
        )  # fmt: skip
    finally:
        await runner.cleanup()
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert fake.pages == ["1", "2"]
    assert sorted(fake.events) == sorted(f"w{n}" for n in range(130))
    assert "170 instances listed: 2 list requests, 170 step reads" in err


async def test_every_get_passes_the_runs_gate(emu: Emulator) -> None:
    """The listing's GETs acquire the same gate the sends do: one budget."""
    from dispatcher.run.instances import InstanceReader, Selection, select
    from dispatcher.sending.gate import RateGate
    from dispatcher.sending.stats import RunStats

    gate = RateGate(None)
    stats = RunStats()
    reader = InstanceReader(
        target="api", base_url=emu.base_url, account_id="acc", headers=AUTH, gate=gate,
        stats=stats,
    )  # fmt: skip
    selected: list[str] = []
    async with reader:
        async for page in select(reader, Selection(workflow="wf", waiting_for="approval")):
            selected += [iid for iid, _, v in page if v.send]
    assert sorted(selected) == WAITING
    assert (stats.list_requests, stats.read_requests) == (3, 160)
    assert gate.stats.acquired == 163


async def test_a_429_on_a_page_pauses_the_gate_and_reads_it_again() -> None:
    from aiohttp import web

    from dispatcher.run.instances import InstanceReader, Selection, select
    from dispatcher.sending.gate import RateGate
    from dispatcher.sending.stats import RunStats

    fake = LocalExplorer(waiting=3, other=2, refuse=1)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    gate = RateGate(None)
    stats = RunStats()
    reader = InstanceReader(
        target="wrangler-dev", base_url=f"http://127.0.0.1:{port}", account_id=None,
        headers={}, gate=gate, stats=stats,
    )  # fmt: skip
    try:
        async with reader:
            pages = [
                page
                async for page in select(reader, Selection(workflow="wf", waiting_for="approval"))
            ]
    finally:
        await runner.cleanup()
    assert [iid for page in pages for iid, _, v in page if v.send] == ["w0", "w1", "w2"]
    assert gate.stats.pauses == 1  # the whole run waits, as for a 429 on a send
    assert gate.stats.paused_s >= 1.0
    assert fake.pages == ["1", "1"]


async def test_interrupted_then_resumed_sends_once_to_each(emu: Emulator, tmp_path: Path) -> None:
    import signal

    results = tmp_path / "r.jsonl"
    args = [*SEND[:-1], "40/s", "--waiting-for", "approval", "--results", str(results)]
    async with await anyio.open_process(
        [sys.executable, "-m", "dispatcher", *args], env=env_for(emu)
    ) as proc:
        with anyio.fail_after(20):
            # Stopped mid-run: pages, reads and sends left (the log has no event to wait on).
            while len(sent_to(emu)) < 10:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        await proc.wait()
    assert proc.returncode == 130
    first = sent_to(emu)
    assert 10 <= len(first) < len(WAITING)
    code, _, err = await cli(
        [*SEND, "--waiting-for", "approval", "--results", str(results), "--resume"], emu
    )
    assert code == 0, err
    assert sent_to(emu) == dict.fromkeys(WAITING, 1)
    envs = envelopes(results)
    assert {i for i, e in envs.items() if e["delivery"] == "confirmed"} == set(WAITING)


async def test_a_later_page_that_fails_stops_the_run_for_resume(tmp_path: Path) -> None:
    from aiohttp import web

    fake = LocalExplorer(waiting=150, other=0, broken_page=2)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    results = tmp_path / "r.jsonl"
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
        result = await anyio.run_process(
            [sys.executable, "-m", "dispatcher", *SEND, "--waiting-for", "approval",
             "--target", "wrangler-dev", "--base-url", f"http://127.0.0.1:{port}",
             "--max-attempts", "2", "--results", str(results)],
            env=env,
            check=False,
        )  # fmt: skip
    finally:
        await runner.cleanup()
    err = result.stderr.decode()
    assert result.returncode == 3, err
    assert "listing 'wf' failed on page 2 (HTTP 500" in err
    assert "--resume" in err
    assert "Traceback" not in err
    assert sorted(fake.events) == sorted(f"w{n}" for n in range(100))  # page 1's, once
    assert len(envelopes(results)) == 100


def test_a_wait_that_names_no_type_may_be_the_one() -> None:
    """wrangler dev's explorer gives waitForEvent steps without event_type: an unfinished
    one is sent to; a finished one is told apart by the type of the event it returned."""
    open_wait = {"type": "waitForEvent", "name": "wait for go-1", "finished": False}
    assert verdict("running", [open_wait], "go").send
    took_other = dict(open_wait, finished=True, end="2026-12-07T15:50:52.480Z",
                      output={"type": "stop", "payload": {}})  # fmt: skip
    v = verdict("running", [took_other], "go")
    assert not v.send
    assert v.rule == "not_waiting"
