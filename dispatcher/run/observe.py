"""`load --observe`: how each observed instance reacted to its event.

Two sources of docs/load.md: with ``--target relay``, source 1, the relay's ``POST
/watch`` (one streaming request per group of observed instances, holding each one's
``instance.subscribe()``); with the other targets, source 2, the steps read after the fact
through REST or wrangler dev's local explorer. Both fill the same :class:`ObservedRow`.

The load hands every envelope to :meth:`Observer.offer`, which never waits: it takes a
sample (``--observe-sample``, every k-th confirmed event, so the sample is even over the
run) and queues a read for later. A few reader tasks read ``GET …/instances/{id}`` on
the observer's **own** aiohttp session, paced by its **own** leaky bucket at ``budget``
reads/s, so the sends' connection pool, workers and schedule are untouched. An instance
whose wait has not finished is read again later (0.25 s, doubling to 2 s) until it has,
or until ``--reaction-timeout`` after its acceptance has passed; one whose wait finished
but whose next step or end is still ahead is read again for those within the same time.
Since the steps carry the server's own times, a read that comes late (the budget is
small) still measures exactly; only the timeout needs the read to come after it.

Only the first confirmed event of each instance is observed: the model's one wait takes
one event, so later events to the same instance have no wait of theirs to read (counted
as ``skipped_repeats``; give at least as many instances as arrivals).

Clock offset: each read's ``Date`` header (whole seconds, server clock) happened between
our send and our receipt, so the offset (server - ours) lies in
[Date - received, Date + 1 - sent]; the intersection over every read narrows it to about
the spacing of the reads around a second's turn. The estimate is the value in that
interval nearest 0 (the least correction the evidence allows: clocks kept by NTP agree
to milliseconds), and its bound is the farthest edge from it.
"""

from __future__ import annotations

import email.utils
import heapq
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import anyio
import orjson
from aiolimiter import AsyncLimiter

from dispatcher.clients.targets import WRANGLER_DEV_API_PATH, Target
from dispatcher.model import Envelope
from dispatcher.report.observed import ObservedRow, ObserveHeader, ObserveSummary, summarize

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_REACTION_TIMEOUT",
    "ClockOffset",
    "ObserveSettings",
    "Observer",
    "parse_iso",
]

DEFAULT_REACTION_TIMEOUT: Final = 30.0
DEFAULT_BUDGET: Final = 0.2  # of the load's peak arrival rate
DEFAULT_SAMPLE: Final = 1.0
READERS: Final = 8
WATCH_GROUP: Final = 100  # ids per POST /watch: the relay's default MAX_BATCH
WATCH_GRACE_S: Final = 5.0  # past the last deadline, for the end of a slow next step
# What /watch streams for us: the rest (attempts, sleeps, queued, ...) is not needed.
WATCH_FILTER: Final = (
    "wait_started",
    "wait_completed",
    "wait_timed_out",
    "step_completed",
    "workflow_completed",
    "workflow_errored",
    "workflow_terminated",
)
_WORKFLOW_END: Final = frozenset({"workflow_completed", "workflow_errored", "workflow_terminated"})
FIRST_READ_S: Final = 0.25
MAX_REREAD_S: Final = 2.0
_ENDED: Final = frozenset({"complete", "errored", "terminated"})


