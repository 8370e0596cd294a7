"""What ``--metrics-port`` costs: the per-event work it reads, and a whole send run.

    python benchmarks/metrics_cost.py [--events 20000]

1. Per event, in-process: the counters a scrape reads are kept in every run (one bisect
   into the latency buckets, one Counter increment per answer). Timed over N events, next
   to ``RunStats.record`` as a whole and to the alternative the project did not take:
   prometheus_client's own ``Counter.labels().inc()`` and ``Histogram.observe()`` per event.
2. A whole ``dispatcher send`` of N records to the in-process emulator, at an unlimited
   rate, without and with ``--metrics-port`` (scraped every 0.5 s), in alternating order:
   the child's CPU seconds (user + system), median of ``--repeat`` runs each.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import anyio

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.model import Delivery, Envelope
from dispatcher.sending.stats import RunStats

TOKEN = "bench-token"


def per_event(n: int) -> dict[str, float]:
    """Nanoseconds per event of each way to count."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client import Counter as PromCounter

    env = Envelope(
        key="k", source="s", line=1, workflow="wf", instance_id="i", event_type="e",
        ok=True, delivery=Delivery.CONFIRMED, status=200, attempts=1, error=None,
        started_at=datetime.now(UTC), finished_at=datetime.now(UTC), latency_ms=12.5,
        elapsed_ms=12.5,
    )  # fmt: skip
    stats = RunStats()
    out: dict[str, float] = {}
    t0 = time.perf_counter_ns()
    for _ in range(n):
        stats.latency.add(12.5)
        stats.answers[200] += 1
    out["added work (buckets + answers)"] = (time.perf_counter_ns() - t0) / n
    t0 = time.perf_counter_ns()
    for _ in range(n):
        stats.record(env)
    out["RunStats.record, whole"] = (time.perf_counter_ns() - t0) / n
    registry = CollectorRegistry()
    records = PromCounter("r", "r", ["delivery"], registry=registry)
    latency = Histogram("l", "l", registry=registry)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        records.labels("confirmed").inc()
        latency.observe(0.0125)
    out["prometheus_client per event (not used)"] = (time.perf_counter_ns() - t0) / n
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape(port: int, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(0.5):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                r.read()
                count[0] += 1
        except OSError:
            pass


async def one_send(base_url: str, ids: Path, results: Path, metrics: bool) -> tuple[float, int]:
    """The child's CPU seconds and how many scrapes answered."""
    cmd = [
        sys.executable, "-m", "dispatcher", "send", str(ids), "--workflow", "wf",
        "--event-type", "go", "--rate", "unlimited", "--results", str(results),
        "--overwrite", "--quiet",
    ]  # fmt: skip
    stop, count = threading.Event(), [0]
    scraper = None
    if metrics:
        port = free_port()
        cmd += ["--metrics-port", str(port)]
        scraper = threading.Thread(target=_scrape, args=(port, stop, count), daemon=True)
        scraper.start()
    env = dict(os.environ, CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc")
    env["CLOUDFLARE_BASE_URL"] = base_url
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    await anyio.run_process(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    if scraper is not None:
        scraper.join()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, count[0]


async def whole_runs(n: int, repeat: int) -> dict[str, tuple[float, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.txt"
        ids.write_text("".join(f"i{k}\n" for k in range(n)))
        out: dict[str, list[tuple[float, int]]] = {"without": [], "with": []}
        async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
            for n in range(repeat):
                # Alternating which goes first: the emulator's log grows over the runs.
                for label in ("without", "with") if n % 2 == 0 else ("with", "without"):
                    out[label].append(
                        await one_send(emu.base_url, ids, Path(tmp) / "r.jsonl", label == "with")
                    )
    return {
        label: (statistics.median(c for c, _ in runs), max(s for _, s in runs))
        for label, runs in out.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"per event, {args.events:,} events:")
    for label, ns in per_event(args.events).items():
        print(f"  {label:<42} {ns:8,.0f} ns")
    print(f"dispatcher send of {args.events:,} records, child CPU s (median of {args.repeat}):")
    for label, (cpu, scrapes) in anyio.run(whole_runs, args.events, args.repeat).items():
        print(f"  {label:<8} --metrics-port  {cpu:6.2f} s  ({scrapes} scrapes answered)")


if __name__ == "__main__":
    main()
