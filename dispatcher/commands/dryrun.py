"""`dispatcher send --dry-run`: read and check everything, send nothing, say what would go.

The inputs are read by the same readers as a real run
(:func:`dispatcher.inputs.records.read_batches` with
:func:`dispatcher.run.runner.read_options`), so a line invalid here is invalid there. The
sample requests are built with the clients' own :class:`~dispatcher.clients.base.UrlBuilder`
and headers, with the credential replaced by ``<redacted>``. No connection is opened.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Final, TextIO

from dispatcher.clients.base import USER_AGENT
from dispatcher.clients.targets import event_url
from dispatcher.inputs.keys import KeyDeriver
from dispatcher.inputs.records import InputError, detect_format, read_batches
from dispatcher.model import Delivery, Event, Invalid
from dispatcher.results.ledger import KeyState, LedgerError, load_ledger
from dispatcher.run import runner
from dispatcher.run.settings import DEFAULT_BASE_URL, DEFAULT_RATE, Rate, SendSettings

__all__ = ["add_dry_run_argument", "dry_run", "estimate_seconds", "format_seconds"]

EXIT_OK: Final = 0
EXIT_INVALID: Final = 1
EXIT_USAGE: Final = 2
MAX_INVALID_SHOWN: Final = 20
SAMPLE_REQUESTS: Final = 3
_MAX_BODY_SHOWN: Final = 400  # characters of a sample body; the rest is summarised
_REDACTED: Final = "<redacted>"
# A guess for --rate unlimited, said out loud: the API answers in about this long.
_ASSUMED_LATENCY_S: Final = 0.1


def _resume_ledger(settings: SendSettings, out: TextIO) -> dict[str, KeyState] | None:
    """The earlier results a ``--resume`` dry run counts against ({} without --resume);
    None (the error printed on ``out``) when they cannot be read."""
    if not settings.resume:
        return {}
    try:
        return load_ledger(settings.results, on_torn=lambda torn: None)
    except LedgerError as exc:
        print(f"dispatcher send --dry-run: error: cannot resume: {exc}", file=out)
        return None


def add_dry_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=False,
        help="read and validate every input, print counts by workflow and event type, the "
        "invalid lines, the first requests as they would go out (credentials redacted) and "
        "how long the run would take; send nothing",
    )


def format_seconds(seconds: float) -> str:
    """``42s``, ``5m00s``, ``2h03m``, ``3d04h``: the precision a person plans with."""
    s = round(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def estimate_seconds(requests: int, settings: SendSettings) -> float | None:
    """Seconds ``requests`` first attempts take at the run's rate; None if no rate is set."""
    if isinstance(settings.rate, Rate):
        return requests / settings.rate.per_second
    return None


def _redacted_headers(settings: SendSettings, has_body: bool) -> list[tuple[str, str]]:
    headers = [("User-Agent", USER_AGENT)]
    auth = settings.credentials.headers() if settings.credentials is not None else {}
    if settings.target == "relay":
        auth = {"Authorization": "Bearer relay-secret"}
    for name, value in auth.items():
        if name.lower() == "authorization":
            # Keep the scheme: "Bearer" tells the reader which credential kind is used.
            scheme = value.split(" ", 1)[0]
            headers.append((name, f"{scheme} {_REDACTED}"))
        else:
            headers.append((name, _REDACTED))
    if has_body:
        headers.append(("Content-Type", "application/json"))
    return headers


def _body_text(body: bytes | None) -> str:
    if body is None:
        return "(no body)"
    text = body.decode("utf-8", "replace")
    if len(text) <= _MAX_BODY_SHOWN:
        return text
    return f"{text[:_MAX_BODY_SHOWN]}… ({len(body):,} bytes in all)"


def _time_line(requests: int, settings: SendSettings) -> str:
    rate = settings.rate
    if isinstance(rate, Rate):
        return (
            f"about {format_seconds(requests / rate.per_second)} for {requests:,} requests "
            f"at {rate} ({rate.per_second:g}/s); more if requests are retried or a 429 "
            "pauses the run"
        )
    per_s = settings.concurrency / _ASSUMED_LATENCY_S
    guess = format_seconds(requests / per_s) if requests else "0s"
    return (
        f"rate {settings.rate}: it depends on the API's latency and --concurrency "
        f"{settings.concurrency}; at {_ASSUMED_LATENCY_S * 1000:g} ms a request, "
        f"about {guess} for {requests:,} requests"
    )


