"""Command-line entry point: `dispatcher <command> ...`.

Each command lives in its own module exposing ``configure(parser)`` and ``run(args)``.
Only the module of the command being run is imported: the others pull in libraries
(plotting, histograms, SQLite) that would cost a long `send` memory and start-up time.

:func:`main` is the one place that turns the project's own errors
(:class:`~dispatcher.model.UserError` and its subclasses) into one line on stderr and
their exit code; no command needs to catch them for that. Exit codes shared by every
command: 2 usage, input or config mistake; 130 interrupted; 141 stdout closed early
(``dispatcher report r.jsonl | head``), as a Unix tool killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Final, NoReturn

from dispatcher.model import UserError

EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "send": ("dispatcher.commands.send", "send events from JSONL, CSV or id-list files"),
    "create": ("dispatcher.commands.create", "create Workflow instances in bulk, once each"),
    "verify": (
        "dispatcher.commands.verify",
        "read the instances of confirmed events: consumed, waiting, no_waiter, ended",
    ),
    "instances": (
        "dispatcher.commands.instances",
        "list instances (those waiting for an event) as an ids file for send",
    ),
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

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)")
_INVALID_CHOICE = re.compile(r"argument COMMAND: invalid choice: '(?P<value>[^']*)'")


class Parser(argparse.ArgumentParser):
    """An argument parser that takes no abbreviations and suggests the flag meant.

    ``--workf`` is an error, not ``--workflow``: an abbreviation that works today breaks
    silently when a flag sharing its prefix is added. Subparsers are built with this class
    too (argparse uses the parent's class), so the rule holds for every command.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commands: dict[str, Parser] = {}  # the top level's parser of each command
        # `--duration -5s`, `--rate -4/s`: a value that starts with '-' and a digit is a
        # value (argparse takes only plain numbers so, and said "expected one argument"),
        # so that the flag's own check names it. No flag of ours starts with '-' + digit.
        self._negative_number_matcher = re.compile(r"^-\d")

    def known_flags(self) -> list[str]:
        flags: list[str] = []
        for action in self._actions:
            flags += [opt for opt in action.option_strings if opt.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if isinstance(sub, Parser):
                        flags += sub.known_flags()
        return flags

    def error(self, message: str) -> NoReturn:
        choice = _INVALID_CHOICE.search(message)
        if choice is not None:
            close = difflib.get_close_matches(choice["value"], list(COMMANDS), n=1)
            if close:
                message = f"{message}; did you mean {close[0]}?"
        match = _UNRECOGNIZED.search(message)
        if match is not None:
            known = sorted(set(self.known_flags()))
            hints: dict[str, str] = {}
            for token in match["args"].split():
                if token.startswith("--"):
                    name = token.split("=", 1)[0]
                    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                    if close:
                        hints[name] = close[0]
            if len(hints) == 1:
                message = f"{message}; did you mean {next(iter(hints.values()))}?"
            elif hints:
                meant = ", ".join(f"{close} for {name}" for name, close in hints.items())
                message = f"{message}; did you mean {meant}?"
        # One line, as for every other mistake (argparse would print the usage first).
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


DISTRIBUTION: Final = "cf-workflows-dispatcher"
"""The name on the package index (``dispatcher`` there is an unrelated library)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(only: str | None = None) -> Parser:
    """The parser; with ``only``, just that command's arguments are set up."""
    parser = Parser(
        prog="dispatcher",
        description="Send events to Cloudflare Workflows instances in bulk.",
    )
    parser.add_argument("--version", action="version", version=f"dispatcher {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        parser.commands[name] = cmd
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.configure(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def user_error(exc: BaseException) -> UserError | None:
    """The project's own error behind ``exc``, also when a task group wrapped it."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = user_error(inner)
            if found is not None:
                return found
    return None


def _file_error(exc: BaseException) -> OSError | None:
    """An error opening a file the user named, also inside a task group's group."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return exc
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _file_error(exc.exceptions[0])
    return None


def _only_broken_pipe(exc: BaseExceptionGroup[BaseException]) -> bool:
    """A task group's error that is a closed stdout and nothing else."""
    rest = exc.split(BrokenPipeError)[1]
    return rest is None and exc.subgroup(BrokenPipeError) is not None


def stdout_gone() -> int:
    """Exit code 141 for a closed stdout, which further writes (and the interpreter's last
    flush) must not trip over again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    command = args_list[0] if args_list and args_list[0] in COMMANDS else None
    prog = f"dispatcher {command}" if command else "dispatcher"
    try:
        parser = build_parser(command)
        if command is None:
            args = parser.parse_args(args_list)  # --help, --version or a mistake
        else:
            # The command's own parser, so that a mistake names it and its flags (the top
            # level would say `dispatcher`), and intermixed: `send a.jsonl --workflow wf
            # b.jsonl` sends both files, where argparse would take b.jsonl for a stray.
            args = parser.commands[command].parse_intermixed_args(args_list[1:])
            args.command = command
        args._argv = args_list  # for the "to finish" command a stopped run prints
        code: int = args._run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return stdout_gone()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and _only_broken_pipe(exc):
            return stdout_gone()  # `--results - | head` inside a task group
        found = user_error(exc)
        if found is not None:
            print(f"{prog}: error: {found}", file=sys.stderr)
            return found.exit_code
        named = _file_error(exc)
        if named is None:
            if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt):
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            raise
        print(f"{prog}: error: {named.filename}: {named.strerror or named}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # A file the user named cannot be read or written (a --plot path in a missing
        # folder, a full disk): their problem to fix, said in one line.
        if exc.filename is None:
            raise
        print(f"{prog}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
