"""`dispatcher verify RESULTS`: did the workflows use the events that `send` confirmed?

For every ``confirmed`` record of a send results file, the instance is read once
(``GET …/instances/{id}``, steps included; records of one instance share the read) and
the record classed as :mod:`dispatcher.results.verify` says. Records that were never
confirmed get a ``not_verified`` line and cost nothing. Reads pass one rate gate
(:class:`~dispatcher.sending.gate.RateGate`, default 1200/5m for the API); a 429 pauses
every read for its ``Retry-After``. With ``--wait-up-to``, records still ``waiting`` (or
``no_waiter`` on an instance that runs on) are read again every few seconds until they
move or the time is up. One line per record is written to ``--results-out``.

:func:`verify_results` is the async API (what ``send --verify`` can call after a run).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO
from urllib.parse import quote

import aiohttp
import orjson

from dispatcher.clients.answer import read_answer
from dispatcher.clients.targets import WRANGLER_DEV_API_PATH, WRANGLER_DEV_BASE_URL
from dispatcher.inputs.validation import RuleViolation, check_path
from dispatcher.model import Delivery, Envelope, UserError
from dispatcher.results import lock as results_lock
from dispatcher.results.ledger import read_envelopes
from dispatcher.results.verify import Verdict, VerifyClass, classify, classify_failure
from dispatcher.run.settings import parse_duration, parse_rate
from dispatcher.sending.gate import RateGate

__all__ = [
    "InstanceReader",
    "VerifyPlan",
    "VerifySummary",
    "exit_code",
    "verify_file",
    "verify_results",
]

PROG: Final = "dispatcher verify"
DEFAULT_BASE_URL: Final = "https://api.cloudflare.com/client/v4"
DEFAULT_API_RATE: Final = "1200/5m"
RECHECK_EVERY_S: Final = 5.0
READERS: Final = 8  # reads in flight at once; the gate sets the pace
TRIES: Final = 4  # per read, for 429s, 5xx and lost answers
MAX_RETRY_AFTER_S: Final = 600.0
# The real API says 10400 for an unknown instance, wrangler dev 10501 (docs/instances.md).
UNKNOWN_INSTANCE_CODES: Final = frozenset({10400, 10501})
TARGETS: Final = ("api", "wrangler-dev")
EXIT_ALL_CONSUMED: Final = 0
EXIT_NOT_ALL_CONSUMED: Final = 1


class VerifyInputError(UserError):
    exit_code = 2


Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


class InstanceReader:
    """Reads one instance with its steps: ``(http status, envelope or None)``, 0: no answer.

    Every attempt passes ``gate``; a 429 pauses the gate for its ``Retry-After`` (capped).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        gate: RateGate,
        *,
        target: str,
        base_url: str,
        account_id: str | None,
    ) -> None:
        base = base_url.rstrip("/")
        if target == "wrangler-dev":
            self._prefix = f"{base}{WRANGLER_DEV_API_PATH}/workflows/"
        else:
            self._prefix = f"{base}/accounts/{quote(account_id or '', safe='')}/workflows/"
        self._session = session
        self.gate = gate
        self.requests = 0

    def url(self, workflow: str, instance_id: str) -> str:
        return f"{self._prefix}{quote(workflow, safe='')}/instances/{quote(instance_id, safe='')}"

    async def read(self, workflow: str, instance_id: str) -> tuple[int, Any]:
        url = self.url(workflow, instance_id)
        status, doc = 0, None
        for attempt in range(TRIES):
            await self.gate.acquire()
            self.requests += 1
            retry_after: float | None = None
            try:
                async with self._session.get(url, allow_redirects=False) as resp:
                    answer = await read_answer(resp)
                status, doc, retry_after = answer.status, answer.doc, answer.retry_after
            except (aiohttp.ClientError, TimeoutError):
                status, doc = 0, None
            if status == 429:
                self.gate.pause_for(min(retry_after or 60.0, MAX_RETRY_AFTER_S))
                continue
            if status == 0 or status >= 500:
                if attempt + 1 < TRIES:
                    await asyncio.sleep(0.5 * 2**attempt)
                continue
            return status, doc
        return status, doc


