"""`dispatcher load`: arrivals on schedule, drops counted, thresholds, against the emulator."""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import time
from pathlib import Path

import anyio
import orjson
import pytest

from dispatcher.commands.cli import main
from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.emulator.config import Limit
from dispatcher.report.summary import parse_threshold
from dispatcher.results.ledger import read_envelopes
from dispatcher.run.loadtest import (
    LoadProfile,
    LoadResult,
    LoadSettings,
    LoadStats,
    Stage,
    run_load,
)
from dispatcher.run.settings import Credentials

TOKEN = "tok-load-SECRET-51c2"


# --- the arrival schedule (pure) ------------------------------------------------------------


def test_constant_rate_arrivals_are_evenly_spaced() -> None:
    times = list(LoadProfile.constant(50, 2).arrivals())
    assert len(times) == 100
    assert times[0] == 0
    assert times[-1] == pytest.approx(1.98)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.02}


def test_ramp_arrivals_follow_the_rate() -> None:
    profile = LoadProfile.parse_ramp(["0/s:100/s:2s"])
    times = list(profile.arrivals())
    assert len(times) == 100  # (0 + 100) / 2 * 2 s
    assert times == sorted(times)
    # Half the arrivals of a linear ramp from 0 come in its last 29% (1 - 1/sqrt 2).
    assert times[50] == pytest.approx(2 / 2**0.5, abs=0.01)
    assert times[-1] - times[-2] < times[1] - times[0]


def test_ramp_stages_chain() -> None:
    profile = LoadProfile.parse_ramp(["10/s:30/s:1s,30/s:1s", "30/s:0:2s"])
    assert profile.stages == (
        Stage(start=10, end=30, seconds=1),
        Stage(start=30, end=30, seconds=1),
        Stage(start=30, end=0, seconds=2),
    )
    assert profile.seconds == 4
    times = list(profile.arrivals())
    assert len(times) == 20 + 30 + 30
    assert sum(1 for t in times if t < 1) == 20
    assert max(times) < 4
    assert profile.points()[0] == (0.0, 10.0)


@pytest.mark.parametrize("spec", ["10/s", "10/s:20/s:0s", "a:b:c", "unlimited:10s", "-5/s:1s"])
def test_bad_ramp_names_the_flag(spec: str) -> None:
    with pytest.raises(ValueError, match="--ramp"):
        LoadProfile.parse_ramp([spec])


def test_live_window_percentiles() -> None:
    stats = LoadStats()
    for k in range(1, 101):
        stats.recent.append((100.0, float(k)))
    stats.recent.appendleft((1.0, 5000.0))  # older than the window: forgotten
    assert stats.window_percentiles(102.0) == (50.0, 99.0)


# --- runs against the emulator ---------------------------------------------------------------


def settings_for(emu: Emulator, tmp_path: Path, **kw: object) -> LoadSettings:
    values: dict[str, object] = {
        "workflow": "wf",
        "event_type": "evt",
        "instances": tuple(f"i{k}" for k in range(7)),
        "profile": LoadProfile.constant(50, 2),
        "concurrency": 16,
        "account_id": "acc",
        "base_url": emu.base_url,
        "credentials": Credentials(token=TOKEN),
        "results": str(tmp_path / "load.jsonl"),
    }
    values.update(kw)
    return LoadSettings(**values)  # type: ignore[arg-type]


async def test_rate_achieved_and_every_arrival_has_an_envelope(tmp_path: Path) -> None:
    async with Emulator(EmulatorConfig(limit=None)) as emu:
        s = settings_for(emu, tmp_path, bodies=(b'{"n":1}', b'{"n":2}', b'{"n":3}'))
        result = await run_load(s)
        requests = list(emu.log.requests)
    stats = result.stats
    assert stats.arrivals == 100
    assert stats.dropped == 0
    assert stats.sent == 100
    rate = result.metrics["rate"]
    assert rate is not None
    assert 45 <= rate <= 55
    envs = list(read_envelopes(s.results))
    assert len(envs) == 100
    assert all(e.ok and e.attempts == 1 for e in envs)
    assert result.report.confirmed == 100
    # Round robin over the instances, bodies cycled.
    per_instance = {i: sum(1 for r in requests if r.instance_id == i) for i in s.instances}
    assert set(per_instance.values()) <= {14, 15}
    assert len({r.body_sha256 for r in requests}) == 3


