"""`dispatcher demo`: the whole job against the embedded emulator, no credentials needed.

Generates events, starts the emulator on 127.0.0.1 with faults injected, sends every event
through the same code path as `dispatcher send`, prints the summary, then checks the
emulator's log against the envelopes: nothing lost, nothing sent twice unseen.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import anyio
import orjson

from dispatcher.commands.progress import format_summary
from dispatcher.commands.send import _main, exit_code
from dispatcher.emulator import Emulator, EmulatorConfig, Faults, Limit
from dispatcher.run.settings import Credentials, SendSettings, parse_rate

WORKFLOW = "order-pipeline"
EVENT_TYPE = "payment-received"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=10_000, help="events to send (10000)")
    parser.add_argument(
        "--out", default="demo-out", help="folder for the input and results files (demo-out)"
    )
    parser.add_argument(
        "--rate", default="1000/s", help="client rate; the emulator allows 1200/s (1000/s)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="workers (32)")
    parser.add_argument("--seed", type=int, default=7, help="emulator fault seed (7)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")


def write_events(path: Path, count: int) -> None:
    with path.open("wb") as f:
        for i in range(count):
            record = {
                "instance_id": f"order-{i:07d}",
                "event_type": EVENT_TYPE,
                "body": {"order": i, "amount_cents": 100 + i % 900, "currency": "EUR"},
            }
            f.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))


def prepare(out: Path, count: int) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    write_events(events, count)
    return events, out / "results.jsonl"


async def _demo(args: argparse.Namespace) -> int:
    events, results = prepare(Path(args.out), args.events)
    # A throwaway token: the emulator accepts exactly this one.
    token = secrets.token_urlsafe(24)
    faults = Faults.parse(["500=2%", "503=1%", "502=1%", "drop=0.5%"], latency="0..20ms")
    config = EmulatorConfig(
        tokens=(token,),
        limit=Limit.parse("1200/1s"),
        faults=faults,
        seed=args.seed,
    )
    async with Emulator(config) as emu:
        if not args.quiet:
            print(
                f"dispatcher demo: {args.events:,} events from {events} → emulator at "
                f"{emu.base_url} (faults: {faults.describe()})",
                file=sys.stderr,
            )
        settings = SendSettings(
            inputs=(str(events),),
            workflow=WORKFLOW,
            account_id="demo-account",
            base_url=emu.base_url,
            credentials=Credentials(token=token),
            rate=parse_rate(args.rate),
            concurrency=args.concurrency,
            results=str(results),
            quiet=args.quiet,
            overwrite=True,
        )
        stats = await _main(settings)
        accepted = emu.log.total_accepted()
        distinct = len(emu.log.accepted)
        twice = len(emu.log.duplicates())
    if args.quiet:
        return exit_code(stats)
    print(format_summary(stats, str(results)), file=sys.stderr)
    unknown = stats.deliveries["unknown"]
    check = f"  emulator   accepted {distinct:,} distinct events ({accepted:,} requests)"
    check += f", {twice:,} of them more than once"
    if unknown:
        check += f"; {unknown:,} envelopes say delivery unknown (possible duplicates)"
    print(check, file=sys.stderr)
    return exit_code(stats)


def run(args: argparse.Namespace) -> int:
    if args.events < 1:
        print("dispatcher demo: error: --events must be at least 1", file=sys.stderr)
        return 2
    code: int = anyio.run(_demo, args, backend="asyncio")
    return code