def dry_run(
    settings: SendSettings,
    out: TextIO,
    *,
    max_invalid: int = MAX_INVALID_SHOWN,
    needs: list[str] | tuple[str, ...] = (),
) -> int:
    """Read and check ``settings.inputs``, print what a run would send; send nothing.

    ``needs`` lists what a real run would still need (from
    :func:`dispatcher.run.config.load_send_settings`): a preview needs no credentials.
    Returns 0 if every line is valid, 1 if some are not, 2 if an input cannot be read.
    """
    options = runner.read_options(settings)
    keys = KeyDeriver()
    by_target: Counter[tuple[str, str]] = Counter()
    invalid_total = 0
    invalid_shown: list[Invalid] = []
    samples: list[Event] = []
    skipped: Counter[str] = Counter()
    lines = 0
    formats: list[str] = []
    ledger = _resume_ledger(settings, out)
    if ledger is None:
        return EXIT_USAGE
    try:
        for path in settings.inputs:
            fmt = detect_format(path, settings.format)
            formats.append(f"{path} ({fmt})")
            for batch in read_batches(path, fmt, options, keys):
                for record in batch:
                    lines += 1
                    if settings.resume:
                        # The rule a resumed run applies, so the counts match what it sends.
                        reason = runner.skip_reason(record, ledger.get(record.key), settings)
                        if reason is not None:
                            skipped[reason] += 1
                            continue
                    if isinstance(record, Invalid):
                        invalid_total += 1
                        if len(invalid_shown) < max_invalid:
                            invalid_shown.append(record)
                        continue
                    by_target[record.workflow, record.event_type] += 1
                    if len(samples) < SAMPLE_REQUESTS:
                        samples.append(record)
    except InputError as exc:
        print(f"dispatcher send --dry-run: error: {exc}", file=out)
        return EXIT_USAGE

    valid = sum(by_target.values())
    w = out.write
    w("dispatcher send --dry-run: nothing was sent\n")
    w(f"  inputs     {', '.join(formats)}\n")
    w(f"  records    {lines:,} read: {valid:,} to send, {invalid_total:,} invalid")
    w(f", {sum(skipped.values()):,} skipped by --resume\n" if settings.resume else "\n")
    for reason, count in sorted(skipped.items()):
        w(f"  skipped    {count:,} {reason}\n")
    if by_target:
        wf_width = max(len("workflow"), *(len(wf) for wf, _ in by_target))
        et_width = max(len("event type"), *(len(et) for _, et in by_target))
        w(f"\n  {'workflow':<{wf_width}}  {'event type':<{et_width}}  {'records':>9}\n")
        for (wf, et), count in sorted(by_target.items()):
            w(f"  {wf:<{wf_width}}  {et:<{et_width}}  {count:>9,}\n")
    if invalid_total:
        w(f"\ninvalid lines: {len(invalid_shown)} shown of {invalid_total:,}\n")
        for rec in invalid_shown:
            w(f"  {rec.source}:{rec.line}  [{rec.rule}] {rec.message}\n")
    if samples:
        w(f"\nfirst {len(samples)} request{'s' if len(samples) > 1 else ''} as they would go out\n")
        url = event_url(settings.target, settings.base_url, settings.account_id)
        for event in samples:
            line = (
                f"{settings.base_url}/events (in batches of up to {settings.batch_size})"
                if settings.target == "relay"
                else url(event.workflow, event.instance_id, event.event_type)
            )
            w(f"\n  POST {line}\n")
            for name, value in _redacted_headers(settings, event.body is not None):
                w(f"  {name}: {value}\n")
            w(f"  body: {_body_text(event.body)}\n")
    w(f"\n  time       {_time_line(valid, settings)}\n")
    if (
        settings.base_url == DEFAULT_BASE_URL
        and isinstance(settings.rate, Rate)
        and settings.rate.per_second > DEFAULT_RATE.per_second
    ):
        w(
            f"  warning    --rate {settings.rate} is above Cloudflare's global limit of "
            f"{DEFAULT_RATE} per user: expect 429s and a 5-minute lockout of the account\n"
        )
    w(f"  results    would go to {'stdout' if settings.results == '-' else settings.results}\n")
    for need in needs:
        w(f"  needs      a real run also needs {need}\n")
    return EXIT_INVALID if invalid_total else EXIT_OK


def instances_dry_run(
    settings: SendSettings, out: TextIO, *, needs: list[str] | tuple[str, ...] = ()
) -> int:
    """``send --dry-run --instances-of W``: read the selection (GETs only), send nothing,
    print the count and what a real run costs in requests and time. Exit 0, or 2 when the
    listing cannot be read (it raises :class:`~dispatcher.run.instances.ListingError`)."""
    import anyio

    from dispatcher.run.instances import survey

    if any(need.startswith("a token") or need.startswith("an account") for need in needs):
        print(
            "dispatcher send --dry-run: error: --instances-of: the listing is read even in a "
            f"dry run, and it needs {needs[0]}",
            file=out,
        )
        return EXIT_USAGE
    settled = None
    if settings.resume:
        ledger = _resume_ledger(settings, out)
        if ledger is None:
            return EXIT_USAGE

        def settled(key: str) -> bool:
            state = ledger.get(key)
            return state is not None and state.delivery is Delivery.CONFIRMED

    cost, _ = anyio.run(lambda: survey(settings, settled=settled), backend="asyncio")
    w = out.write
    w(
        "dispatcher send --dry-run: no event was sent; the selection was read with "
        f"{cost.list_requests + cost.read_requests:,} GET requests\n"
    )
    reads = f", {cost.read_requests:,} instances' steps read" if settings.waiting_for else ""
    w(f"  instances  {cost.listed:,} listed by {cost.list_requests:,} list requests{reads}\n")
    w(
        f"  to send    {cost.to_send:,} events of type {settings.event_type!r} to "
        f"workflow {settings.instances_of!r}\n"
    )
    for rule, count in sorted(cost.skipped.items()):
        w(f"  skipped    {count:,} {rule}\n")
    w(
        f"  cost       {cost.list_requests:,} list + {cost.read_requests:,} step reads + "
        f"{cost.to_send:,} sends = {cost.requests:,} requests (retries not counted)\n"
    )
    w(f"  time       {_time_line(cost.requests, settings)}\n")
    w(f"  results    would go to {'stdout' if settings.results == '-' else settings.results}\n")
    return EXIT_OK
