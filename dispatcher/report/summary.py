"""What a run did, from its envelopes: counts, attempts, latency percentiles, throughput.

A :class:`ReportBuilder` takes envelopes one at a time (from results files, or live from a
load test) and keeps only counters, two HDR histograms, per-second buckets and two short
lists, so memory stays flat however many envelopes pass; :meth:`ReportBuilder.build`
freezes them into a :class:`Report`, which :func:`render` prints as text, JSON or
Markdown.

Merging several results files: each file is one run. Within a file the last envelope of a
key wins (the ledger's rule, :func:`dispatcher.results.ledger.read_envelopes`); across files
nothing is merged by key, every file's final envelopes are counted, because two files are
two runs (two load tests, or a backfill and its retry into another file) and a reader
comparing them wants both. A key present in two files is counted twice.

Latency percentiles come from HdrHistogram (the maintained ``hdrhistogram`` package), with
values recorded in microseconds at 3 significant digits: a reported percentile is within
0.1 % of the exact one. A percentile p is the value of rank round(p% * n) among the n
latencies (HdrHistogram_py's rule; nearest rank would take the ceiling, one rank apart at
most). The maximum, minimum and mean are exact, and percentiles are capped
at the exact maximum so that ``p99`` never reads above ``max``.

Thresholds (``p99<800ms``, ``error_rate<0.5%``, ``dropped<1%``...) live here too: they are
judged against a report's numbers, by ``report`` and by ``load``.
"""

from __future__ import annotations

import heapq
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson
from hdrh.histogram import HdrHistogram

from dispatcher.model import Delivery, Envelope

__all__ = [
    "DEFAULT_TOP",
    "FORMATS",
    "METRICS",
    "OBSERVE_PREFIXES",
    "PERCENTILES",
    "AttemptStats",
    "Breach",
    "Bucket",
    "Format",
    "LatencyHistogram",
    "LatencySummary",
    "RecordRow",
    "Report",
    "ReportBuilder",
    "RunInfo",
    "Threshold",
    "check_thresholds",
    "choose_bucket",
    "format_metric",
    "parse_threshold",
    "render",
]

PERCENTILES: Final = (50.0, 90.0, 95.0, 99.0)
# 1 µs to 1 hour covers every latency a request with a timeout can have; 3 significant
# digits is HdrHistogram's usual precision (0.1 %) and costs ~190 KB per histogram.
_HDR_LOWEST_US: Final = 1
_HDR_HIGHEST_US: Final = 3_600_000_000
_HDR_DIGITS: Final = 3
DEFAULT_TOP: Final = 10
# Throughput rows: at most this many, so a long backfill still fits a screen.
MAX_BUCKETS: Final = 60
_NICE_WIDTHS: Final = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600)

Format = Literal["text", "json", "markdown"]
FORMATS: Final[tuple[Format, ...]] = ("text", "json", "markdown")


# --- latency -----------------------------------------------------------------------------

_LATENCY_METRICS: Final = ("p50", "p90", "p95", "p99", "max", "mean", "min")
REJECTED_PREFIX: Final = "rejected_"  # threshold metrics over non-2xx answers
ALL_PREFIX: Final = "all_"  # threshold metrics over every answer


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencySummary:
    """Percentiles of a latency histogram, in milliseconds; all ``None`` when empty."""

    count: int
    min_ms: float | None = None
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "min": self.min_ms,
            "mean": self.mean_ms,
            "p50": self.p50_ms,
            "p90": self.p90_ms,
            "p95": self.p95_ms,
            "p99": self.p99_ms,
            "max": self.max_ms,
        }