async def test_percentiles_move_with_injected_latency(tmp_path: Path) -> None:
    results: list[LoadResult] = []
    for name, latency in (("fast", "0ms"), ("slow", "150ms")):
        faults = Faults.parse([], latency=latency)
        async with Emulator(EmulatorConfig(limit=None, faults=faults)) as emu:
            s = settings_for(
                emu, tmp_path, profile=LoadProfile.constant(30, 1), results=str(tmp_path / name)
            )
            results.append(await run_load(s))
    fast, slow = (r.report.latency for r in results)
    assert fast.p50_ms is not None
    assert slow.p50_ms is not None
    assert slow.p99_ms is not None
    assert fast.min_ms is not None
    assert slow.min_ms is not None
    # The injected 150 ms moves the whole distribution (minimum compared, not median: a
    # loaded 2-core machine adds tens of ms to a median of either run).
    assert slow.min_ms >= 150
    assert 130 <= slow.min_ms - fast.min_ms <= 350
    assert slow.p50_ms >= max(150, fast.p50_ms)
    assert all(r.stats.dropped == 0 for r in results)


async def test_busy_workers_drop_arrivals_instead_of_queueing(tmp_path: Path) -> None:
    faults = Faults.parse([], latency="300ms")
    async with Emulator(EmulatorConfig(limit=None, faults=faults)) as emu:
        s = settings_for(
            emu,
            tmp_path,
            profile=LoadProfile.constant(20, 1),
            concurrency=2,
            thresholds=(parse_threshold("dropped<1%"),),
        )
        result = await run_load(s)
        received = emu.log.total_requests()
    stats = result.stats
    assert stats.arrivals == 20
    # Two workers busy 300 ms each can take at most 4 arrivals apiece in one second.
    assert stats.sent <= 8
    assert stats.sent + stats.dropped == 20
    assert received == stats.sent
    assert len(result.overlay.dropped) == stats.dropped
    # Nothing waited in a queue: every latency is the server's 300 ms, not more.
    assert result.report.latency.max_ms is not None
    assert result.report.latency.max_ms < 600
    assert [b.describe() for b in result.breaches] == [
        f"dropped<1%: measured {stats.dropped / 20:.2%}"
    ]


async def test_latency_thresholds_keep_429s_apart_from_accepted_answers(tmp_path: Path) -> None:
    # Every 2xx takes 100 ms; the limiter refuses most arrivals at once, before any
    # latency. Mixed together, the fast 429s would be most answers and set the median.
    faults = Faults.parse([], latency="100ms")
    config = EmulatorConfig(limit=Limit(quota=10, window=1.0), lockout=1.0, faults=faults)
    async with Emulator(config) as emu:
        s = settings_for(
            emu,
            tmp_path,
            profile=LoadProfile.constant(40, 1),
            thresholds=tuple(
                parse_threshold(t)
                for t in ("p50>=100ms", "rejected_p99<50ms", "all_p50>=100ms", "all_p50<50ms")
            ),
        )
        result = await run_load(s)
    stats = result.stats
    assert stats.rate_limited >= 20
    assert 10 <= stats.confirmed < 20
    # p50 judges the accepted answers (all >= 100 ms), rejected_p99 the 429s (fast);
    # only the mixed all_p50 is pulled down by the 429s.
    assert [b.threshold.text for b in result.breaches] == ["all_p50>=100ms"]
    # The live line's percentiles are split the same way.
    p50, _ = stats.window_percentiles(time.monotonic())
    r50, _ = stats.window_percentiles(time.monotonic(), rejected=True)
    assert p50 is not None
    assert p50 >= 100
    assert r50 is not None
    assert r50 < 50


# --- the command, as a user runs it ----------------------------------------------------------


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


async def load_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", "load", *args], env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_threshold_breach_exits_4_and_names_it(tmp_path: Path) -> None:
    out = tmp_path / "load.jsonl"
    plot = tmp_path / "load.png"
    args = [
        "--workflow", "wf", "--event-type", "evt",
        "--instance-prefix", "order-", "--instance-count", "5",
        "--body", '{"ok": true}',
        "--rate", "20/s", "--duration", "1s",
        "--results", str(out),
        "--threshold", "p99<50ms",
        "--threshold", "error_rate<50%",
    ]  # fmt: skip
    has_plot = importlib.util.find_spec("matplotlib") is not None
    if has_plot:
        args += ["--plot", str(plot)]
    faults = Faults.parse([], latency="100ms")
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None, faults=faults)) as emu:
        code, stdout, stderr = await load_cli(args, env_for(emu))
        instances = {r.instance_id for r in emu.log.requests}
    assert code == 4, stderr
    assert "threshold breached: p99<50ms: measured 1" in stderr
    assert "error_rate<50%" not in stderr.split("threshold breached")[-1]
    assert "threshold  p99<50ms: BREACHED" in stdout
    assert "threshold  error_rate<50%: ok (measured 0.00%)" in stdout
    assert "arrivals   20: 20 sent, 0 dropped" in stdout
    # The live view: a line a second on stderr when it is not a terminal.
    live = [line for line in stderr.splitlines() if line.startswith("load:") and "p99" in line]
    assert live
    assert "in flight" in live[0]
    assert instances == {f"order-{k}" for k in range(5)}
    lines = out.read_bytes().splitlines()
    assert len(lines) == 20
    assert orjson.loads(lines[0])["delivery"] == "confirmed"
    if has_plot:
        assert plot.read_bytes().startswith(b"\x89PNG")