def parse_iso(text: object) -> float | None:
    """Epoch seconds of an ISO 8601 time such as ``2026-12-07T15:42:13.123Z``; else None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class ClockOffset:
    """The server clock minus ours, from ``Date`` headers (see the module docstring)."""

    __slots__ = ("_hi", "_lo", "how", "samples")

    def __init__(self) -> None:
        self._lo = -math.inf
        self._hi = math.inf
        self.samples = 0
        self.how = "Date headers"

    def add(self, sent: float, received: float, date: str | None) -> None:
        if date is None:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        self.add_stamp(sent, received, server, 1.0)

    def add_stamp(self, sent: float, received: float, server: float, step: float) -> None:
        """A server time taken between ``sent`` and ``received``, truncated to ``step`` s."""
        self._lo = max(self._lo, server - received)
        self._hi = min(self._hi, server + step - sent)
        self.samples += 1
        self.how = "Date headers" if step >= 1.0 else "the relay's X-Relay-Now stamps"

    def estimate(
        self, none: str = "no Date header in the reads"
    ) -> tuple[float | None, float | None, str]:
        """(offset s, bound s, how); offset None: no stamp was seen (``none`` says so)."""
        if not self.samples:
            return None, None, none
        how = f"{self.how} of {self.samples:,} reads"
        lo, hi = self._lo, self._hi
        if lo > hi:
            # The intervals do not meet: a clock stepped during the run. Say so, wide.
            return (lo + hi) / 2, (lo - hi) / 2 + 1.0, how + ", inconsistent (a clock moved)"
        best = min(max(0.0, lo), hi)
        return best, max(best - lo, hi - best), how


@dataclass(frozen=True, slots=True, kw_only=True)
class ObserveSettings:
    target: Target
    base_url: str
    account_id: str | None
    workflow: str
    event_type: str
    headers: Mapping[str, str]
    budget: float  # reads per second at most
    sample: float = DEFAULT_SAMPLE
    reaction_timeout: float = DEFAULT_REACTION_TIMEOUT
    timeout: float = 30.0
    readers: int = READERS

    def __post_init__(self) -> None:
        if not 0 < self.sample <= 1:
            raise ValueError(f"--observe-sample must be above 0 and at most 100%: {self.sample}")
        if not 0 < self.budget < math.inf:
            raise ValueError(f"--observe-budget must be above 0, got {self.budget}")
        if not 0 < self.reaction_timeout < math.inf:
            raise ValueError("--reaction-timeout must be above 0")

    @property
    def source(self) -> str:
        if self.target == "relay":
            return (
                "relay subscription (source 1): POST /watch, instance.subscribe() events; "
                "reaction from the request's start"
            )
        where = "wrangler dev's local explorer" if self.target == "wrangler-dev" else "REST"
        return f"steps read after the fact (source 2): GET …/instances/{{id}} via {where}"

    def watch_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/watch"

    def instance_url(self, instance_id: str) -> str:
        base = self.base_url.rstrip("/")
        if self.target == "wrangler-dev":
            root = f"{base}{WRANGLER_DEV_API_PATH}"
        else:
            root = f"{base}/accounts/{quote(self.account_id or '', safe='')}"
        return (
            f"{root}/workflows/{quote(self.workflow, safe='')}/instances/"
            f"{quote(instance_id, safe='')}"
        )


class Observer:
    """Queue of reads; :meth:`run` reads until :meth:`close` and the queue is empty."""

    def __init__(self, settings: ObserveSettings) -> None:
        self.settings = settings
        self.rows: list[ObservedRow] = []
        self.offset = ClockOffset()
        self.reads = 0
        self.skipped_repeats = 0
        self.t0 = 0.0
        self._seen: set[str] = set()
        self._credit = 0.0
        self._heap: list[tuple[float, int, ObservedRow]] = []
        self._seq = 0
        self._closed = False
        self._wake = anyio.Event()
        self._relay = settings.target == "relay"
        self._pending: list[ObservedRow] = []  # relay: offered, not watched yet
        self.watch_ends: dict[str, int] = {}  # relay: how the instances' watches ended

    # -- fed by the load: never waits ------------------------------------------------------

    def offer(self, env: Envelope) -> None:
        iid = env.instance_id
        if not env.ok or iid is None:
            return
        if iid in self._seen:
            self.skipped_repeats += 1  # its wait took the instance's first event
            return
        self._seen.add(iid)
        # Every k-th first event (a running credit), so the sample spreads evenly.
        self._credit += self.settings.sample
        if self._credit < 1 - 1e-9:
            return
        self._credit -= 1
        accepted = env.finished_at.timestamp()
        sent = env.started_at.timestamp() if env.started_at is not None else accepted
        if self._relay:
            # The relay answers a batch once, after its last event: an event can be
            # consumed before its own 2xx is back, so its clock starts when the request left.
            accepted = sent
        row = ObservedRow(key=env.key, instance_id=iid, sent=sent, accepted=accepted)
        self.rows.append(row)
        if self._relay:
            self._pending.append(row)
            self._notify()
        else:
            self._push(accepted + FIRST_READ_S, row)

    def close(self) -> None:
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        # Every reader waiting on the old event wakes; later ones wait on a fresh one.
        self._wake.set()
        self._wake = anyio.Event()

    def _push(self, due: float, row: ObservedRow) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, row))
        self._notify()

    # -- the readers -----------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        limiter = AsyncLimiter(1, 1 / s.budget)  # burst-free: one read per 1/budget s
        if self._relay:
            await self._run_watches(limiter)
            return
        timeout = aiohttp.ClientTimeout(total=s.timeout)
        connector = aiohttp.TCPConnector(limit=s.readers)
        async with (
            aiohttp.ClientSession(
                headers=dict(s.headers), timeout=timeout, connector=connector
            ) as session,
            anyio.create_task_group() as tg,
        ):
            for _ in range(s.readers):
                tg.start_soon(self._reader, session, limiter)

    async def _next(self) -> ObservedRow | None:
        while True:
            if self._heap:
                due = self._heap[0][0]
                now = time.time()
                if due <= now:
                    return heapq.heappop(self._heap)[2]
                # Short naps: an entry pushed meanwhile may be due sooner.
                await anyio.sleep(min(due - now, 0.05))
                continue
            if self._closed:
                return None
            await self._wake.wait()

    async def _reader(self, session: aiohttp.ClientSession, limiter: AsyncLimiter) -> None:
        while (row := await self._next()) is not None:
            await limiter.acquire()
            result = await self._read(session, row.instance_id)
            row.reads += 1
            now = time.time()
            deadline = row.accepted + self.settings.reaction_timeout
            if result is not None:
                row.read_ok = True
                self._apply(row, result)
            done = row.wait_failed or (row.wait_end is not None and row.instance_end is not None)
            if done or now > deadline:
                row.settled = True
                continue
            wait = min(MAX_REREAD_S, FIRST_READ_S * 2 ** min(row.reads, 8))
            # One last read just after the deadline settles "not consumed in time".
            self._push(min(now + wait, deadline + 0.01), row)

    async def _read(
        self, session: aiohttp.ClientSession, instance_id: str
    ) -> dict[str, Any] | None:
        url = self.settings.instance_url(instance_id)
        sent = time.time()
        try:
            async with session.get(url, allow_redirects=False) as resp:
                raw = await resp.read()
                received = time.time()
                self.reads += 1
                self.offset.add(sent, received, resp.headers.get("Date"))
                if not 200 <= resp.status < 300:
                    return None
        except (aiohttp.ClientError, TimeoutError):
            self.reads += 1
            return None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("success") is not True:
            return None
        result = doc.get("result")
        return result if isinstance(result, dict) else None

    def _apply(self, row: ObservedRow, result: dict[str, Any]) -> None:
        steps = result.get("steps")
        if not isinstance(steps, list):
            return
        waits = [
            (i, st)
            for i, st in enumerate(steps)
            if isinstance(st, dict) and st.get("type") == "waitForEvent"
        ]
        # The wait for this event type, else the first wait there is.
        kind = self.settings.event_type
        mine = [w for w in waits if kind in (w[1].get("event_type"), w[1].get("name"))]
        candidates = mine or waits
        if not candidates:
            return
        index, wait = candidates[0]
        end = parse_iso(wait.get("end"))
        if end is None:
            return
        row.wait_end = end
        row.wait_failed = bool(wait.get("error"))
        output = wait.get("output")
        if isinstance(output, dict):
            row.event_at = parse_iso(output.get("timestamp"))
        if index + 1 < len(steps) and isinstance(steps[index + 1], dict):
            row.next_end = parse_iso(steps[index + 1].get("end"))
        if result.get("status") in _ENDED:
            row.instance_end = parse_iso(result.get("end"))

    # -- source 1: the relay's POST /watch -------------------------------------------------

    async def _run_watches(self, limiter: AsyncLimiter) -> None:
        """One /watch request per group: whatever was offered since the last one (at most
        WATCH_GROUP), at most ``budget`` requests a second; each streams on by itself."""
        s = self.settings
        # The streams last as long as their instances take; the sends' pool is not this one.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=s.timeout, sock_read=s.reaction_timeout + WATCH_GRACE_S + s.timeout
        )
        async with (
            aiohttp.ClientSession(
                headers=dict(s.headers), timeout=timeout, connector=connector
            ) as session,
            anyio.create_task_group() as tg,
        ):
            while True:
                while not self._pending and not self._closed:
                    await self._wake.wait()
                if not self._pending:
                    return
                await limiter.acquire()
                group, self._pending = self._pending[:WATCH_GROUP], self._pending[WATCH_GROUP:]
                tg.start_soon(self._watch, session, group)

    async def _watch(self, session: aiohttp.ClientSession, group: list[ObservedRow]) -> None:
        s = self.settings
        rows = {row.instance_id: row for row in group}
        # Long enough for the last of the group to time out, and its next step to end.
        last = max(row.accepted for row in group) + s.reaction_timeout + WATCH_GRACE_S
        timeout_ms = min(900_000, max(1, math.ceil((last - time.time()) * 1000)))
        body = {"ids": list(rows), "filter": list(WATCH_FILTER), "timeout_ms": timeout_ms}
        waits: dict[str, str] = {}  # instance -> the name of the wait for our event type
        sent = time.time()
        self.reads += 1
        try:
            async with session.post(
                s.watch_url(), data=orjson.dumps(body), allow_redirects=False,
                headers={"Content-Type": "application/json"},
            ) as resp:  # fmt: skip
                received = time.time()
                self._stamp(sent, received, resp.headers)
                if not 200 <= resp.status < 300:
                    self._ended(group, f"http {resp.status}")
                    return
                async for raw in resp.content:
                    self._line(raw, rows, waits)
        except (aiohttp.ClientError, TimeoutError):
            pass
        # Instances without an end line: the stream broke; read_ok stays as it was.
        for row in rows.values():
            if not row.settled:
                self._ended([row], "stream cut")

    def _stamp(self, sent: float, received: float, headers: Mapping[str, str]) -> None:
        now = headers.get("X-Relay-Now")
        if now is not None:
            try:
                self.offset.add_stamp(sent, received, float(now) / 1000, 0.001)
                return
            except ValueError:
                pass
        self.offset.add(sent, received, headers.get("Date"))

    def _ended(self, rows: list[ObservedRow], how: str) -> None:
        for row in rows:
            row.settled = True
            self.watch_ends[how] = self.watch_ends.get(how, 0) + 1

    def _line(self, raw: bytes, rows: dict[str, ObservedRow], waits: dict[str, str]) -> None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        row = rows.get(doc.get("instanceId"))  # type: ignore[arg-type]
        if row is None:
            return  # the done line, or an id not ours
        end = doc.get("end")
        if isinstance(end, str):
            # ended / timeout: the subscription was held, so what it did not see did not
            # happen in time; not_found, unsupported, failed: nothing was seen at all.
            row.read_ok = row.read_ok or end in ("ended", "timeout")
            self._ended([row], end)
            return
        row.read_ok = True
        row.reads += 1
        stamp = doc.get("timestamp")
        if not isinstance(stamp, int | float):
            return
        at = float(stamp) / 1000  # the engine's clock, epoch ms
        kind, name = doc.get("type"), doc.get("stepName")
        iid = row.instance_id
        if kind == "wait_started":
            if (
                doc.get("eventType") == self.settings.event_type
                and iid not in waits
                and isinstance(name, str)
            ):
                waits[iid] = name
        elif kind in ("wait_completed", "wait_timed_out"):
            mine = waits.get(iid)
            if row.wait_end is None and (mine is None or mine == name):
                row.wait_end = at
                row.wait_failed = kind == "wait_timed_out"
                waits[iid] = str(name)
        elif kind == "step_completed":
            if row.wait_end is not None and row.next_end is None and name != waits.get(iid):
                row.next_end = at
        elif kind in _WORKFLOW_END:
            row.instance_end = at

    # -- the result --------------------------------------------------------------------------

    def header(self) -> ObserveHeader:
        offset, bound, how = self.offset.estimate(
            "no X-Relay-Now or Date header on the relay's /watch answers"
            if self._relay
            else "no Date header in the reads"
        )
        s = self.settings
        return ObserveHeader(
            source=s.source,
            offset_s=offset,
            bound_s=bound,
            offset_how=how,
            reaction_timeout=s.reaction_timeout,
            sample=s.sample,
            budget=s.budget,
            reads=self.reads,
            skipped_repeats=self.skipped_repeats,
            t0=self.t0,
        )

    def summary(self) -> ObserveSummary:
        return summarize(self.header(), self.rows)