class LatencyHistogram:
    """Millisecond values in an HDR histogram (as µs), plus exact count, sum, min and max."""

    __slots__ = ("_count", "_hist", "_max", "_min", "_sum")

    def __init__(self) -> None:
        self._hist = HdrHistogram(_HDR_LOWEST_US, _HDR_HIGHEST_US, _HDR_DIGITS)
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    @property
    def count(self) -> int:
        return self._count

    def record(self, ms: float) -> None:
        if not math.isfinite(ms) or ms < 0:
            return  # not a latency: a hand-edited file; never crash a report on it
        # Sub-microsecond values land in the lowest bucket rather than being refused.
        micros = min(max(round(ms * 1000.0), _HDR_LOWEST_US), _HDR_HIGHEST_US)
        self._hist.record_value(micros)
        self._count += 1
        self._sum += ms
        self._min = min(self._min, ms)
        self._max = max(self._max, ms)

    def percentile(self, p: float) -> float | None:
        if not self._count:
            return None
        value: int = self._hist.get_value_at_percentile(p)
        return min(value / 1000.0, self._max)

    def summary(self) -> LatencySummary:
        if not self._count:
            return LatencySummary(count=0)
        # One pass over the counts for all four percentiles.
        values: dict[float, int] = self._hist.get_percentile_to_value_dict(list(PERCENTILES))
        p = {k: min(v / 1000.0, self._max) for k, v in values.items()}
        return LatencySummary(
            count=self._count,
            min_ms=self._min,
            mean_ms=self._sum / self._count,
            p50_ms=p[50.0],
            p90_ms=p[90.0],
            p95_ms=p[95.0],
            p99_ms=p[99.0],
            max_ms=self._max,
        )


