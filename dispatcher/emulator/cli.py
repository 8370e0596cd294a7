"""`dispatcher emulate`: serve the emulator from the shell until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from dispatcher.emulator.config import (
    DEFAULT_HOST,
    DEFAULT_LIMIT_SPEC,
    DEFAULT_PORT,
    EmulatorConfig,
    Limit,
)
from dispatcher.emulator.faults import Faults, parse_fault, parse_latency
from dispatcher.emulator.instances import InstanceModel
from dispatcher.emulator.reaction import Spread
from dispatcher.emulator.server import Emulator
from dispatcher.emulator.units import format_seconds, parse_duration, parse_share

PROG: Final = "dispatcher emulate"

_EPILOG: Final = """\
faults (probabilities per attempt, reproducible from --seed):
  --fault 500=5%     answer 500 with a Cloudflare envelope (code 10001)
  --fault 503=2%     answer 503 with an envelope
  --fault 502=1%     answer 502 text/html, as a proxy would
  --fault drop=1%    read the request, then close the connection without an answer
  --latency 20ms     add a fixed delay; --latency 0..50ms adds a uniform random one
  --faults-first 2   faults hit only the first 2 attempts of each event

examples:
  dispatcher emulate --port 0 --limit 200/1s
  dispatcher emulate --token secret --fault 500=5% --fault drop=1% --latency 0..50ms