@dataclass(slots=True)
class VerifySummary:
    """What :func:`verify_results` found: records by class, and what it cost."""

    counts: dict[str, int] = field(default_factory=dict)
    confirmed: int = 0
    requests: int = 0

    @property
    def all_consumed(self) -> bool:
        return self.confirmed > 0 and self.counts.get(VerifyClass.CONSUMED, 0) == self.confirmed


@dataclass(slots=True)
class _Record:
    env: Envelope
    verdict: Verdict | None = None
    reads: int = 0


def _line(rec: _Record, checked_at: datetime) -> bytes:
    env, v = rec.env, rec.verdict
    assert v is not None
    doc: dict[str, Any] = {
        "key": env.key,
        "workflow": env.workflow,
        "instance_id": env.instance_id,
        "event_type": env.event_type,
        "class": v.cls,
        "reason": v.reason,
        "delivery": env.delivery,
        "sent_at": None if env.started_at is None else env.started_at.isoformat(),
        "instance_status": v.status,
        "step": v.step,
        "step_end": v.step_end,
        "typed": v.typed,
        "reads": rec.reads,
        "checked_at": checked_at.isoformat(),
    }
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


async def verify_results(
    envelopes: Iterable[Envelope],
    reader: InstanceReader,
    write: Callable[[bytes], None],
    *,
    workflow: str | None = None,
    wait_up_to: float = 0.0,
    recheck_every: float = RECHECK_EVERY_S,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> VerifySummary:
    """Class every record of ``envelopes``; ``write`` gets one JSONL line per record.

    Confirmed records are read through ``reader`` (one read per instance per round);
    ``workflow`` names the workflow of records that name none. Records still pending
    (``waiting``, or ``no_waiter`` on a running instance) are read again every
    ``recheck_every`` s until ``wait_up_to`` s have passed on ``clock``. A record's line is
    written once its class is final. ``send`` can call this with its own envelopes.
    """
    summary = VerifySummary()
    groups: dict[tuple[str, str], list[_Record]] = {}

    def done(rec: _Record) -> None:
        assert rec.verdict is not None
        cls = str(rec.verdict.cls)
        summary.counts[cls] = summary.counts.get(cls, 0) + 1
        write(_line(rec, datetime.now(UTC)))

    for env in envelopes:
        rec = _Record(env)
        if env.delivery is not Delivery.CONFIRMED:
            rec.verdict = Verdict(
                cls=VerifyClass.NOT_VERIFIED,
                reason=f"delivery was {env.delivery}, not confirmed: nothing to read",
            )
            done(rec)
            continue
        summary.confirmed += 1
        wf = env.workflow or workflow
        if wf is None or env.instance_id is None or env.event_type is None:
            rec.verdict = Verdict(
                cls=VerifyClass.UNKNOWN,
                reason="the record names no workflow (give --workflow), instance or event type",
            )
            done(rec)
            continue
        groups.setdefault((wf, env.instance_id), []).append(rec)

    started = clock()
    todo = list(groups)
    requests_before = reader.requests
    while True:
        await _read_round(reader, groups, todo)
        pending: list[tuple[str, str]] = []
        for key in todo:
            waiting = [r for r in groups[key] if r.verdict is not None and r.verdict.pending]
            for rec in groups[key]:
                if rec not in waiting:
                    done(rec)
            if waiting:
                groups[key] = waiting
                pending.append(key)
        todo = pending
        if not todo or clock() - started + recheck_every > wait_up_to:
            break
        await sleep(recheck_every)
    for key in todo:
        for rec in groups[key]:
            done(rec)
    summary.requests = reader.requests - requests_before
    return summary


async def _read_round(
    reader: InstanceReader,
    groups: Mapping[tuple[str, str], list[_Record]],
    keys: list[tuple[str, str]],
) -> None:
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)

    async def worker() -> None:
        while True:
            try:
                key = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            status, doc = await reader.read(*key)
            ok = 200 <= status < 300 and isinstance(doc, dict) and doc.get("success") is True
            result = doc.get("result") if ok and isinstance(doc, dict) else None
            for rec in groups[key]:
                rec.reads += 1
                env = rec.env
                if isinstance(result, dict):
                    assert env.event_type is not None
                    rec.verdict = classify(
                        result, env.event_type, env.started_at or env.finished_at
                    )
                elif ok:
                    rec.verdict = Verdict(
                        cls=VerifyClass.UNKNOWN, reason="the answer holds no instance object"
                    )
                else:
                    rec.verdict = classify_failure(
                        status, doc, unknown_codes=UNKNOWN_INSTANCE_CODES
                    )

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(READERS, len(keys))):
            tg.create_task(worker())


