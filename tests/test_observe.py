"""`load --observe` (issue 26): reaction latency read from the instances' steps.

The emulator models the reaction: a wait consumes its event a drawn delay after it was
accepted. The load runs as a user runs it (a subprocess) against the in-process emulator.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from factories import make_envelope

from dispatcher.commands.cli import main
from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.emulator.instances import InstanceModel
from dispatcher.emulator.reaction import Spread, unit_draw
from dispatcher.report.observed import (
    ObservedRow,
    ObserveHeader,
    knee,
    read_sidecar,
    sidecar_path,
    summarize,
)
from dispatcher.run.observe import ClockOffset, Observer, ObserveSettings, parse_iso

TOKEN = "tok-observe-SECRET-7f31"


# --- pure parts ---------------------------------------------------------------------------


def test_spread_parses_uniform_normal_and_fixed() -> None:
    uniform = Spread.parse("200ms±50ms")
    assert (uniform.mean, uniform.spread, uniform.distribution) == (0.2, 0.05, "uniform")
    assert Spread.parse("200ms+-50ms") == uniform
    assert uniform.draw(0.5) == pytest.approx(0.2)
    assert uniform.draw(1e-12) == pytest.approx(0.15)
    normal = Spread.parse("1s~100ms")
    assert normal.distribution == "normal"
    assert normal.draw(0.8413447) == pytest.approx(1.1, abs=1e-4)  # +1 sigma
    assert Spread.parse("300ms").draw(0.1) == pytest.approx(0.3)


@pytest.mark.parametrize("text", ["fast", "200ms±", "100ms±200ms", "200ms±x"])
def test_bad_spread_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"delay|not a duration|exceed"):
        Spread.parse(text)


def test_clock_offset_from_date_headers_contains_the_truth() -> None:
    # A server 3.25 s ahead, answering in 20 ms; reads every 70 ms over 6 s.
    truth = 3.25
    off = ClockOffset()
    t = 1_000_000.0
    for _ in range(90):
        server = t + 0.01 + truth
        stamp = email_date(int(server))
        off.add(t, t + 0.02, stamp)
        t += 0.07
    offset, bound, how = off.estimate()
    assert offset is not None
    assert bound is not None
    assert abs(offset - truth) <= bound
    assert bound < 0.1, bound  # far narrower than the header's 1-s resolution
    assert "90 reads" in how


def email_date(epoch: int) -> str:
    import email.utils

    return email.utils.formatdate(epoch, usegmt=True)


def test_no_date_header_says_so() -> None:
    off = ClockOffset()
    off.add(1.0, 1.1, None)
    assert off.estimate() == (None, None, "no Date header in the reads")


def test_summary_classifies_each_observation() -> None:
    header = ObserveHeader(
        source="s", offset_s=1.0, bound_s=0.01, offset_how="h", reaction_timeout=2.0,
        sample=1.0, budget=10.0,
    )  # fmt: skip
    rows = [
        # server clock 1 s ahead: a wait end 1.3 s after acceptance on its clock is 300 ms
        ObservedRow(key="a", instance_id="a", sent=99.9, accepted=100.0, wait_end=101.3,
                    read_ok=True, next_end=101.5, instance_end=101.5),
        ObservedRow(key="b", instance_id="b", sent=99.9, accepted=100.0, read_ok=True,
                    settled=True),
        # read, not consumed yet, and the run stopped before its timeout: cannot tell
        ObservedRow(key="f", instance_id="f", sent=99.9, accepted=100.0, read_ok=True),
        ObservedRow(key="c", instance_id="c", sent=99.9, accepted=100.0, wait_end=104.0,
                    read_ok=True),  # consumed 3 s later: past the 2-s timeout
        ObservedRow(key="d", instance_id="d", sent=99.9, accepted=100.0, wait_end=95.0,
                    read_ok=True),  # ended before it was sent: took another event
        ObservedRow(key="e", instance_id="e", sent=99.9, accepted=100.0),
    ]  # fmt: skip
    s = summarize(header, rows)
    assert s.counts == {"reacted": 1, "unreacted": 2, "stale": 1, "unread": 2}
    assert s.reaction.p50_ms == pytest.approx(300, abs=1)
    assert s.next_step.p50_ms == pytest.approx(500, abs=1)
    assert s.metrics()["unreacted"] == pytest.approx(2 / 3)


def test_knee_is_where_reaction_starts_to_climb() -> None:
    arrivals: list[float] = []
    reactions: list[tuple[float, float]] = []
    for sec in range(20):  # the rate climbs 10/s per second; reaction flat up to 100/s
        rate = 10 * (sec + 1)
        for k in range(rate):
            t = sec + k / rate
            arrivals.append(t)
            reactions.append((t, 200.0 if rate <= 100 else 200.0 + 40 * (rate - 100)))
    found, curve = knee(arrivals, reactions, 1.0)
    assert found == pytest.approx(110)
    assert len(curve) == 20
    flat, _ = knee(arrivals, [(t, 200.0) for t, _ in reactions], 1.0)
    assert flat is None
    # A constant rate whose reaction climbs over time is no knee of the rate.
    steady = [k / 50 for k in range(1000)]
    climbing = [(t, 200.0 + 50 * t) for t in steady]
    assert knee(steady, climbing, 1.0)[0] is None


def test_the_sample_is_every_kth_first_event_of_an_instance() -> None:
    settings = ObserveSettings(
        target="api", base_url="http://127.0.0.1:9", account_id="acc", workflow="wf",
        event_type="approval", headers={}, budget=10.0, sample=0.25,
    )  # fmt: skip
    observer = Observer(settings)
    t0 = datetime(2026, 12, 7, tzinfo=UTC)
    for k in range(40):
        observer.offer(make_envelope(f"k{k}", t0, instance_id=f"i{k % 20}"))
    observer.offer(make_envelope("bad", t0, instance_id="i99", ok=False, status=500))
    # 20 instances' first events, every 4th of them; the second round are repeats.
    assert [r.instance_id for r in observer.rows] == ["i3", "i7", "i11", "i15", "i19"]
    assert observer.skipped_repeats == 20


def test_a_budget_far_below_the_sample_is_warned_of() -> None:
    from dispatcher.commands.load import observe_note
    from dispatcher.run.loadtest import LoadProfile, LoadSettings

    load = LoadSettings(
        workflow="wf", event_type="e", instances=tuple(f"i{k}" for k in range(3000)),
        profile=LoadProfile.constant(50, 60), target="wrangler-dev",
        base_url="http://127.0.0.1:9",
    )  # fmt: skip

    def observe(budget: float, sample: float = 1.0) -> ObserveSettings:
        return ObserveSettings(
            target="wrangler-dev", base_url="http://127.0.0.1:9", account_id=None,
            workflow="wf", event_type="e", headers={}, budget=budget, sample=sample,
        )  # fmt: skip

    note = observe_note(load, observe(10.0))  # 3000 events at 10/s: 300 s > 60 + 30
    assert note is not None
    assert "takes 300 s or more; --observe-sample 20%" in note
    assert observe_note(load, observe(10.0, sample=0.2)) is None
    assert observe_note(load, observe(60.0)) is None


def test_parse_iso() -> None:
    assert parse_iso("1970-01-01T00:00:01.500Z") == 1.5
    assert parse_iso("soon") is None
    assert parse_iso(None) is None


# --- the emulator's model --------------------------------------------------------------------


async def test_emulator_wait_ends_after_the_drawn_reaction() -> None:
    now = [1000.0]
    model = InstanceModel(
        event_type="go", reaction=Spread.parse("200ms±50ms"), steps=(1.0,), step_jitter=0.1
    )
    config = EmulatorConfig(limit=None, instances=model, seed=7)
    async with Emulator(config, clock=lambda: now[0]) as emu, session() as http:
        url = f"{emu.base_url}/accounts/acc/workflows/wf/instances"
        async with http.post(url, json={"instance_id": "x"}) as resp:
            assert resp.status == 200
        async with http.post(f"{url}/x/events/go") as resp:
            assert resp.status == 200
        delay = 0.2 + (2 * unit_draw(7, "x", "reaction") - 1) * 0.05
        step = 1.0 + (2 * unit_draw(7, "x", "step-0") - 1) * 0.1
        now[0] += delay - 0.01
        doc = await get_json(http, f"{url}/x")
        assert doc["result"]["steps"][0]["finished"] is False  # not yet consumed
        now[0] += 0.02 + step
        doc = await get_json(http, f"{url}/x")
    wait, do = doc["result"]["steps"]
    start, end = parse_iso(wait["start"]), parse_iso(wait["end"])
    assert start is not None
    assert end is not None
    assert end - start == pytest.approx(delay, abs=0.002)  # ms resolution
    assert parse_iso(wait["output"]["timestamp"]) == pytest.approx(start, abs=0.002)
    do_end = parse_iso(do["end"])
    assert do_end is not None
    assert do_end - end == pytest.approx(step, abs=0.002)
    assert doc["result"]["status"] == "complete"


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as resp:
        doc = orjson.loads(await resp.read())
    assert isinstance(doc, dict)
    return doc


# --- the command, as a user runs it ------------------------------------------------------------


async def create(emu: Emulator, ids: list[str]) -> None:
    async with session() as http:
        url = f"{emu.base_url}/accounts/acc/workflows/wf/instances/batch"
        for at in range(0, len(ids), 100):
            body = [{"instance_id": i} for i in ids[at : at + 100]]
            async with http.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


async def run_cli(command: str, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", command, *args], env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def load_args(results: Path, count: int, *extra: str) -> list[str]:
    return [
        "--workflow", "wf", "--event-type", "evt",
        "--instance-prefix", "i", "--instance-count", str(count),
        "--rate", "50/s", "--duration", f"{count / 50:g}s",
        "--results", str(results), "--quiet", *extra,
    ]  # fmt: skip


def emulator(**model: object) -> Emulator:
    values: dict[str, object] = {"event_type": "evt", "reaction": Spread.parse("200ms±50ms")}
    values.update(model)
    return Emulator(EmulatorConfig(limit=None, instances=InstanceModel(**values)))  # type: ignore[arg-type]


async def test_observed_reaction_matches_the_configured_one(tmp_path: Path) -> None:
    """Configured: 200 ms ± 50 ms, uniform. Measured p50 must be within 10 % (20 ms).

    Why 10 % holds with room: the draws come from the seed and the ids, so the sample's
    median is fixed (about 200 ms for 150 instances: its spread is ~4 ms); the clock
    offset's bound from the Date headers is a few ms here (same host); and "accepted" is
    when our 2xx arrived, a millisecond or so after the emulator took the event. Each is
    far below 20 ms even on a loaded machine (late reads do not matter: the server's own
    step times are read, not the time of the read).
    """
    results = tmp_path / "load.jsonl"
    n = 150
    args = load_args(
        results, n, "--observe", "--observe-budget", "200/s", "--reaction-timeout", "5s",
        "--threshold", "reaction_p99<2s", "--threshold", "unreacted<0.1%",
        "--format", "json",
    )  # fmt: skip
    async with emulator(steps=(0.1,)) as emu:
        await create(emu, [f"i{k}" for k in range(n)])
        code, stdout, stderr = await run_cli("load", args, env_for(emu))
    assert code == 0, stderr
    doc = orjson.loads(stdout)
    obs = doc["observe"]
    assert obs["source"].startswith("steps read after the fact (source 2)")
    assert obs["offset_bound_ms"] is not None
    assert obs["counts"]["reacted"] == n
    p50 = obs["reaction_ms"]["p50"]
    assert 180 <= p50 <= 220, obs["reaction_ms"]
    # On the server's own clock (the event's timestamp to the wait's end): the same
    # delay, less the 2xx's way back, with no clock offset in it.
    assert obs["server_reaction_ms"]["p50"] == pytest.approx(p50, abs=20)
    # The uniform's top is 250 ms: the p99 sits near it, never far past it.
    assert 225 <= obs["reaction_ms"]["p99"] <= 275, obs["reaction_ms"]
    # The next step lasts 100 ms: its end comes that much after the reaction.
    assert obs["next_step_ms"]["p50"] == pytest.approx(p50 + 100, abs=15)
    # Accept latency stays what it was: milliseconds, beside the reaction.
    assert obs["accept_ms"]["p50"] == doc["latency_accepted_ms"]["p50"] < p50 / 4
    # The sidecar, read back by `report`, gives the same figures and judges thresholds.
    header, rows = read_sidecar(sidecar_path(str(results)))
    assert len(rows) == n
    assert header.reads >= n
    code, stdout, stderr = await run_cli(
        "report", [str(results), "--format", "json", "--threshold", "reaction_p50<100ms"], {}
    )
    assert code == 4, stderr
    assert "threshold breached: reaction_p50<100ms" in stderr
    assert orjson.loads(stdout)["observe"]["reaction_ms"]["p50"] == p50
    code, text, _ = await run_cli("report", [str(results)], {})
    assert code == 0
    assert "reaction   p50" in text
    assert "accept     p50" in text
    code, md, _ = await run_cli("report", [str(results), "--format", "markdown"], {})
    assert code == 0
    assert "\n\n## Workflow reaction (load --observe)\n" in md
    assert "| reaction |" in md


async def test_a_reaction_threshold_breach_exits_4(tmp_path: Path) -> None:
    results = tmp_path / "load.jsonl"
    plot = tmp_path / "load.png"
    args = load_args(
        results, 25, "--observe", "--observe-budget", "100/s", "--reaction-timeout", "3s",
        "--threshold", "reaction_p99<100ms", "--threshold", "p99<10s",
    )  # fmt: skip
    has_plot = importlib.util.find_spec("matplotlib") is not None
    if has_plot:
        args += ["--plot", str(plot)]
    async with emulator() as emu:
        await create(emu, [f"i{k}" for k in range(25)])
        code, stdout, stderr = await run_cli("load", args, env_for(emu))
    assert code == 4, stderr
    assert "threshold breached: reaction_p99<100ms: measured" in stderr
    assert "p99<10s" not in stderr
    assert "threshold  reaction_p99<100ms: BREACHED" in stdout
    assert "reaction   p50" in stdout
    if has_plot:
        assert plot.read_bytes().startswith(b"\x89PNG")


async def test_never_consumed_events_count_as_unreacted(tmp_path: Path) -> None:
    results = tmp_path / "load.jsonl"
    n = 60
    ids = [f"i{k}" for k in range(n)]
    never = sum(1 for i in ids if unit_draw(0, i, "never") < 0.25)
    assert 0 < never < n  # the seed picks some, not all
    args = load_args(
        results, n, "--observe", "--observe-budget", "100/s", "--reaction-timeout", "1s",
        "--format", "json", "--threshold", "unreacted<0.1%",
    )  # fmt: skip
    async with emulator(never_consume=0.25) as emu:
        await create(emu, ids)
        code, stdout, stderr = await run_cli("load", args, env_for(emu))
    assert code == 4, stderr
    assert "threshold breached: unreacted<0.1%" in stderr
    obs = orjson.loads(stdout)["observe"]
    assert obs["counts"]["unreacted"] == never
    assert obs["counts"]["reacted"] == n - never
    assert obs["unreacted"] == pytest.approx(never / n)


def posts(emu: Emulator) -> list[float]:
    # The event POSTs only: the log holds the creations and the reads as well.
    return sorted(r.t for r in emu.log.requests if r.event_type == "evt")


async def test_observing_does_not_change_the_send_schedule(tmp_path: Path) -> None:
    """The same profile with and without --observe: the same arrivals, none dropped, the
    same spacing of the events the emulator received (reads go on their own session)."""
    n = 100
    runs = {}
    for observe in (False, True):
        results = tmp_path / f"load-{observe}.jsonl"
        extra = ["--observe", "--observe-budget", "100%", "--reaction-timeout", "2s"]
        args = load_args(results, n, "--format", "json", *(extra if observe else []))
        async with emulator() as emu:
            await create(emu, [f"i{k}" for k in range(n)])
            code, stdout, stderr = await run_cli("load", args, env_for(emu))
            times = posts(emu)
        assert code == 0, stderr
        doc = orjson.loads(stdout)
        runs[observe] = (doc, times)
    (plain, t_plain), (watched, t_watched) = runs[False], runs[True]
    assert watched["observe"]["reads"] >= n  # it did observe
    assert "observe" not in plain
    for key in ("arrivals", "sent", "dropped"):
        assert plain["load"][key] == watched["load"][key], key
    assert plain["load"]["arrivals"] == n
    assert plain["load"]["dropped"] == 0
    assert len(t_plain) == len(t_watched) == n  # only the sends are event POSTs
    # 50/s: 20 ms apart. The median gap is robust to a stray scheduler hiccup.
    gap_plain = statistics.median(b - a for a, b in itertools.pairwise(t_plain))
    gap_watched = statistics.median(b - a for a, b in itertools.pairwise(t_watched))
    assert gap_plain == pytest.approx(0.02, rel=0.25)
    assert gap_watched == pytest.approx(0.02, rel=0.25)
    span_plain, span_watched = t_plain[-1] - t_plain[0], t_watched[-1] - t_watched[0]
    assert span_watched == pytest.approx(span_plain, abs=0.5)


# Bad --observe flags: tests/test_load.py's test_usage_errors_exit_2; the emulator's
# reaction flags: tests/test_emulator_cli.py's test_bad_flag_values_name_the_flag_and_exit_2.


async def test_emulator_capacity_queues_the_consumption() -> None:
    now = [50.0]
    model = InstanceModel(event_type="go", capacity=10.0)
    config = EmulatorConfig(limit=None, instances=model)
    async with Emulator(config, clock=lambda: now[0]) as emu, session() as http:
        url = f"{emu.base_url}/accounts/acc/workflows/wf/instances"
        body = [{"instance_id": f"q{k}"} for k in range(5)]
        async with http.post(f"{url}/batch", json=body) as resp:
            assert resp.status == 200
        for k in range(5):  # five at once, at 10/s: one each 100 ms
            async with http.post(f"{url}/q{k}/events/go") as resp:
                assert resp.status == 200
        now[0] += 1.0
        ends = []
        for k in range(5):
            doc = await get_json(http, f"{url}/q{k}")
            ends.append(parse_iso(doc["result"]["steps"][0]["end"]))
    first = ends[0]
    assert first is not None
    # Times print in whole ms (truncated): 2 ms of slack.
    assert [(e or 0) - first for e in ends] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=0.002)


async def test_a_ramp_past_the_capacity_marks_the_knee(tmp_path: Path) -> None:
    results = tmp_path / "load.jsonl"
    n = 130  # 5/s → 60/s over 4 s
    args = [
        "--workflow", "wf", "--event-type", "evt",
        "--instance-prefix", "i", "--instance-count", str(n),
        "--ramp", "5/s:60/s:4s", "--results", str(results), "--quiet",
        "--observe", "--observe-budget", "150/s",
    ]  # fmt: skip
    reaction = Spread.parse("50ms")
    async with emulator(reaction=reaction, capacity=20.0) as emu:
        await create(emu, [f"i{k}" for k in range(n)])
        code, stdout, stderr = await run_cli("load", args, env_for(emu))
    assert code == 0, stderr
    line = next(x for x in stdout.splitlines() if x.strip().startswith("knee"))
    rate = float(line.split("about")[1].split("arrivals")[0])
    # The queue takes 20/s: the reaction climbs past 1.5x its low-rate level above that,
    # never below it, and well before the ramp's top.
    assert 20 <= rate <= 50, line
    # `report` finds the same knee from the results file and its sidecar.
    code, text, stderr = await run_cli("report", [str(results)], {})
    assert code == 0, stderr
    assert line.strip() in text


def test_a_torn_or_bad_sidecar_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "r.jsonl"
    results.write_text("")
    Path(sidecar_path(str(results))).write_text('{"observe": {"source": "s"}}\n')
    assert main(["report", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"{results}.observe.jsonl:1: not an observation" in err


# --- source 1: the relay's POST /watch (a stand-in relay; the real one: test_wrangler_reaction)


async def test_relay_watch_events_become_the_same_observations() -> None:
    """A /watch that streams as the relay does (relay/README.md): the wait's end, the next
    step's (not the wait's own step_completed), the workflow's end; a wait that timed out is
    unreacted, an instance the relay could not find is unread."""
    from aiohttp import web

    seen: list[tuple[str | None, dict[str, Any]]] = []
    now_ms = datetime.now(UTC).timestamp() * 1000

    async def watch(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        seen.append((request.headers.get("Authorization"), doc))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        resp.headers["X-Relay-Now"] = str(datetime.now(UTC).timestamp() * 1000)
        await resp.prepare(request)
        t = now_ms

        def ev(iid: str, dt: float, kind: str, **kw: object) -> bytes:
            return orjson.dumps({"instanceId": iid, "eventId": 1, "timestamp": t + dt,
                                 "type": kind, **kw}) + b"\n"  # fmt: skip

        for iid in doc["ids"]:
            if iid == "gone":
                lines = [orjson.dumps({"instanceId": iid, "end": "not_found"}) + b"\n"]
            elif iid == "late":
                lines = [
                    ev(iid, 0, "wait_started", stepName="wait for go-1", eventType="go"),
                    ev(iid, 900, "wait_timed_out", stepName="wait for go-1"),
                    orjson.dumps({"instanceId": iid, "end": "timeout"}) + b"\n",
                ]
            else:
                lines = [
                    ev(iid, -50, "step_completed", stepName="before-1"),
                    ev(iid, 0, "wait_started", stepName="wait for go-1", eventType="go"),
                    ev(iid, 120, "wait_completed", stepName="wait for go-1"),
                    ev(iid, 121, "step_completed", stepName="wait for go-1"),
                    ev(iid, 640, "step_completed", stepName="after go-1"),
                    ev(iid, 650, "workflow_completed"),
                    orjson.dumps({"instanceId": iid, "end": "ended"}) + b"\n",
                ]
            for line in lines:
                await resp.write(line)
        await resp.write(orjson.dumps({"done": True, "watched": len(doc["ids"])}) + b"\n")
        return resp

    app = web.Application()
    app.router.add_post("/watch", watch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        settings = ObserveSettings(
            target="relay", base_url=f"http://127.0.0.1:{port}", account_id=None,
            workflow="wf", event_type="go", headers={"Authorization": "Bearer s3cret"},
            budget=50.0, reaction_timeout=0.5,
        )  # fmt: skip
        observer = Observer(settings)
        t0 = datetime.fromtimestamp(now_ms / 1000, UTC)
        async with anyio.create_task_group() as tg:
            tg.start_soon(observer.run)
            for iid in ("a", "b", "late", "gone"):
                observer.offer(make_envelope(iid, t0, instance_id=iid))
            observer.close()
    finally:
        await runner.cleanup()
    assert seen
    assert all(auth == "Bearer s3cret" for auth, _ in seen)
    assert sorted(i for _, doc in seen for i in doc["ids"]) == ["a", "b", "gone", "late"]
    assert "wait_completed" in seen[0][1]["filter"]
    rows = {r.instance_id: r for r in observer.rows}
    start = now_ms / 1000
    assert rows["a"].accepted == pytest.approx(start)  # the request's start, not its 2xx
    assert rows["a"].wait_end == pytest.approx(start + 0.120)
    assert rows["a"].next_end == pytest.approx(start + 0.640)
    assert rows["a"].instance_end == pytest.approx(start + 0.650)
    summary = observer.summary()
    assert summary.counts == {"reacted": 2, "unreacted": 1, "stale": 0, "unread": 1}
    assert summary.next_step.min_ms == pytest.approx(640, abs=1)
    assert summary.header.source.startswith("relay subscription")
    assert "X-Relay-Now" in summary.header.offset_how
    assert "s3cret" not in repr(summary.header.as_dict())
