"""Command-line entry point: `dispatcher <command> ...`.

Each command lives in its own module exposing ``configure(parser)`` and ``run(args)``.
Only the module of the command being run is imported: the others pull in libraries
(plotting, histograms, SQLite) that would cost a long `send` memory and start-up time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "send": ("dispatcher.commands.send", "send events from JSONL, CSV or id-list files"),
    "demo": ("dispatcher.commands.demo", "run the whole job against the embedded emulator"),
    "emulate": ("dispatcher.emulator.cli", "serve the Cloudflare Workflows API emulator"),
    "report": (
        "dispatcher.commands.report",
        "summarise results files: outcomes, latency, throughput",
    ),
    "load": ("dispatcher.commands.load", "load-test a workflow at a known arrival rate"),
    "status": (
        "dispatcher.commands.status",
        "show a shared --job in Redis: progress, rate, pauses, live workers",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that command's arguments are set up."""
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="Send events to Cloudflare Workflows instances in bulk.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.configure(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    command = args_list[0] if args_list and args_list[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(args_list)
    code: int = args._run(args)
    return code
