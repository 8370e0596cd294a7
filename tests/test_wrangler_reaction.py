"""A Workflow's reaction to an accepted event, in real wrangler dev (issue 26).

Instances of the test project made with ``{then_ms: 500}`` wait for "go", then run a step
"after go" of 500 ms and complete. Through the relay: create them, send "go", then read
each instance's steps once through wrangler dev's local explorer. The "after go" step
lasts at least 500 ms, and the wait ends after the send began (minus CLOCK_TOLERANCE_S:
workerd stamps its steps from the same host clock as ours, to the millisecond). The
printed table is what docs/load.md, "wrangler dev run", records.

The relay's ``POST /watch`` holds one ``subscribe()`` per instance (wrangler 4.164 has it
locally) and streams their events back as NDJSON: the same reactions, pushed.

``dispatcher load --target relay --observe`` uses that route (source 1): a 30-s load at
LOAD_RATE/s to instances with then_ms=500, whose printed figures docs/load.md records,
and a threshold on the observed figures that is breached exits 4.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from wrangler_dev import WORKFLOW, WranglerDev, require_wrangler, wrangler_fixture

SECRET = "relay-reaction-secret-0123456789"
N = 20
THEN_MS = 500
CLOCK_TOLERANCE_S = 0.05  # same host clock; sqlite stamps to the ms, ours to the µs

require_wrangler()
wd = wrangler_fixture(SECRET)


def dispatcher(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    env["DISPATCHER_RELAY_SECRET"] = SECRET
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )


def when(stamp: Any) -> datetime:
    """A step's ``start``/``end`` (ISO text or sqlite's UTC ``YYYY-MM-DD HH:MM:SS.fff``, or
    epoch ms) as an aware datetime."""
    if isinstance(stamp, int | float):
        return datetime.fromtimestamp(stamp / 1000, UTC)
    parsed = datetime.fromisoformat(str(stamp).replace(" ", "T").replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def created_ids(tmp: Path) -> list[str]:
    """The ids a create run made (zero-padded by --id-prefix), in order."""
    found = [
        e["instance_id"]
        for e in map(orjson.loads, (tmp / "created.jsonl").read_bytes().splitlines())
        if e["outcome"] == "created"
    ]
    assert found, "create made nothing"
    return found


def base_name(name: object) -> object:
    """A step's name as the Workflow gave it: the engine adds ``-1`` (its count of steps
    of that name) in both the explorer's steps and subscribe()'s ``stepName``."""
    return re.sub(r"-\d+$", "", name) if isinstance(name, str) else name


def step(details: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in details.get("steps") or [] if base_name(s.get("name")) == name]
    assert found, (name, details)
    first: dict[str, Any] = found[0]
    return first


def test_reaction_of_a_step_of_known_length(wd: WranglerDev, tmp_path: Path) -> None:
    made = dispatcher(
        [
            "create",
            "--workflow",
            WORKFLOW,
            "--target",
            "relay",
            "--relay-url",
            wd.base_url,
            "--count",
            str(N),
            "--id-prefix",
            "rx-",
            "--params",
            f'{{"then_ms": {THEN_MS}}}',
            "--creation-rate",
            "1000/s",
            "--results",
            "created.jsonl",
        ],
        tmp_path,
    )
    assert made.returncode == 0, made.stderr
    ids = created_ids(tmp_path)
    waiting = wd.wait_waiting(ids)
    assert all(s.get("steps") for s in waiting.values()), waiting
    events = tmp_path / "go.jsonl"
    events.write_bytes(
        b"".join(
            orjson.dumps({"workflow": WORKFLOW, "instance_id": i, "event_type": "go", "body": {}})
            + b"\n"
            for i in ids
        )
    )
    sent = dispatcher(
        [
            "send",
            "--progress",
            "off",
            "--target",
            "relay",
            "--base-url",
            wd.base_url,
            "--results",
            "sent.jsonl",
            "go.jsonl",
        ],
        tmp_path,
    )
    assert sent.returncode == 0, sent.stderr
    accepted = {
        e["instance_id"]: (when(e["started_at"]), when(e["finished_at"]))
        for e in map(orjson.loads, (tmp_path / "sent.jsonl").read_bytes().splitlines())
    }
    assert len(accepted) == N
    done = wd.wait_complete(ids)
    consumed, done_after_2xx, after_go = [], [], []
    for i in ids:
        details = done[i]
        assert details["status"] == "complete", details
        wait, then = step(details, "wait for go"), step(details, "after go")
        started, answered = accepted[i]
        wait_end, then_end = when(wait["end"]), when(then["end"])
        # Consumed after the request left (it may be before its 2xx came back: the relay
        # answers a whole batch at once, after its last event).
        assert (wait_end - started).total_seconds() >= -CLOCK_TOLERANCE_S, (i, wait, started)
        length = (then_end - when(then["start"])).total_seconds()
        assert length >= THEN_MS / 1000 - 0.005, (i, then)  # sqlite stamps to the ms
        # So the end of "after go" comes at least its length after the request left.
        assert (then_end - started).total_seconds() >= THEN_MS / 1000 - CLOCK_TOLERANCE_S
        consumed.append((wait_end - answered).total_seconds())
        done_after_2xx.append((then_end - answered).total_seconds())
        after_go.append(length)

    def ms(values: list[float]) -> str:
        return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"

    print(
        f"\nwrangler dev, {N} instances, then_ms={THEN_MS}, one relay batch: "
        f"2xx to 'wait for go' end {ms(consumed)}; 2xx to 'after go' end {ms(done_after_2xx)}; "
        f"'after go' step {ms(after_go)}, min {min(after_go) * 1000:.0f} ms"
    )


def go_events(tmp: Path, ids: list[str]) -> None:
    (tmp / "go.jsonl").write_bytes(
        b"".join(
            orjson.dumps({"workflow": WORKFLOW, "instance_id": i, "event_type": "go", "body": {}})
            + b"\n"
            for i in ids
        )
    )


def watch_request(wd: WranglerDev, doc: object, secret: str = SECRET) -> urllib.request.Request:
    return urllib.request.Request(
        wd.base_url + "/watch",
        data=orjson.dumps(doc),
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        method="POST",
    )


def test_one_watch_request_streams_the_events_of_many_instances(
    wd: WranglerDev, tmp_path: Path
) -> None:
    n, then_ms = 10, 300
    create = [
        "create", "--workflow", WORKFLOW, "--target", "relay", "--relay-url", wd.base_url,
        "--count", str(n), "--id-prefix", "wx-", "--params", f'{{"then_ms": {then_ms}}}',
        "--creation-rate", "1000/s", "--results", "created.jsonl",
    ]  # fmt: skip
    made = dispatcher(create, tmp_path)
    assert made.returncode == 0, made.stderr
    ids = created_ids(tmp_path)
    wd.wait_waiting(ids)
    lines: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            with urllib.request.urlopen(
                watch_request(wd, {"ids": ids, "timeout_ms": 90_000}), timeout=120
            ) as resp:
                assert resp.headers["Content-Type"].startswith("application/x-ndjson")
                for raw in resp:
                    lines.append(orjson.loads(raw))
        except BaseException as exc:  # reported by the test's thread
            failure.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The replay of what is retained comes first: every instance is parked in its wait.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not failure:
        started = {e.get("instanceId") for e in list(lines) if e.get("type") == "wait_started"}
        if started >= set(ids):
            break
        time.sleep(0.2)
    assert not failure, failure
    go_events(tmp_path, ids)
    send = [
        "send", "--progress", "off", "--target", "relay", "--base-url", wd.base_url,
        "--results", "sent.jsonl", "go.jsonl",
    ]  # fmt: skip
    sent = dispatcher(send, tmp_path)
    assert sent.returncode == 0, sent.stderr
    watcher.join(timeout=120)
    assert not failure, failure
    assert not watcher.is_alive(), "the watch did not end after every instance completed"
    assert lines[-1] == {"done": True, "watched": n}
    answered = {
        e["instance_id"]: (when(e["started_at"]), when(e["finished_at"]))
        for e in map(orjson.loads, (tmp_path / "sent.jsonl").read_bytes().splitlines())
    }
    reactions, completions = [], []
    for i in ids:
        mine = [e for e in lines if e.get("instanceId") == i]
        assert mine[-1] == {"instanceId": i, "end": "ended"}, mine[-3:]
        by_type = {(e.get("type"), base_name(e.get("stepName"))): e for e in mine[:-1]}
        assert by_type[("wait_started", "wait for go")]["eventType"] == "go"
        consumed = when(by_type[("wait_completed", "wait for go")]["timestamp"])
        after = when(by_type[("step_completed", "after go")]["timestamp"])
        ended = when(by_type[("workflow_completed", None)]["timestamp"])
        assert (consumed - answered[i][0]).total_seconds() >= -CLOCK_TOLERANCE_S
        assert (after - consumed).total_seconds() >= then_ms / 1000 - 0.005
        assert ended >= after
        reactions.append((consumed - answered[i][1]).total_seconds())
        completions.append((ended - answered[i][1]).total_seconds())
    print(
        f"\nrelay /watch, {n} instances, then_ms={then_ms}: 2xx to wait_completed p50 "
        f"{statistics.median(reactions) * 1000:.0f} ms, max {max(reactions) * 1000:.0f} ms; "
        f"2xx to workflow_completed p50 {statistics.median(completions) * 1000:.0f} ms, "
        f"max {max(completions) * 1000:.0f} ms"
    )


@pytest.mark.parametrize(
    ("doc", "secret", "status"),
    [
        ({"ids": ["a"]}, "wrong-secret", 401),
        ({"ids": ["a"], "timeout_ms": 0}, SECRET, 400),
        ({"ids": ["a"], "filter": "wait_completed"}, SECRET, 400),
        ({"ids": [f"i{k}" for k in range(101)]}, SECRET, 413),
    ],
)
def test_watch_refuses_before_streaming(
    wd: WranglerDev, doc: object, secret: str, status: int
) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(watch_request(wd, doc, secret), timeout=30)
    assert refused.value.code == status
    body = orjson.loads(refused.value.read())
    assert body["success"] is False
    assert SECRET not in str(body)


def test_watch_of_an_unknown_instance_ends_it_as_not_found(wd: WranglerDev) -> None:
    with urllib.request.urlopen(
        watch_request(wd, {"ids": ["nobody-here"], "timeout_ms": 5000}), timeout=60
    ) as resp:
        lines = [orjson.loads(raw) for raw in resp]
    assert lines[0]["instanceId"] == "nobody-here"
    assert lines[0]["end"] == "not_found", lines
    assert lines[-1] == {"done": True, "watched": 1}


LOAD_RATE = 4  # arrivals/s: 120 instances over the 30 s, a modest share of CI
LOAD_SECONDS = 30
STEP_TOLERANCE_S = 0.005  # sqlite stamps to the ms; both ends are the engine's own clock


def load_instances(wd: WranglerDev, tmp: Path, prefix: str, count: int) -> Path:
    """``count`` instances with then_ms=THEN_MS, made through the relay, parked in their
    wait; their ids in a file for ``load --instances``."""
    create = [
        "create", "--workflow", WORKFLOW, "--target", "relay", "--relay-url", wd.base_url,
        "--count", str(count), "--id-prefix", prefix, "--params", f'{{"then_ms": {THEN_MS}}}',
        "--creation-rate", "1000/s", "--results", "created.jsonl",
    ]  # fmt: skip
    made = dispatcher(create, tmp)
    assert made.returncode == 0, made.stderr
    ids = created_ids(tmp)
    assert len(ids) == count
    wd.wait_waiting(ids, timeout=120)
    path = tmp / "ids.txt"
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def load_relay(wd: WranglerDev, tmp: Path, ids: Path, seconds: int, *extra: str) -> Any:
    args = [
        "load", "--workflow", WORKFLOW, "--event-type", "go", "--instances", str(ids),
        "--body", "{}", "--target", "relay", "--base-url", wd.base_url,
        "--rate", f"{LOAD_RATE}/s", "--duration", f"{seconds}s", "--quiet",
        "--observe", "--reaction-timeout", "20s", "--results", "load.jsonl", *extra,
    ]  # fmt: skip
    return dispatcher(args, tmp)


def test_load_observed_through_the_relay_subscription(wd: WranglerDev, tmp_path: Path) -> None:
    from dispatcher.report.observed import read_sidecar, summarize

    arrivals = LOAD_RATE * LOAD_SECONDS
    ids = load_instances(wd, tmp_path, "lx-", arrivals)
    ran = load_relay(wd, tmp_path, ids, LOAD_SECONDS)
    assert ran.returncode == 0, ran.stderr
    assert "source: relay subscription (source 1): POST /watch" in ran.stdout, ran.stdout
    header, rows = read_sidecar(str(tmp_path / "load.jsonl.observe.jsonl"))
    summary = summarize(header, rows)
    counts = summary.counts
    # Every event the load got a 2xx for was watched, and every one was consumed in time.
    assert counts["reacted"] == len(rows) >= arrivals * 0.95, counts
    assert counts["unreacted"] == counts["stale"] == counts["unread"] == 0, counts
    for row in rows:
        assert row.wait_end is not None, row
        assert row.next_end is not None, row
        assert row.next_end - row.wait_end >= THEN_MS / 1000 - STEP_TOLERANCE_S, row
        assert row.instance_end is not None, row
        assert row.instance_end >= row.next_end, row
    # From the request's start the next step cannot end sooner than the step's own length
    # (less the clock's rounding: the relay's X-Relay-Now and the engine share this host).
    assert summary.next_step.min_ms is not None
    assert summary.next_step.min_ms >= THEN_MS - CLOCK_TOLERANCE_S * 1000, summary.next_step
    assert summary.completion.min_ms is not None
    assert summary.completion.min_ms >= summary.next_step.min_ms
    assert header.offset_s is not None, header
    assert header.bound_s is not None, header
    assert "X-Relay-Now" in header.offset_how
    r, n, c = summary.reaction, summary.next_step, summary.completion
    print(
        f"\nload --target relay --observe, {LOAD_RATE}/s for {LOAD_SECONDS} s, then_ms="
        f"{THEN_MS}: observed {len(rows)}, reacted {counts['reacted']}, unreacted "
        f"{counts['unreacted']}; reaction p50 {r.p50_ms} p99 {r.p99_ms} max {r.max_ms} ms; "
        f"next step p50 {n.p50_ms} min {n.min_ms} ms; completion p50 {c.p50_ms} ms; "
        f"offset {header.offset_s * 1000:+.1f} ms ±{header.bound_s * 1000:.1f} ms "
        f"({header.offset_how})"
    )
    print(ran.stdout[ran.stdout.index("observe    source") :])


def test_a_breached_threshold_on_the_relay_subscription_exits_4(
    wd: WranglerDev, tmp_path: Path
) -> None:
    seconds = 3
    ids = load_instances(wd, tmp_path, "lb-", LOAD_RATE * seconds)
    # The next step lasts THEN_MS: it cannot end within 100 ms of the send.
    ran = load_relay(wd, tmp_path, ids, seconds, "--threshold", "next_step_p50<100ms")
    assert ran.returncode == 4, (ran.stdout, ran.stderr)
    assert "next_step_p50<100ms" in ran.stderr
    assert "relay subscription" in ran.stdout