# -- the command ----------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("results", metavar="RESULTS", help="a `dispatcher send` results file (JSONL or SQLite)")
    add("--workflow", default=None, help="the workflow of records that name none")
    add(
        "--results-out",
        default=None,
        metavar="FILE",
        help="JSONL, one line per record (default: RESULTS with .verify.jsonl)",
    )
    add(
        "--wait-up-to",
        default="0s",
        metavar="DURATION",
        help="read waiting records again until they move, for up to this long (e.g. 5m)",
    )
    add("--rate", default=None, help=f"reads per period (default: {DEFAULT_API_RATE} for api)")
    add("--target", default="api", choices=TARGETS, help="where to read instances (default: api)")
    add(
        "--base-url",
        default=None,
        help="API base URL (default: CLOUDFLARE_BASE_URL or the real API; wrangler dev: "
        f"{WRANGLER_DEV_BASE_URL})",
    )
    add(
        "--account-id",
        default=os.environ.get("CLOUDFLARE_ACCOUNT_ID"),
        help="account id (default: CLOUDFLARE_ACCOUNT_ID)",
    )


def out_path_for(results: str) -> str:
    root, ext = os.path.splitext(results)
    return f"{root if ext in {'.jsonl', '.sqlite', '.sqlite3', '.db'} else results}.verify.jsonl"


def _rate(text: str | None, target: str) -> float | None:
    if text is None:
        text = DEFAULT_API_RATE if target == "api" else "unlimited"
    try:
        rate = parse_rate(text)
    except ValueError as exc:
        raise VerifyInputError(f"--rate: {exc}") from None
    if rate == "auto":
        raise VerifyInputError("--rate: give a number per period, like 1200/5m, or unlimited")
    return None if rate == "unlimited" else rate.per_second


def _minutes(requests: int, rate: float | None, rate_text: str) -> str:
    if rate is None:
        return "no rate limit"
    return f"{requests / rate / 60:.1f} min at {rate_text}"


