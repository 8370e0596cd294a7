"""Told and auto rates against nginx ``limit_req`` with ``burst=0`` (issue 25), short runs.

    python benchmarks/strict_limit.py [--limits 20,200] [--seconds 10] [--burst 0]

Per cell: goodput as a share of R (from nginx's log) and the 429 count.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio
from rate_discovery import Case, ensure_nginx, measure_nginx, nginx


async def main_async(limits: list[int], seconds: int, burst: int) -> None:
    print("| R | burst | --rate | goodput | 429s | confirmed / records |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-strict-") as d:
        tmp = Path(d)
        for limit in limits:
            n = limit * seconds
            with nginx(tmp, limit, nodelay=True, burst=burst) as (port, log):
                for rate in (f"{limit}/s", "auto"):
                    case = Case("nginx", limit, rate, rate, n)
                    m = await measure_nginx(case, tmp, port, log, fresh=True)
                    good = "-" if m.goodput is None else f"{m.goodput:.1%}"
                    print(
                        f"| {limit} | {burst} | {rate} | {good} | {m.refused} | {m.confirmed}/{n} |"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="20,200")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--burst", type=int, default=0)
    args = parser.parse_args()
    ensure_nginx()
    limits = [int(x) for x in args.limits.split(",")]
    anyio.run(main_async, limits, args.seconds, args.burst)


if __name__ == "__main__":
    main()
