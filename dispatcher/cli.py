"""Command-line entry point: `dispatcher <command> ...`.

Each command lives in its own module exposing ``configure(parser)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "send": ("dispatcher.send_cmd", "send events from JSONL, CSV or id-list files"),
    "demo": ("dispatcher.demo_cmd", "run the whole job against the embedded emulator"),
    "emulate": ("dispatcher.emulator.cli", "serve the Cloudflare Workflows API emulator"),
    "report": ("dispatcher.report_cmd", "summarise results files: outcomes, latency, throughput"),
    "load": ("dispatcher.load_cmd", "load-test a workflow at a known arrival rate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="Send events to Cloudflare Workflows instances in bulk.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    code: int = args._run(args)
    return code
