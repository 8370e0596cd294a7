"""`dispatcher demo`: the whole instance loop against the embedded emulator, no credentials.

Starts the emulator on 127.0.0.1 in instance mode with faults injected, then does what a
user does with `dispatcher`, through the same code as the commands:

1. ``create``: 1,000 instances of ``order-pipeline``, whose model waits for
   ``payment-received``. Some are made not to wait for it: a tenth wait for another event
   (``address-confirmed``) and a twentieth time out at once (their payment window has
   passed: ``errored``).
2. ``send --instances-of order-pipeline --waiting-for payment-received``: the listing is
   read page by page, each instance's steps are read, and only those that wait get the
   event; the others get a ``skipped`` envelope with the reason.
3. ``verify``: every confirmed record's instance is read again and classed; the summary
   by class ends the output.

Exit 0 when every instance was created once, every event sent was confirmed and every
confirmed one was consumed.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
from pathlib import Path
from typing import Final

import anyio
import orjson

from dispatcher.commands import create
from dispatcher.commands.progress import format_summary
from dispatcher.commands.send import _main, exit_code
from dispatcher.commands.verify import VerifyPlan, out_path_for, verify_file
from dispatcher.commands.verify import exit_code as verify_exit_code
from dispatcher.emulator import Emulator, EmulatorConfig, Faults, InstanceModel, Limit
from dispatcher.run.settings import Credentials, SendSettings, parse_rate

WORKFLOW: Final = "order-pipeline"
EVENT_TYPE: Final = "payment-received"
OTHER_TYPE: Final = "address-confirmed"
ACCOUNT: Final = "demo-account"
# The emulator creates as fast as it is asked; the platform allows 100/s per workflow
# and 300/s per account.
CREATION_RATE: Final = "2000/s"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=1_000, help="instances to create (1000)")
    parser.add_argument(
        "--out", default="demo-out", help="folder for the input and results files (demo-out)"
    )
    parser.add_argument(
        "--rate", default="1000/s", help="client rate; the emulator allows 1200/s (1000/s)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="workers (32)")
    parser.add_argument("--seed", type=int, default=7, help="emulator fault seed (7)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")


def write_instances(path: Path, count: int) -> dict[str, int]:
    """The create input: ``count`` orders; every 10th waits for another event, every 20th
    (not a 10th) has timed out. Returns how many of each kind."""
    kinds = {"waits": 0, "other": 0, "expired": 0}
    with path.open("wb") as f:
        for i in range(1, count + 1):
            params: dict[str, object] = {"order": i, "amount_cents": 100 + i % 900}
            if i % 10 == 0:
                params["wait_for"] = OTHER_TYPE
                kinds["other"] += 1
            elif i % 20 == 5:
                params["timeout"] = 0
                kinds["expired"] += 1
            else:
                kinds["waits"] += 1
            item = {"instance_id": f"order-{i:07d}", "params": params}
            f.write(orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE))
    return kinds


async def _create(emu: Emulator, token: str, source: Path, results: Path, rate: str) -> int:
    parser = argparse.ArgumentParser(prog=create.PROG)
    create.configure(parser)
    args = parser.parse_args(
        [str(source), "--workflow", WORKFLOW, "--target", "api", "--base-url", emu.base_url,
         "--account-id", ACCOUNT, "--creation-rate", CREATION_RATE,
         "--account-creation-rate", CREATION_RATE, "--rate", rate,
         "--results", str(results), "--overwrite"]
    )  # fmt: skip
    items = create.read_items(args)
    fd = os.open(results, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        return await create._run(args, items, {}, fd, headers, token, [])
    finally:
        os.close(fd)


async def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    source = out / "instances.jsonl"
    kinds = args.kinds
    created, results = out / "created.jsonl", out / "results.jsonl"
    # A throwaway token: the emulator accepts exactly this one.
    token = secrets.token_urlsafe(24)
    faults = Faults.parse(["500=2%", "503=1%", "502=1%", "drop=0.5%"], latency="0..20ms")
    config = EmulatorConfig(
        tokens=(token,),
        limit=Limit.parse("1200/1s"),
        faults=faults,
        seed=args.seed,
        instances=InstanceModel(event_type=EVENT_TYPE, timeout=3600.0),
    )

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr)

    async with Emulator(config) as emu:
        say(
            f"dispatcher demo: emulator at {emu.base_url} (faults: {faults.describe()})\n"
            f"1. create {args.instances:,} instances of {WORKFLOW!r} from {source}: "
            f"{kinds['waits']:,} will wait for {EVENT_TYPE!r}, {kinds['other']:,} for "
            f"{OTHER_TYPE!r}, {kinds['expired']:,} have timed out (errored)"
        )
        create_code = await _create(emu, token, source, created, args.rate)
        say(
            f"2. send --instances-of {WORKFLOW} --waiting-for {EVENT_TYPE} "
            f"--event-type {EVENT_TYPE}"
        )
        settings = SendSettings(
            inputs=(),
            instances_of=WORKFLOW,
            waiting_for=EVENT_TYPE,
            event_type=EVENT_TYPE,
            body=b'{"paid": true}',
            account_id=ACCOUNT,
            base_url=emu.base_url,
            credentials=Credentials(token=token),
            rate=parse_rate(args.rate),
            concurrency=args.concurrency,
            results=str(results),
            quiet=args.quiet,
            progress="off",
            overwrite=True,
        )
        stats = await _main(settings)
        if not args.quiet:
            print(format_summary(stats, str(results)), file=sys.stderr)
        made = emu.log.creations
        twice = sum(1 for n in made.values() if n > 1)
        say(
            f"  emulator   created {len(made):,} distinct instances, {twice:,} more than once; "
            f"accepted {len(emu.log.accepted):,} distinct events"
        )
        say(f"3. verify {results}")
        rate = parse_rate(args.rate)
        plan = VerifyPlan(
            results=str(results),
            out=out_path_for(str(results)),
            target="api",
            base_url=emu.base_url,
            account_id=ACCOUNT,
            headers={"Authorization": f"Bearer {token}"},
            rate=None if isinstance(rate, str) else rate.per_second,
            rate_text=args.rate,
            wait_up_to=10.0,
        )
        summary = await verify_file(plan, io.StringIO() if args.quiet else sys.stderr)
    codes = (create_code, exit_code(stats), verify_exit_code(summary), 1 if twice else 0)
    return next((c for c in codes if c), 0)


def run(args: argparse.Namespace) -> int:
    if args.instances < 1:
        print("dispatcher demo: error: --instances must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.kinds = write_instances(out / "instances.jsonl", args.instances)
    code: int = anyio.run(_demo, args, backend="asyncio")
    return code