async def test_rejected_credentials_stop_the_test(tmp_path: Path) -> None:
    args = [
        "--workflow", "wf", "--event-type", "evt",
        "--instance-prefix", "i", "--instance-count", "3",
        "--rate", "20/s", "--duration", "5s", "--quiet", "--format", "json",
        "--results", str(tmp_path / "r.jsonl"),
    ]  # fmt: skip
    async with Emulator(EmulatorConfig(tokens=("another-token",), limit=None)) as emu:
        with anyio.fail_after(60):  # a guard against a hang only: the arrivals tell the stop
            code, stdout, stderr = await load_cli(args, env_for(emu))
    assert code == 3, stderr
    assert "credentials rejected (HTTP 401" in stderr
    assert TOKEN not in stderr + stdout
    doc = orjson.loads(stdout)  # one JSON document: the report and the load's own numbers
    assert doc["status"].get("401", 0) >= 1, doc["status"]
    assert doc["load"]["sent"] == doc["records"]
    assert doc["load"]["stopped"].startswith("credentials rejected")
    # It stopped long before the 5 s the test would take: 100 arrivals were planned, and
    # the first 401 ends them. Counted by the run itself, so a slow interpreter start-up on
    # a loaded machine does not count (a 4 s wall-clock limit on the whole command did).
    assert doc["load"]["arrivals"] <= 50, doc["load"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give the arrival rate"),
        (["--rate", "10/s", "--ramp", "1/s:2/s:1s"], "--ramp gives rates"),
        (["--rate", "unlimited"], "a load test needs a number"),
        (["--rate", "10/s", "--threshold", "p99<soon"], "--threshold"),
        (["--rate", "10/s", "--concurrency", "0"], "--concurrency"),
        # --observe and its thresholds (docs/load.md)
        (
            ["--rate", "10/s", "--observe", "--observe-sample", "0"],
            "--observe-sample must be above 0",
        ),
        (
            ["--rate", "10/s", "--observe", "--observe-sample", "lots"],
            "--observe-sample: 'lots' is not a share",
        ),
        (
            ["--rate", "10/s", "--observe", "--observe-sample", "150%"],
            "--observe-sample: '150%' is not within",
        ),
        (
            ["--rate", "10/s", "--observe", "--reaction-timeout", "soon"],
            "--reaction-timeout: invalid duration 'soon'",
        ),
        (
            ["--rate", "10/s", "--observe", "--reaction-timeout", "0s"],
            "--reaction-timeout must be above 0",
        ),
        (
            ["--rate", "10/s", "--observe", "--observe-budget", "plenty"],
            "--observe-budget: 'plenty'",
        ),
        (
            ["--rate", "10/s", "--observe", "--observe-budget", "0%"],
            "--observe-budget 0%: gives no reads",
        ),
        (["--rate", "10/s", "--observe-sample", "5%"], "--observe-sample needs --observe"),
        (
            ["--rate", "10/s", "--threshold", "reaction_p99<2s"],
            "--threshold reaction_p99<2s needs --observe",
        ),
        (
            ["--rate", "10/s", "--threshold", "unreacted<1%"],
            "--threshold unreacted<1% needs --observe",
        ),
        (["--rate", "10/s", "--threshold", "reaction_p99<fast"], "is not a latency"),
        (
            ["--rate", "10/s", "--observe", "--results", "-"],
            "--observe writes RESULTS.observe.jsonl",
        ),
    ],
)
def test_usage_errors_exit_2(
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acc")
    base = ["load", "--workflow", "wf", "--event-type", "e", "--instance-prefix", "i"]
    base += ["--instance-count", "2", "--results", str(tmp_path / "r.jsonl")]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert TOKEN not in err


def test_instances_file_with_a_bad_id_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acc")
    ids = tmp_path / "ids.txt"
    ids.write_text("good-1\nbad id\n")
    code = main(
        ["load", "--workflow", "wf", "--event-type", "e", "--instances", str(ids), "--rate", "1"]
    )
    assert code == 2
    assert f"{ids}:2" in capsys.readouterr().err


async def test_rate_is_sent_over_the_planned_duration(tmp_path: Path) -> None:
    # 10 arrivals at 5/s leave at 0, 0.2 ... 1.8 s: first to last is 1.8 s, but the test
    # ran for its planned 2 s, and docs/load.md defines the rate over that: 5.0/s.
    async with Emulator(EmulatorConfig(limit=None)) as emu:
        result = await run_load(settings_for(emu, tmp_path, profile=LoadProfile.constant(5, 2)))
    assert result.stats.sent == 10
    assert result.metrics["rate"] == 5.0