def _summary_table(summary: VerifySummary) -> str:
    order = [str(c) for c in VerifyClass]
    total = sum(summary.counts.values())
    rows = [f"{'class':<14} {'records':>8}"]
    for cls in order:
        n = summary.counts.get(cls, 0)
        if n or cls != VerifyClass.NOT_VERIFIED:
            rows.append(f"{cls:<14} {n:>8}")
    rows.append(f"{'total':<14} {total:>8}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    target = args.target
    try:
        wait_up_to = parse_duration(args.wait_up_to)
    except ValueError as exc:
        raise VerifyInputError(f"--wait-up-to: {exc}") from None
    rate = _rate(args.rate, target)
    rate_text = args.rate or DEFAULT_API_RATE
    if args.workflow is not None:
        try:
            check_path(args.workflow, "i", "e")
        except RuleViolation as exc:
            raise VerifyInputError(f"--workflow: {exc.message}") from None
    headers: dict[str, str] = {}
    if target == "api":
        base_url = args.base_url or os.environ.get("CLOUDFLARE_BASE_URL") or DEFAULT_BASE_URL
        if not args.account_id:
            raise VerifyInputError("--account-id: not set (nor CLOUDFLARE_ACCOUNT_ID)")
        token = os.environ.get("CLOUDFLARE_API_TOKEN")
        if not token:
            raise VerifyInputError("CLOUDFLARE_API_TOKEN: not set")
        headers = {"Authorization": f"Bearer {token}"}
    else:
        base_url = args.base_url or WRANGLER_DEV_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise VerifyInputError(f"--base-url: {base_url!r} is not an http(s) URL")
    results = args.results
    if results == "-" or not os.path.isfile(results):
        raise VerifyInputError(f"RESULTS {results}: no such results file")
    out = args.results_out or out_path_for(results)
    if os.path.abspath(out) == os.path.abspath(results):
        raise VerifyInputError("--results-out: must not be RESULTS itself")
    plan = VerifyPlan(
        results=results,
        out=out,
        target=target,
        base_url=base_url,
        account_id=args.account_id,
        headers=headers,
        rate=rate,
        rate_text=rate_text,
        wait_up_to=wait_up_to,
        workflow=args.workflow,
    )
    summary = asyncio.run(verify_file(plan, sys.stdout))
    return exit_code(summary)


def exit_code(summary: VerifySummary) -> int:
    """0 when every confirmed record is ``consumed`` (and there is one), else 1."""
    return EXIT_ALL_CONSUMED if summary.all_consumed else EXIT_NOT_ALL_CONSUMED


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyPlan:
    """What to verify and how to read: the checked flags of ``verify`` (or ``send --verify``)."""

    results: str
    out: str
    target: str
    base_url: str
    account_id: str | None
    headers: Mapping[str, str] = field(repr=False)  # credentials: never in a repr
    rate: float | None
    rate_text: str
    wait_up_to: float = 0.0
    workflow: str | None = None
    prog: str = PROG


def cost_line(plan: VerifyPlan, envelopes: list[Envelope]) -> str:
    """What verifying ``envelopes`` costs in requests (and minutes at the plan's rate)."""
    confirmed = [e for e in envelopes if e.delivery is Delivery.CONFIRMED]
    instances = len({(e.workflow or plan.workflow, e.instance_id) for e in confirmed})
    cost = f"{plan.prog}: {len(envelopes)} record(s), {len(confirmed)} confirmed, on "
    cost += f"{instances} instance(s): {instances} request(s), "
    cost += _minutes(instances, plan.rate, plan.rate_text)
    if plan.wait_up_to > 0:
        extra = (
            "" if plan.rate is None else f", at most {math.floor(plan.rate * plan.wait_up_to)} more"
        )
        cost += f"; --wait-up-to re-reads pending ones every {RECHECK_EVERY_S:g} s{extra}"
    return cost


async def verify_file(plan: VerifyPlan, out: TextIO, gate: RateGate | None = None) -> VerifySummary:
    """Verify every record of ``plan.results``: the cost line, then one JSONL line per record
    in ``plan.out`` (locked meanwhile), then the table by class on ``out``.

    ``gate`` (default: one at ``plan.rate``) paces the reads. Raises
    :class:`~dispatcher.results.ledger.LedgerError` (naming the file and line) for a
    results file that cannot be read.
    """
    envelopes = list(read_envelopes(plan.results))
    print(cost_line(plan, envelopes), file=out, flush=True)
    held = results_lock.acquire(plan.out)
    try:
        fd = os.open(plan.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:

            def write(line: bytes) -> None:
                os.write(fd, line)

            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(headers=plan.headers, timeout=timeout) as session:
                reader = InstanceReader(
                    session,
                    gate if gate is not None else RateGate(plan.rate),
                    target=plan.target,
                    base_url=plan.base_url,
                    account_id=plan.account_id,
                )
                summary = await verify_results(
                    envelopes, reader, write, workflow=plan.workflow, wait_up_to=plan.wait_up_to
                )
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if held is not None:
            held.release()
    print(_summary_table(summary), file=out)
    print(f"{plan.prog}: {summary.requests} request(s); lines in {plan.out}", file=out, flush=True)
    return summary
