"""`dispatcher instances list`: the selection `send --instances-of` would send to, as ids.

    dispatcher instances list --workflow W [--status S] [--waiting-for TYPE] [--out ids.txt]

The same listing as ``send --instances-of`` (pages of 100 by cursor, one step read per
instance with ``--waiting-for``, every GET through a gate at ``--rate``), written as an
id list: one id a line, after one ``#`` comment line saying what was selected, which
`dispatcher send ids.txt --workflow W --event-type T` reads (comment lines are skipped).
Records sent from it get the same keys as with ``--instances-of``, so either resumes the
other. The file is written beside its name and renamed at the end: an interrupted listing
leaves no half file. Exit codes: 0 written (also when none matched), 2 a flag, the
credentials or the listing itself is wrong (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Final

import anyio

from dispatcher.run.config import load_send_settings
from dispatcher.run.settings import INSTANCE_STATUSES, ConfigError, SendSettings

PROG: Final = "dispatcher instances list"


def configure(parser: argparse.ArgumentParser) -> None:
    # A positional, not sub-commands: the CLI parses every command's flags intermixed,
    # which argparse cannot do across sub-parsers.
    parser.add_argument("action", choices=("list",), metavar="list", help="list instances")
    add = parser.add_argument
    add("--workflow", required=True, metavar="NAME", help="the workflow whose instances to list")
    add(
        "--status",
        dest="instance_status",
        default=None,
        choices=INSTANCE_STATUSES,
        metavar="STATUS",
        help="the list endpoint's filter (an instance parked in waitForEvent lists as running)",
    )
    add(
        "--waiting-for",
        default=None,
        metavar="TYPE",
        help="only instances with an unfinished waitForEvent of TYPE (one step read each)",
    )
    add("--out", default="-", metavar="PATH", help="the ids file to write (default: stdout)")
    add("--target", default=None, choices=("api", "wrangler-dev"), help="default: api")
    add("--base-url", default=None, metavar="URL", help="env CLOUDFLARE_BASE_URL")
    add("--account-id", default=None, metavar="ID", help="env CLOUDFLARE_ACCOUNT_ID")
    add("--token-file", default=None, metavar="PATH", help="else CLOUDFLARE_API_TOKEN")
    add("--rate", default=None, help="GETs per period (default: the target's, 1200/5m for api)")
    add("--config", default=None, metavar="PATH", help="the TOML file send reads")


def _settings(args: argparse.Namespace) -> SendSettings:
    ns = argparse.Namespace(**vars(args))
    ns.instances_of = args.workflow
    ns.workflow = None
    ns.inputs = []
    # Not sent: a listing derives no keys, but the settings of a send need a type.
    ns.event_type = args.waiting_for or "listing"
    try:
        return load_send_settings(ns, os.environ)
    except ConfigError as exc:
        if exc.where == "--instances-of":
            raise ConfigError("--workflow", exc.message) from None
        raise


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from dispatcher.run.instances import Verdict, survey

    out_path: str = args.out
    tmp = None if out_path == "-" else f"{out_path}.part"
    out = sys.stdout.buffer if tmp is None else open(tmp, "wb")  # noqa: SIM115
    what = f"workflow {settings.instances_of}"
    if settings.instance_status:
        what += f", status {settings.instance_status}"
    if settings.waiting_for:
        what += f", waiting for {settings.waiting_for}"
    out.write(f"# dispatcher instances list: {what}\n".encode())

    def on_page(page: list[tuple[str, str, Verdict]]) -> None:
        out.write(b"".join(f"{iid}\n".encode() for iid, _status, v in page if v.send))

    try:
        cost, _ = anyio.run(lambda: survey(settings, on_page=on_page), backend="asyncio")
    except BaseException:
        if tmp is not None:
            out.close()
            os.unlink(tmp)
        raise
    if tmp is not None:
        out.flush()
        os.fsync(out.fileno())
        out.close()
        os.replace(tmp, out_path)
    else:
        out.flush()
    skipped = ", ".join(f"{n:,} {rule}" for rule, n in sorted(cost.skipped.items()))
    print(
        f"{PROG}: {cost.to_send:,} of {cost.listed:,} listed instances selected"
        + (f" ({skipped} left out)" if skipped else "")
        + f"; {cost.list_requests:,} list requests, {cost.read_requests:,} step reads"
        + ("" if tmp is None else f"; written to {out_path}"),
        file=sys.stderr,
    )
    return 0
