"""The engine end to end against the in-process emulator on 127.0.0.1."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from dispatcher.emulator import Emulator, EmulatorConfig, Faults, Limit
from dispatcher.model import Delivery, Envelope, Event
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings, parse_rate
from dispatcher.sending.policy import RetryPolicy

TOKEN = "tok-engine-test-5b1c9e"


def settings_for(emu: Emulator, inputs: list[Path], results: Path, **kw: Any) -> SendSettings:
    base: dict[str, Any] = {
        "inputs": tuple(str(p) for p in inputs),
        "workflow": "wf",
        "account_id": "acc",
        "base_url": emu.base_url,
        "credentials": Credentials(token=TOKEN),
        "rate": "unlimited",
        "concurrency": 8,
        "results": str(results),
        "quiet": True,
        "max_attempts": 5,
    }
    base.update(kw)
    return SendSettings(**base)


def fast_policy(settings: SendSettings) -> RetryPolicy:
    # Backoff in milliseconds: the tests check what is retried, not how long it waits.
    return RetryPolicy(max_attempts=settings.max_attempts, base_delay=0.001, max_delay=0.01)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def read_results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def events(n: int, *, prefix: str = "i") -> list[dict[str, Any]]:
    return [
        {"instance_id": f"{prefix}{k}", "event_type": "evt", "body": {"k": k}} for k in range(n)
    ]


async def test_all_delivered_despite_faults(tmp_path: Path) -> None:
    faults = Faults.parse(["500=20%", "503=10%", "502=10%", "drop=5%"], first=2)
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=faults, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", events(300))
    out = tmp_path / "out.jsonl"
    async with Emulator(cfg) as emu:
        settings = settings_for(emu, [src], out, max_attempts=5)
        stats = await runner.run(settings, policy=fast_policy(settings))
        accepted = dict(emu.log.accepted)
        statuses = Counter(emu.log.status_counts)
    envs = read_results(out)
    assert len(envs) == 300
    assert all(e["ok"] and e["delivery"] == "confirmed" for e in envs)
    assert {e["instance_id"] for e in envs} == {f"i{k}" for k in range(300)}
    # Faults really happened, and were retried: some records took several attempts.
    assert statuses[500] + statuses[503] + statuses[502] > 0
    assert max(e["attempts"] for e in envs) > 1
    assert stats.retries == sum(e["attempts"] - 1 for e in envs)
    # Nothing lost, nothing sent twice: every event accepted exactly once.
    assert len(accepted) == 300
    assert all(len(times) == 1 for times in accepted.values())


async def test_429_pauses_every_worker(tmp_path: Path) -> None:
    # Another client of the same account has just spent the budget (10 per second) and
    # locked it out for a second: the run's first answers are 429s, and the first of
    # them must silence every worker until Retry-After has passed.
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=Limit.parse("10/1s"), lockout=1.0)
    src = write_jsonl(tmp_path / "in.jsonl", events(25))
    out = tmp_path / "out.jsonl"
    async with Emulator(cfg) as emu:
        url = f"{emu.base_url}/accounts/acc/workflows/wf/instances/other/events/evt"
        async with aiohttp.ClientSession() as session:
            for _ in range(11):
                async with session.post(url, headers={"Authorization": f"Bearer {TOKEN}"}):
                    pass
        stats = await runner.run(settings_for(emu, [src], out, concurrency=6))
        requests = [r for r in emu.log.requests if r.instance_id != "other"]
    envs = read_results(out)
    assert len(envs) == 25
    assert all(e["delivery"] == "confirmed" for e in envs)
    assert stats.rate_limited >= 1
    assert stats.pauses >= 1
    assert stats.paused_s >= 0.9  # the summary reports the time every worker waited
    first_429 = min(r.t for r in requests if r.status == 429)
    # Requests already past the gate may land a moment after the 429; after that, nobody
    # sends until Retry-After (1 s) has passed.
    quiet = [r for r in requests if first_429 + 0.1 < r.t < first_429 + 0.9]
    assert quiet == []
    assert any(r.t >= first_429 + 0.9 and r.status == 200 for r in requests)


async def test_permanent_errors_not_retried(tmp_path: Path) -> None:
    known = frozenset(f"i{k}" for k in range(0, 20, 2))
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, known_instances=known)
    src = write_jsonl(tmp_path / "in.jsonl", events(20))
    out = tmp_path / "out.jsonl"
    async with Emulator(cfg) as emu:
        stats = await runner.run(settings_for(emu, [src], out))
        per_instance = Counter(r.instance_id for r in emu.log.requests)
    envs = {e["instance_id"]: e for e in read_results(out)}
    assert len(envs) == 20
    for k in range(20):
        env = envs[f"i{k}"]
        if f"i{k}" in known:
            assert env["delivery"] == "confirmed"
        else:
            assert env["delivery"] == "rejected"
            assert env["status"] == 404
            assert env["error"]["code"] == 10400
            assert env["attempts"] == 1
        assert per_instance[f"i{k}"] == 1
    assert stats.retries == 0


async def test_invalid_lines_reported_with_line_numbers(tmp_path: Path) -> None:
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(
        b'{"instance_id": "ok1", "event_type": "evt"}\n'
        b"{not json\n"
        b'{"instance_id": "bad id!", "event_type": "evt"}\n'
        b'{"event_type": "evt"}\n'
        b'{"instance_id": "ok2", "event_type": "evt", "body": [1, 2]}\n'
    )
    out = tmp_path / "out.jsonl"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        await runner.run(settings_for(emu, [src], out))
        sent = {r.instance_id for r in emu.log.requests}
    envs = {e["line"]: e for e in read_results(out)}
    assert sorted(envs) == [1, 2, 3, 4, 5]
    assert envs[1]["delivery"] == envs[5]["delivery"] == "confirmed"
    for line in (2, 3, 4):
        assert envs[line]["delivery"] == "not_sent"
        assert envs[line]["error"]["kind"] == "invalid"
        assert envs[line]["source"] == str(src)
        assert envs[line]["attempts"] == 0
    assert envs[2]["error"]["message"].startswith(f"{src}:2: [bad_json] ")
    assert "instance_id" in envs[3]["error"]["message"]
    assert "instance_id" in envs[4]["error"]["message"]
    assert sent == {"ok1", "ok2"}


async def test_timeout_leaves_delivery_unknown(tmp_path: Path) -> None:
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="400ms"))
    src = write_jsonl(tmp_path / "in.jsonl", events(3))
    out = tmp_path / "out.jsonl"
    async with Emulator(cfg) as emu:
        settings = settings_for(emu, [src], out, timeout=0.1, max_attempts=2)
        stats = await runner.run(settings, policy=fast_policy(settings))
    envs = read_results(out)
    assert len(envs) == 3
    for env in envs:
        assert env["delivery"] == "unknown"
        assert env["error"]["kind"] == "timeout"
        assert env["status"] is None
        assert env["attempts"] == 2
    assert stats.failed == 3


async def test_bad_credentials_stop_the_run_early(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", events(500))
    out = tmp_path / "out.jsonl"
    async with Emulator(EmulatorConfig(tokens=("the-right-one",), limit=None)) as emu:
        stats = await runner.run(settings_for(emu, [src], out, concurrency=4))
        answered = sum(emu.log.status_counts.values())
    envs = read_results(out)
    assert stats.stop_reason is not None
    assert "credentials rejected" in stats.stop_reason
    # Only what was in flight got an envelope; the rest is left to send later.
    assert 1 <= len(envs) <= 4 * 2
    assert len(envs) == answered
    assert all(e["status"] in (401, 403) for e in envs)


async def test_dispatch_yields_one_envelope_per_record(tmp_path: Path) -> None:
    records = [
        Event(
            key=f"k{k}",
            source="api",
            line=k + 1,
            workflow="wf",
            instance_id=f"i{k}",
            event_type="evt",
            body=orjson.dumps({"k": k}),
        )
        for k in range(50)
    ]
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        settings = settings_for(emu, [], tmp_path / "unused.jsonl")
        got: list[Envelope] = [env async for env in runner.dispatch(records, settings)]
        accepted = len(emu.log.accepted)
    assert sorted(e.key for e in got) == sorted(f"k{k}" for k in range(50))
    assert all(e.delivery is Delivery.CONFIRMED for e in got)
    assert accepted == 50


async def test_rate_gate_spaces_requests(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", events(11))
    out = tmp_path / "out.jsonl"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        await runner.run(settings_for(emu, [src], out, rate=parse_rate("20/s"), concurrency=8))
        times = sorted(r.t for r in emu.log.requests)
    # Paced: 11 requests at 20/s span about half a second (less a burst of at most
    # 20 ms of traffic), where an ungated pool of 8 would send them in one instant.
    assert times[-1] - times[0] >= 0.35