"""


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's ValueError into argparse's error, which names the flag and exits 2."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (0..65535; 0 picks a free one)")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _lockout(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r}: the lockout must be longer than 0")
    return seconds


def _legacy_key(text: str) -> tuple[str, str]:
    email, sep, key = text.partition(":")
    if not sep or not email or not key:
        # The value is a secret: say what is wrong without repeating it.
        raise ValueError("expected EMAIL:KEY, both non-empty")
    return email, key


def _known_instances(text: str) -> frozenset[str]:
    try:
        lines = Path(text).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {text!r}: {exc}") from None
    return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))


def _per_second(text: str) -> float:
    """``40/s``, ``600/1m`` or ``40``: events per second, above 0."""
    number, sep, per = text.strip().partition("/")
    try:
        value = float(number)
        seconds = parse_duration(per if per[:1].isdigit() else f"1{per}") if sep else 1.0
    except ValueError:
        raise ValueError(f"{text!r} is not a rate (40/s, 600/1m)") from None
    if not (math.isfinite(value) and value > 0 and seconds > 0):
        raise ValueError(f"{text!r}: the rate must be above 0")
    return value / seconds


def _durations(text: str) -> tuple[float, ...]:
    return tuple(parse_duration(part) for part in text.split(",") if part.strip())


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    add = parser.add_argument
    add("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    add(
        "--port",
        type=_flag_type(_port),
        default=DEFAULT_PORT,
        help="port; 0 picks a free one (default: %(default)s)",
    )
    add(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="accepted API token (repeatable); none given: any non-empty token passes",
    )
    add(
        "--legacy-key",
        action="append",
        type=_flag_type(_legacy_key),
        default=[],
        metavar="EMAIL:KEY",
        help="accepted X-Auth-Email/X-Auth-Key pair (repeatable); none given: any pair passes",
    )
    add(
        "--limit",
        type=_flag_type(Limit.parse),
        default=Limit.parse(DEFAULT_LIMIT_SPEC),
        metavar="Q/W|off",
        help=f"Q requests per window W per credential, or off (default: {DEFAULT_LIMIT_SPEC})",
    )
    add(
        "--lockout",
        type=_flag_type(_lockout),
        default=None,
        metavar="DURATION",
        help="how long a credential is refused after exceeding the limit (default: the window)",
    )
    add(
        "--known-instances",
        type=_flag_type(_known_instances),
        default=None,
        metavar="FILE",
        help="file with one instance id a line; other ids get 404 code 10400",
    )
    add(
        "--lenient-ids",
        action="store_true",
        help="accept instance ids outside the name pattern (cron ids); length still checked",
    )
    add(
        "--fault",
        action="append",
        type=_flag_type(parse_fault),
        default=[],
        metavar="KIND=P",
        help="inject a fault: KIND is 500, 502, 503 or drop; P like 5%% or 0.05 (repeatable)",
    )
    add(
        "--latency",
        type=_flag_type(parse_latency),
        default=None,
        metavar="D|LOW..HIGH",
        help="added latency: fixed (20ms) or uniform random (0..50ms)",
    )
    add(
        "--faults-first",
        type=_flag_type(_positive_int),
        default=None,
        metavar="K",
        help="faults hit only the first K attempts of each event",
    )
    add(
        "--instances",
        default=None,
        metavar="EVENT_TYPE",
        help="model instances (create, list, get); each waits for EVENT_TYPE (default: off, "
        "event-only mode)",
    )
    add(
        "--wait-timeout",
        type=_flag_type(parse_duration),
        default=3600.0,
        metavar="DURATION",
        help="the model's waitForEvent timeout (default: 1h)",
    )
    add(
        "--wait-after",
        type=_flag_type(parse_duration),
        default=0.0,
        metavar="DURATION",
        help="how long after creation an instance starts to wait (default: 0s)",
    )
    add(
        "--steps",
        type=_flag_type(_durations),
        default=(),
        metavar="D,D,...",
        help="durations of the steps after the wait, e.g. 1s,500ms",
    )
    add(
        "--error-share",
        type=_flag_type(parse_share),
        default=0.0,
        metavar="P",
        help="share of instances that error in their last step, e.g. 5%% (default: 0)",
    )
    add(
        "--reaction",
        type=_flag_type(Spread.parse),
        default=None,
        metavar="DELAY",
        help="how long a wait takes to consume its event: 200ms (fixed), 200ms±50ms "
        "(uniform 150..250 ms; +- for ±) or 200ms~50ms (normal, sigma 50 ms) (default: at once)",
    )
    add(
        "--step-jitter",
        type=_flag_type(parse_duration),
        default=0.0,
        metavar="DURATION",
        help="each step lasts its --steps duration ± this, uniform (default: 0s)",
    )
    add(
        "--reaction-capacity",
        type=_flag_type(_per_second),
        default=None,
        metavar="RATE",
        help="the workflow consumes at most RATE events/s over all instances, one after "
        "the other, e.g. 40/s: past it the reaction climbs (default: no limit)",
    )
    add(
        "--never-consume",
        type=_flag_type(parse_share),
        default=0.0,
        metavar="P",
        help="share of instances whose wait never consumes its event, e.g. 1%% (default: 0)",
    )
    add(
        "--seed",
        type=_flag_type(_integer),
        default=0,
        help="seed for the faults (default: %(default)s)",
    )


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    """Raises ValueError naming the flag when values conflict with each other."""
    try:
        faults = Faults.from_flags(args.fault, args.latency, args.faults_first)
    except ValueError as exc:
        raise ValueError(f"--fault: {exc}") from None
    if args.instances is None:
        for flag, value in (
            ("--reaction", args.reaction is not None),
            ("--step-jitter", args.step_jitter),
            ("--never-consume", args.never_consume),
            ("--reaction-capacity", args.reaction_capacity is not None),
        ):
            if value:
                raise ValueError(f"{flag} models instances: give --instances EVENT_TYPE too")
    return EmulatorConfig(
        tokens=tuple(args.token),
        legacy_keys=tuple(args.legacy_key),
        limit=args.limit,
        lockout=args.lockout,
        known_instances=args.known_instances,
        faults=faults,
        seed=args.seed,
        host=args.host,
        port=args.port,
        keep_requests=False,  # nobody can read the list from the shell; keep memory flat
        strict_ids=not args.lenient_ids,
        instances=None
        if args.instances is None
        else InstanceModel(
            event_type=args.instances,
            timeout=args.wait_timeout,
            wait_after=args.wait_after,
            steps=args.steps,
            error_share=args.error_share,
            reaction=args.reaction,
            step_jitter=args.step_jitter,
            never_consume=args.never_consume,
            capacity=args.reaction_capacity,
        ),
    )


def describe(config: EmulatorConfig, emulator: Emulator) -> list[str]:
    """The start banner. Names how many credentials are accepted, never which."""
    if config.tokens or config.legacy_keys:
        auth = f"{len(config.tokens)} token(s), {len(config.legacy_keys)} legacy key pair(s)"
    else:
        auth = "any non-empty token or X-Auth-Email/X-Auth-Key pair"
    limit = config.limit
    lockout = config.effective_lockout
    if limit is None or lockout is None:
        limits = "off"
    else:
        limits = (
            f"{limit.quota} requests per {format_seconds(limit.window)} s per credential "
            f"(fixed window), then locked out for {format_seconds(lockout)} s"
        )
    known = config.known_instances
    return [
        f"dispatcher emulator listening on {emulator.root_url}",
        f"  base URL:  {emulator.base_url}",
        f"  stats:     {emulator.stats_url}",
        f"  auth:      {auth}",
        f"  limit:     {limits}",
        f"  faults:    {config.faults.describe()} (seed {config.seed})",
        f"  instances: {'any' if known is None else f'{len(known)} known'}",
        "  model:     "
        + (
            "off (event-only)"
            if config.instances is None
            else f"wait for {config.instances.event_type!r}"
            + (
                ""
                if config.instances.reaction is None
                else f", consumed after {config.instances.reaction}"
            )
            + f", then {len(config.instances.steps)} step(s)"
            + (
                f" (± {format_seconds(config.instances.step_jitter)} s)"
                if config.instances.step_jitter
                else ""
            )
            + (
                f"; {config.instances.never_consume:.1%} never consume"
                if config.instances.never_consume
                else ""
            )
        ),
        "Ctrl-C to stop.",
    ]


async def serve(config: EmulatorConfig) -> Emulator:
    """Serve until SIGINT or SIGTERM; return the stopped emulator for its log."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        async with Emulator(config) as emulator:
            print("\n".join(describe(config, emulator)), flush=True)
            await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return emulator


def _summary(emulator: Emulator) -> str:
    log = emulator.log
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(log.status_counts.items(), key=str))
    duplicates = log.total_accepted() - len(log.accepted)
    return (
        f"stopped after {log.total_requests()} request(s) ({counts or 'none'}); "
        f"{log.total_accepted()} accepted, {duplicates} duplicate(s)"
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        uvloop = importlib.import_module("uvloop")  # the optional "speed" extra
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            emulator = runner.run(serve(config))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were in place: still a clean stop.
        return 0
    except OSError as exc:
        print(
            f"{PROG}: error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr
        )
        return 1
    print(_summary(emulator), flush=True)
    return 0
