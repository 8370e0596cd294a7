"""``--rate auto`` against an nginx ``limit_req`` whose rate halves, then doubles (issue 25).

    python benchmarks/rate_change.py [--limit 200] [--burst 0] [--at 10,20] [--seconds 35]

nginx starts at ``limit``/s; at the first mark (seconds after the first request) its
configuration is reloaded at ``limit / 2``, at the second back at ``limit``. One
``dispatcher send --rate auto --concurrency 64`` with ``seconds`` x ``limit`` records.
Printed: 2xx and 429s per second as nginx logged them, and for each change how long auto
took to follow it: after the halving, until the last 429 of a run of them; after the
doubling, until the first second with 2xx >= 90% of ``limit``.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from pathlib import Path

import anyio
from rate_discovery import ensure_nginx, nginx, run_send, write_input


async def change(limit: int, burst: int, marks: list[float], seconds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-change-") as d:
        tmp = Path(d)
        with nginx(tmp, limit, nodelay=True, burst=burst) as (port, log):
            where = log.parent
            conf = where / "nginx.conf"
            text = conf.read_text()
            inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
            write_input(inp, limit * seconds)
            log.write_bytes(b"")
            await anyio.sleep(1.2)
            base = f"http://127.0.0.1:{port}/client/v4"
            started: list[float] = []

            async def reload_at() -> None:
                while not log.stat().st_size:  # noqa: ASYNC110 (polling a file nginx writes)
                    await anyio.sleep(0.01)
                first = float(log.read_text().split()[0])
                started.append(first)
                for k, mark in enumerate(marks):
                    rate = limit // 2 if k % 2 == 0 else limit
                    now = float(log.read_text().splitlines()[-1].split()[0])
                    await anyio.sleep(max(0.0, first + mark - now))
                    conf.write_text(text.replace(f"rate={limit}r/s", f"rate={rate}r/s"))
                    pid = int((where / "nginx.pid").read_text())
                    os.kill(pid, signal.SIGHUP)
                    print(f"reloaded at {rate}/s", flush=True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(reload_at)
                wall = await run_send(base, inp, out, "auto", fresh=True)
                tg.cancel_scope.cancel()
            lines = [line.split() for line in log.read_text().splitlines()]
    first = started[0] if started else float(lines[0][0])
    per: dict[int, list[int]] = {}
    for t, status in lines:
        cell = per.setdefault(int(float(t) - first), [0, 0])
        cell[status != "200"] += 1
    print(f"R={limit} burst={burst} changes at {marks} s, wall {wall:.0f} s")
    print("second: 2xx/429 " + " ".join(f"{s}:{a}/{b}" for s, (a, b) in sorted(per.items())))
    refusals = sorted(float(t) - first for t, status in lines if status == "429")
    halved, doubled = marks[0], marks[1]
    late = [t for t in refusals if halved <= t < doubled]
    print(
        f"after the halving: {len(late)} 429s, the last {late[-1] - halved:.1f} s after it"
        if late
        else "after the halving: no 429"
    )
    up = next((s for s, (a, _) in sorted(per.items()) if s >= doubled and a >= 0.9 * limit), None)
    print(
        "after the doubling: "
        + (
            f"2xx >= 90% of R in second {up}, {up - doubled:.0f} s after it"
            if up is not None
            else "never 90% of R again"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--at", default="10,20")
    parser.add_argument("--seconds", type=int, default=35)
    args = parser.parse_args()
    ensure_nginx()
    marks = [float(x) for x in args.at.split(",")]
    anyio.run(change, args.limit, args.burst, marks, args.seconds)


if __name__ == "__main__":
    main()