# --- the report's parts ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunInfo:
    """One results file (one run)."""

    path: str
    records: int
    confirmed: int
    start: datetime | None  # first started_at (or finished_at when none started)
    end: datetime | None  # last finished_at

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            return 0.0
        return max((self.end - self.start).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptStats:
    total: int  # requests made, over every record
    retries: int  # requests beyond each record's first
    records_retried: int  # records that took more than one request
    distribution: dict[int, int]  # attempts -> records


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    """Records that finished within ``[start, start + width)``."""

    start: datetime
    offset_s: float  # seconds since the report's start
    records: int
    confirmed: int
    failed: int
    rate_limited: int  # final answer 429
    attempts: int  # requests of the records that finished here (retries included)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordRow:
    """One record, as the slowest and failed lists show it."""

    key: str
    source: str
    line: int
    workflow: str | None
    instance_id: str | None
    event_type: str | None
    delivery: str
    status: int | None
    attempts: int
    latency_ms: float | None
    error: str | None  # "kind code: message"

    @classmethod
    def of(cls, env: Envelope) -> RecordRow:
        error = None
        if env.error is not None:
            code = f" {env.error.code}" if env.error.code is not None else ""
            error = f"{env.error.kind.value}{code}: {env.error.message}"
        return cls(
            key=env.key,
            source=env.source,
            line=env.line,
            workflow=env.workflow,
            instance_id=env.instance_id,
            event_type=env.event_type,
            delivery=env.delivery.value,
            status=env.status,
            attempts=env.attempts,
            latency_ms=env.latency_ms,
            error=error,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source,
            "line": self.line,
            "workflow": self.workflow,
            "instance_id": self.instance_id,
            "event_type": self.event_type,
            "delivery": self.delivery,
            "status": self.status,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    runs: tuple[RunInfo, ...]
    records: int
    confirmed: int
    sent: int  # records with at least one request (invalid lines have none)
    delivery: dict[str, int]
    status: dict[str, int]  # final HTTP status; "none" when no answer came
    errors: dict[str, int]  # "kind" or "kind/code"
    cf_codes: dict[int, int]  # Cloudflare error code -> records whose final answer had it
    attempts: AttemptStats
    latency: LatencySummary  # the last attempt of each record
    elapsed: LatencySummary  # all attempts and waits of each record
    start: datetime | None
    end: datetime | None
    bucket_s: int
    throughput: tuple[Bucket, ...]
    slowest: tuple[RecordRow, ...]
    failed_first: tuple[RecordRow, ...]
    notes: tuple[str, ...] = ()
    # Every request, not only each record's last: attempt outcome ("200", "429", "503",
    # "timeout", "connection"...) -> requests, from the envelopes' ``statuses``; for
    # envelopes without it, the final status plus "earlier (not recorded)" for retries.
    requests: dict[str, int] = field(default_factory=dict)
    # The last attempt's latency, split: a 429 answers in a fraction of a millisecond and
    # would pull the percentiles of real answers down.
    latency_accepted: LatencySummary = field(default_factory=lambda: LatencySummary(count=0))
    latency_rejected: LatencySummary = field(default_factory=lambda: LatencySummary(count=0))

    @property
    def failed(self) -> int:
        return self.records - self.confirmed

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            return 0.0
        return max((self.end - self.start).total_seconds(), 0.0)

    @property
    def error_rate(self) -> float | None:
        """Sent records not confirmed, over sent records (invalid lines say nothing of the
        API, so they count in neither)."""
        if not self.sent:
            return None
        sent_confirmed = self.confirmed  # only sent records can be confirmed
        return (self.sent - sent_confirmed) / self.sent

    @property
    def rate(self) -> float | None:
        """Sent records per second over the report's span."""
        seconds = self.seconds
        return self.sent / seconds if seconds > 0 else None

    def metrics(self) -> dict[str, float | None]:
        """The numbers thresholds are judged on (latencies in ms, rates as fractions).

        ``p99`` and its kin are the *accepted* answers' (2xx): a 429 comes back in a
        fraction of a millisecond, and mixed in it would make a server refusing half the
        load look fast. ``rejected_p99`` and so on are the other answers', ``all_p99`` all
        of them together.
        """
        out: dict[str, float | None] = {}
        for prefix, lat in (
            ("", self.latency_accepted),
            (REJECTED_PREFIX, self.latency_rejected),
            (ALL_PREFIX, self.latency),
        ):
            for name in _LATENCY_METRICS:
                out[prefix + name] = getattr(lat, f"{name}_ms")
        out["error_rate"] = self.error_rate
        out["rate"] = self.rate
        return out

    def as_dict(self) -> dict[str, Any]:
        seconds = self.seconds
        return {
            "runs": [
                {
                    "path": r.path,
                    "records": r.records,
                    "confirmed": r.confirmed,
                    "start": _iso(r.start),
                    "end": _iso(r.end),
                    "seconds": round(r.seconds, 3),
                }
                for r in self.runs
            ],
            "records": self.records,
            "confirmed": self.confirmed,
            "failed": self.failed,
            "sent": self.sent,
            "delivery": self.delivery,
            "status": self.status,
            "errors": self.errors,
            "cf_codes": {str(k): v for k, v in self.cf_codes.items()},
            "attempts": {
                "total": self.attempts.total,
                "retries": self.attempts.retries,
                "records_retried": self.attempts.records_retried,
                "distribution": {str(k): v for k, v in self.attempts.distribution.items()},
            },
            "latency_ms": self.latency.as_dict(),
            "latency_accepted_ms": self.latency_accepted.as_dict(),
            "latency_rejected_ms": self.latency_rejected.as_dict(),
            "requests": self.requests,
            "elapsed_ms": self.elapsed.as_dict(),
            "start": _iso(self.start),
            "end": _iso(self.end),
            "seconds": round(seconds, 3),
            "records_per_s": self.records / seconds if seconds > 0 else None,
            "confirmed_per_s": self.confirmed / seconds if seconds > 0 else None,
            "error_rate": self.error_rate,
            "throughput": {
                "bucket_s": self.bucket_s,
                "buckets": [
                    {
                        "start": _iso(b.start),
                        "offset_s": b.offset_s,
                        "records": b.records,
                        "confirmed": b.confirmed,
                        "failed": b.failed,
                        "rate_limited": b.rate_limited,
                        "attempts": b.attempts,
                    }
                    for b in self.throughput
                ],
            },
            "slowest": [r.as_dict() for r in self.slowest],
            "failed_records": {
                "total": self.failed,
                "first": [r.as_dict() for r in self.failed_first],
            },
            "notes": list(self.notes),
        }


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


def choose_bucket(seconds: float, max_buckets: int = MAX_BUCKETS) -> int:
    """The narrowest round bucket width (s) giving at most ``max_buckets`` over ``seconds``."""
    for width in _NICE_WIDTHS:
        if seconds / width < max_buckets:
            return width
    return math.ceil(seconds / max_buckets / 86400) * 86400


# --- building ----------------------------------------------------------------------------

EARLIER: Final = "earlier (not recorded)"
"""The outcome of retries in envelopes written before they carried ``statuses``."""


def _statuses_of(env: Envelope) -> dict[str, int] | None:
    """The envelope's per-attempt outcome counts (``statuses``), when it has them."""
    raw = getattr(env, "statuses", None)
    if not isinstance(raw, dict) or not raw:
        return None
    out: dict[str, int] = {}
    for outcome, n in raw.items():
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            out[str(outcome)] = n
    return out or None


def _no_answer(env: Envelope) -> str:
    return env.error.kind.value if env.error is not None else "none"


class _RunAcc:
    __slots__ = ("confirmed", "end", "path", "records", "start")

    def __init__(self, path: str) -> None:
        self.path = path
        self.records = 0
        self.confirmed = 0
        self.start: datetime | None = None
        self.end: datetime | None = None


# Per-second counters: records, confirmed, failed, 429, attempts.
_R, _C, _F, _RL, _A = range(5)


class ReportBuilder:
    """Accumulates envelopes into a :class:`Report`; memory does not grow per envelope.

    Call :meth:`start_run` before each results file's envelopes (a builder fed without it
    has one run named ``run``). ``top`` is how many slowest and failed records to list.
    """

    def __init__(self, *, top: int = DEFAULT_TOP) -> None:
        if top < 0:
            raise ValueError("top must be 0 or more")
        self._top = top
        self._runs: list[_RunAcc] = []
        self._delivery: Counter[str] = Counter()
        self._status: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._cf_codes: Counter[int] = Counter()
        self._attempts: Counter[int] = Counter()
        self._latency = LatencyHistogram()
        self._latency_ok = LatencyHistogram()
        self._latency_rejected = LatencyHistogram()
        self._requests: Counter[str] = Counter()
        self._elapsed = LatencyHistogram()
        # Whole seconds since _origin (the first envelope's start) -> counters: one entry
        # per second of the run, however many records finish in it.
        self._seconds: dict[int, list[int]] = {}
        self._origin: float | None = None
        # Min-heap of the slowest: (latency, order, row); order breaks ties stably.
        self._slowest: list[tuple[float, int, RecordRow]] = []
        self._failed: list[RecordRow] = []
        self._order = 0
        self._notes: list[str] = []

    def start_run(self, path: str) -> None:
        self._runs.append(_RunAcc(path))

    def note(self, text: str) -> None:
        """Something the reader should know (a skipped torn line...)."""
        self._notes.append(text)

    def add(self, env: Envelope) -> None:
        if not self._runs:
            self.start_run("run")
        run = self._runs[-1]
        run.records += 1
        ok = env.delivery is Delivery.CONFIRMED
        if ok:
            run.confirmed += 1
        begin = env.started_at if env.started_at is not None else env.finished_at
        if run.start is None or begin < run.start:
            run.start = begin
        if run.end is None or env.finished_at > run.end:
            run.end = env.finished_at

        self._delivery[env.delivery.value] += 1
        self._status["none" if env.status is None else str(env.status)] += 1
        if env.error is not None:
            code = env.error.code
            self._errors[env.error.kind.value if code is None else f"{env.error.kind}/{code}"] += 1
            if code is not None:
                self._cf_codes[code] += 1
        self._attempts[env.attempts] += 1
        if env.latency_ms is not None:
            self._latency.record(env.latency_ms)
            if env.status is not None:
                split = self._latency_ok if 200 <= env.status < 300 else self._latency_rejected
                split.record(env.latency_ms)
        rate_limited_requests = self._count_requests(env)
        if env.attempts > 0:
            self._elapsed.record(env.elapsed_ms)

        if self._origin is None:
            self._origin = begin.timestamp()
        second = math.floor(env.finished_at.timestamp() - self._origin)
        counts = self._seconds.get(second)
        if counts is None:
            counts = self._seconds[second] = [0, 0, 0, 0, 0]
        counts[_R] += 1
        counts[_A] += env.attempts
        if ok:
            counts[_C] += 1
        else:
            counts[_F] += 1
        counts[_RL] += rate_limited_requests

        self._order += 1
        if self._top:
            if env.latency_ms is not None:
                item = (env.latency_ms, -self._order, RecordRow.of(env))
                if len(self._slowest) < self._top:
                    heapq.heappush(self._slowest, item)
                elif item[0] > self._slowest[0][0]:
                    heapq.heapreplace(self._slowest, item)
            if not ok and len(self._failed) < self._top:
                self._failed.append(RecordRow.of(env))

    def _count_requests(self, env: Envelope) -> int:
        """Count every request of ``env`` by outcome; return how many were answered 429."""
        statuses = _statuses_of(env)
        if statuses is not None:
            for outcome, n in statuses.items():
                self._requests[outcome] += n
            return statuses.get("429", 0)
        if env.attempts <= 0:
            return 0
        # Older envelopes hold only the last answer; the retries before it are unknown.
        last = str(env.status) if env.status is not None else _no_answer(env)
        self._requests[last] += 1
        if env.attempts > 1:
            self._requests[EARLIER] += env.attempts - 1
        return 1 if env.status == 429 else 0

    def add_all(self, envs: Iterable[Envelope]) -> None:
        for env in envs:
            self.add(env)

    def build(self, *, bucket_s: int | None = None) -> Report:
        runs = tuple(
            RunInfo(path=r.path, records=r.records, confirmed=r.confirmed, start=r.start, end=r.end)
            for r in self._runs
        )
        starts = [r.start for r in runs if r.start is not None]
        ends = [r.end for r in runs if r.end is not None]
        start = min(starts) if starts else None
        end = max(ends) if ends else None
        span = (end - start).total_seconds() if start is not None and end is not None else 0.0
        width = bucket_s if bucket_s is not None else choose_bucket(span)
        if width < 1:
            raise ValueError("the bucket width must be at least 1 second")
        attempts = self._attempts
        records = sum(r.records for r in runs)
        confirmed = sum(r.confirmed for r in runs)
        return Report(
            runs=runs,
            records=records,
            confirmed=confirmed,
            sent=records - attempts.get(0, 0),
            delivery=_by_count(self._delivery),
            status=_by_count(self._status),
            errors=_by_count(self._errors),
            cf_codes=dict(sorted(self._cf_codes.items(), key=lambda kv: (-kv[1], kv[0]))),
            attempts=AttemptStats(
                total=sum(n * k for n, k in attempts.items()),
                retries=sum((n - 1) * k for n, k in attempts.items() if n > 1),
                records_retried=sum(k for n, k in attempts.items() if n > 1),
                distribution=dict(sorted(attempts.items())),
            ),
            latency=self._latency.summary(),
            latency_accepted=self._latency_ok.summary(),
            latency_rejected=self._latency_rejected.summary(),
            requests=_by_count(self._requests),
            elapsed=self._elapsed.summary(),
            start=start,
            end=end,
            bucket_s=width,
            throughput=self._buckets(start, end, width),
            slowest=tuple(row for _, _, row in sorted(self._slowest, reverse=True)),
            failed_first=tuple(self._failed),
            notes=tuple(self._notes),
        )

    def _buckets(
        self, start: datetime | None, end: datetime | None, width: int
    ) -> tuple[Bucket, ...]:
        if start is None or end is None or not self._seconds:
            return ()
        # Seconds count from the first envelope's start, so rows line up with a plot's
        # "seconds since start"; empty buckets inside the span are kept on purpose: a gap
        # is a pause (a 429 lockout) worth seeing.
        assert self._origin is not None
        first = min(self._seconds)
        last = max(self._seconds)
        n = (last - first) // width + 1
        rows = [[0, 0, 0, 0, 0] for _ in range(n)]
        for second, counts in self._seconds.items():
            row = rows[(second - first) // width]
            for i in range(5):
                row[i] += counts[i]
        return tuple(
            Bucket(
                start=datetime.fromtimestamp(self._origin + first + i * width, UTC),
                offset_s=float(i * width),
                records=row[_R],
                confirmed=row[_C],
                failed=row[_F],
                rate_limited=row[_RL],
                attempts=row[_A],
            )
            for i, row in enumerate(rows)
        )


def _by_count(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


# --- thresholds --------------------------------------------------------------------------

_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_FRACTION_METRICS: Final = ("error_rate", "dropped", "unreacted")
_RATE_METRICS: Final = ("rate",)
# load --observe (dispatcher.report.observed): accepted → wait's end, → next step's end,
# → the instance's end.
OBSERVE_PREFIXES: Final = ("reaction_", "next_step_", "completion_")
_LATENCY_PREFIXES: Final = ("", REJECTED_PREFIX, ALL_PREFIX, *OBSERVE_PREFIXES)
METRICS: Final = (
    *(prefix + m for prefix in _LATENCY_PREFIXES for m in _LATENCY_METRICS),
    *_FRACTION_METRICS,
    *_RATE_METRICS,
)
_ALL_LATENCY_METRICS: Final = frozenset(METRICS[: len(_LATENCY_PREFIXES) * len(_LATENCY_METRICS)])
_METRIC_NAMES: Final = (
    f"{', '.join(_LATENCY_METRICS)} (2xx answers; rejected_p99 etc. for the others, "
    f"all_p99 etc. for every answer; reaction_p99, next_step_p99, completion_p99 etc. "
    f"with load --observe), {', '.join((*_FRACTION_METRICS, *_RATE_METRICS))}"
)
_THRESHOLD = re.compile(r"\s*(?P<metric>[a-z_0-9]+)\s*(?P<op><=|>=|<|>)\s*(?P<value>\S.*?)\s*")
_LATENCY_VALUE = re.compile(r"(?P<n>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>us|µs|ms|s|m)?")
_UNIT_MS: Final = {"us": 0.001, "µs": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class Threshold:
    """``metric op value``; latencies in ms, ``error_rate``/``dropped`` as fractions,
    ``rate`` in requests per second. ``text`` is how the user wrote it."""

    metric: str
    op: str
    value: float
    text: str

    def holds(self, measured: float) -> bool:
        return _OPS[self.op](measured, self.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Breach:
    threshold: Threshold
    measured: float | None  # None: nothing was measured (no request answered)

    def describe(self) -> str:
        return (
            f"{self.threshold.text}: measured {format_metric(self.threshold.metric, self.measured)}"
        )


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "nothing (no data)"
    if metric in _FRACTION_METRICS:
        return f"{value:.2%}"
    if metric in _RATE_METRICS:
        return f"{value:,.1f}/s"
    return f"{value:,.1f} ms"


def parse_threshold(text: str) -> Threshold:
    """``"p99<800ms"``, ``"error_rate<0.5%"``, ``"dropped<1%"``, ``"rate>=45/s"``.

    Raises :class:`ValueError` naming what is wrong.
    """
    match = _THRESHOLD.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r}: expected METRIC OP VALUE such as 'p99<800ms' or 'error_rate<0.5%' "
            f"(metrics: {_METRIC_NAMES}; ops: <, <=, >, >=)"
        )
    metric, op, raw = match["metric"], match["op"], match["value"]
    if metric not in METRICS:
        raise ValueError(f"{text!r}: unknown metric {metric!r}; known: {_METRIC_NAMES}")
    value: float
    if metric in _ALL_LATENCY_METRICS:
        lat = _LATENCY_VALUE.fullmatch(raw)
        if lat is None:
            raise ValueError(f"{text!r}: {raw!r} is not a latency such as 800ms or 1.5s")
        value = float(lat["n"]) * _UNIT_MS[lat["unit"] or "ms"]
    elif metric in _FRACTION_METRICS:
        try:
            value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ValueError(f"{text!r}: {raw!r} is not a percentage such as 0.5%") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{text!r}: {raw!r} must be within 0..100% (a fraction 0..1)")
    else:
        number = raw.removesuffix("/s").strip()
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"{text!r}: {raw!r} is not a rate such as 45/s") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: the value must be finite")
    return Threshold(metric=metric, op=op, value=value, text=text.strip())


def check_thresholds(
    thresholds: Iterable[Threshold], metrics: Mapping[str, float | None]
) -> list[Breach]:
    """The thresholds that do not hold; a metric with no data breaches (a test that
    measured nothing must not pass)."""
    breaches = []
    for t in thresholds:
        measured = metrics.get(t.metric)
        if measured is None or not t.holds(measured):
            breaches.append(Breach(threshold=t, measured=measured))
    return breaches


# --- rendering ---------------------------------------------------------------------------


def render(report: Report, fmt: Format) -> str:
    if fmt == "json":
        return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode()
    if fmt == "markdown":
        return _markdown(report)
    return _text(report)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:,.2f} s"
    return f"{value:,.1f} ms"


def _counts(counts: Mapping[Any, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items()) or "-"


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _span(report: Report) -> str:
    if report.start is None or report.end is None:
        return "-"
    seconds = report.seconds
    rate = f"; {report.records / seconds:,.1f} records/s, " if seconds > 0 else "; "
    rate += f"{report.confirmed / seconds:,.1f} confirmed/s" if seconds > 0 else ""
    return f"{_iso(report.start)} → {_iso(report.end)}, {seconds:,.2f} s{rate}"


def _latency_line(lat: LatencySummary) -> str:
    if not lat.count:
        return "-"
    return (
        f"p50 {_ms(lat.p50_ms)}  p90 {_ms(lat.p90_ms)}  p95 {_ms(lat.p95_ms)}  "
        f"p99 {_ms(lat.p99_ms)}  max {_ms(lat.max_ms)}  (mean {_ms(lat.mean_ms)}, "
        f"n={lat.count:,})"
    )


def _where(row: RecordRow) -> str:
    return f"{row.source}:{row.line}"


def _bar(value: int, peak: int, width: int = 24) -> str:
    if peak <= 0 or value <= 0:
        return ""
    return "█" * max(1, round(value / peak * width))


def _offset(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"+{s}s"
    if s < 3600:
        return f"+{s // 60}m{s % 60:02d}s"
    return f"+{s // 3600}h{s % 3600 // 60:02d}m"


def _text(r: Report) -> str:
    runs = ", ".join(run.path for run in r.runs) or "(no results)"
    out = [f"dispatcher report: {runs} ({len(r.runs)} run{'s' if len(r.runs) != 1 else ''})"]
    a = r.attempts
    out += [
        f"  records    {r.records:,}: {r.confirmed:,} confirmed ({_pct(r.confirmed, r.records)}), "
        f"{r.failed:,} not; {r.sent:,} sent",
        f"  delivery   {_counts(r.delivery)}",
        f"  status     {_counts(r.status)}",
        f"  errors     {_counts(r.errors)}",
        f"  cf codes   {_counts(r.cf_codes)}",
        f"  attempts   {a.total:,} requests, {a.retries:,} retries, "
        f"{a.records_retried:,} records retried",
        f"             per record: {_counts(a.distribution)}",
        f"  requests   {_counts(r.requests)}",
        "             (every attempt, by outcome)",
        f"  latency    {_latency_line(r.latency)}",
        "             (last attempt of each record)",
        f"  accepted   {_latency_line(r.latency_accepted)}",
        "             (last attempt answered 2xx)",
        f"  rejected   {_latency_line(r.latency_rejected)}",
        "             (last attempt answered 429, 4xx or 5xx: often far quicker)",
        f"  elapsed    {_latency_line(r.elapsed)}",
        "             (all attempts and waits of each record)",
        f"  span       {_span(r)}",
    ]
    if len(r.runs) > 1:
        for run in r.runs:
            out.append(
                f"  run        {run.path}: {run.records:,} records, {run.confirmed:,} confirmed, "
                f"{run.seconds:,.2f} s"
            )
    for note in r.notes:
        out.append(f"  note       {note}")
    if r.throughput:
        peak = max(b.records for b in r.throughput)
        out += ["", f"throughput per {r.bucket_s} s (by finish time)"]
        out.append(
            f"  {'time':<9} {'records':>8} {'ok':>8} {'failed':>7} {'429':>5} {'requests':>9}"
        )
        for b in r.throughput:
            out.append(
                f"  {_offset(b.offset_s):<9} {b.records:>8,} {b.confirmed:>8,} {b.failed:>7,} "
                f"{b.rate_limited:>5,} {b.attempts:>9,}  {_bar(b.records, peak)}"
            )
    if r.slowest:
        out += ["", f"slowest {len(r.slowest)} (last attempt)"]
        for row in r.slowest:
            out.append(
                f"  {_ms(row.latency_ms):>11}  {row.status if row.status is not None else '-':>4}  "
                f"{row.key}  {row.instance_id or '-'}  {_where(row)}"
            )
    if r.failed:
        out += ["", f"failed: first {len(r.failed_first)} of {r.failed:,}"]
        for row in r.failed_first:
            out.append(
                f"  {row.key}  {_where(row)}  {row.instance_id or '-'}  {row.delivery}  "
                f"status {row.status if row.status is not None else '-'}  "
                f"attempts {row.attempts}  {row.error or ''}"
            )
    return "\n".join(out)


def _md_escape(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _markdown(r: Report) -> str:
    a = r.attempts
    runs = ", ".join(f"`{run.path}`" for run in r.runs) or "(no results)"
    out = [f"# dispatcher report: {runs}", ""]
    out += _md_table(
        ["what", "value"],
        [
            ["records", f"{r.records:,}"],
            ["confirmed", f"{r.confirmed:,} ({_pct(r.confirmed, r.records)})"],
            ["not confirmed", f"{r.failed:,}"],
            ["sent", f"{r.sent:,}"],
            ["requests", f"{a.total:,} ({a.retries:,} retries)"],
            ["records retried", f"{a.records_retried:,}"],
            ["span", _span(r)],
        ],
    )
    out += ["", "## Outcomes", ""]
    out += _md_table(
        ["counted by", "counts"],
        [
            ["delivery", _counts(r.delivery)],
            ["HTTP status", _counts(r.status)],
            ["error", _counts(r.errors)],
            ["Cloudflare code", _counts(r.cf_codes)],
            ["attempts per record", _counts(a.distribution)],
            ["every request, by outcome", _counts(r.requests)],
        ],
    )
    out += ["", "## Latency (ms)", ""]
    out += _md_table(
        ["", "n", "p50", "p90", "p95", "p99", "max", "mean"],
        [
            [name, f"{s.count:,}"]
            + [
                "-" if v is None else f"{v:,.1f}"
                for v in (s.p50_ms, s.p90_ms, s.p95_ms, s.p99_ms, s.max_ms, s.mean_ms)
            ]
            for name, s in (
                ("last attempt", r.latency),
                ("last attempt, accepted (2xx)", r.latency_accepted),
                ("last attempt, rejected (429, 4xx, 5xx)", r.latency_rejected),
                ("all attempts", r.elapsed),
            )
        ],
    )
    if r.throughput:
        out += ["", f"## Throughput per {r.bucket_s} s", ""]
        out += _md_table(
            ["time", "records", "confirmed", "failed", "429", "requests"],
            [
                [_offset(b.offset_s), b.records, b.confirmed, b.failed, b.rate_limited, b.attempts]
                for b in r.throughput
            ],
        )
    if r.slowest:
        out += ["", "## Slowest", ""]
        out += _md_table(
            ["latency", "status", "key", "instance", "where"],
            [
                [
                    _ms(x.latency_ms),
                    x.status if x.status is not None else "-",
                    f"`{x.key}`",
                    x.instance_id or "-",
                    _where(x),
                ]
                for x in r.slowest
            ],
        )
    if r.failed:
        out += ["", f"## Failed: first {len(r.failed_first)} of {r.failed:,}", ""]
        out += _md_table(
            ["key", "where", "instance", "delivery", "status", "attempts", "error"],
            [
                [
                    f"`{x.key}`",
                    _where(x),
                    x.instance_id or "-",
                    x.delivery,
                    x.status if x.status is not None else "-",
                    x.attempts,
                    x.error or "",
                ]
                for x in r.failed_first
            ],
        )
    if r.notes:
        out += ["", *[f"> {n}" for n in r.notes]]
    return "\n".join(out)
