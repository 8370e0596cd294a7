"""Rate accuracy: dispatcher send --rate 500/s, timed by nginx's access log."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

from suite.config import say, signed_pct
from suite.peers import Setup, dispatcher_argv
from suite.processes import ChildResult, run_child, write_input


@dataclass(frozen=True, slots=True, kw_only=True)
class RateRun:
    requested: float
    events: int
    result: ChildResult
    server_rate: float
    server_span_s: float
    client_rate: float
    max_per_second: int
    arrivals: int


def achieved(times: Sequence[float]) -> tuple[float, float]:
    """Requests per second between the first and the last request: (n - 1) / span."""
    if len(times) < 2:
        return 0.0, 0.0
    span = max(times) - min(times)
    return ((len(times) - 1) / span if span > 0 else 0.0), span


def max_in_window(times: Sequence[float], window: float) -> int:
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def rate_run(setup: Setup, rate: float, seconds: float) -> RateRun:
    events = round(rate * seconds)
    inp = setup.tmp / "rate.jsonl"
    out = setup.tmp / "rate.results.jsonl"
    write_input(inp, events)
    setup.nginx.arrivals.write_bytes(b"")
    say(f"rate: dispatcher send --rate {rate:g}/s with {events} events")
    result = run_child(
        "dispatcher",
        dispatcher_argv(setup, inp, out, rate=f"{rate:g}/s", port=setup.nginx.log_port),
        setup.env,
        events=events,
        timeout=seconds * 3 + 60,
        log=setup.tmp / "rate.log",
        nginx=setup.nginx,
    )
    # nginx writes each access-log line as its request ends; no buffering is configured.
    arrivals = [float(x) for x in setup.nginx.arrivals.read_text().split()]
    server_rate, span = achieved(arrivals)
    # Client side: an envelope's finished_at minus its latency is when its request left.
    sent: list[float] = []
    ok = 0
    with contextlib.suppress(FileNotFoundError), out.open("rb") as f:
        for raw in f:
            env = json.loads(raw)
            ok += env.get("ok") is True
            if env.get("finished_at") and env.get("latency_ms") is not None:
                finished = dt.datetime.fromisoformat(env["finished_at"]).timestamp()
                sent.append(finished - env["latency_ms"] / 1000.0)
    client_rate, _ = achieved(sent)
    if result.exit_code != 0 or result.timed_out or ok != events or len(arrivals) != events:
        tail = (setup.tmp / "rate.log").read_text(errors="replace")[-2000:]
        say(
            f"warning: rate run: exit code {result.exit_code}, {ok} ok envelopes and "
            f"{len(arrivals)} requests seen for {events} events; its output ends with:\n{tail}"
        )
    inp.unlink()
    out.unlink(missing_ok=True)
    run = RateRun(
        requested=rate,
        events=events,
        result=result,
        server_rate=server_rate,
        server_span_s=span,
        client_rate=client_rate,
        max_per_second=max_in_window(arrivals, 1.0),
        arrivals=len(arrivals),
    )
    say(
        f"  server saw {run.arrivals} requests over {span:.3f} s = {server_rate:.1f}/s "
        f"({signed_pct(server_rate / rate - 1)}); client envelopes {client_rate:.1f}/s; "
        f"max {run.max_per_second} in any 1 s"
    )
    return run
