"""What `load --observe` saw of the workflow: reaction and completion latency, unreacted.

The observer (:mod:`dispatcher.run.observe`) keeps, per observed event, our times (sent,
accepted = its 2xx arrived) and the server's step times as read, unconverted. The figures
are derived here, once the clock offset is known, by the load and by ``report`` alike
from the sidecar ``RESULTS.observe.jsonl``: a header line ``{"observe": {...}}`` and then
one line per observed event.

Per event, with ``offset`` = server clock - ours (from the ``Date`` headers):

- **reaction** = (waitForEvent step's ``end`` - offset) - accepted, cut at 0 (the server
  may consume while our 2xx is still on its way);
- **next step** = the end of the step after the wait, - offset - accepted;
- **completion** = the instance's ``end`` - offset - accepted, when it ended;
- **reaction, server clock** = the wait's ``end`` - the event's own ``timestamp`` in the
  wait's output (where the server gives one: wrangler dev, the emulator), both the
  server's, so it needs no offset; it is shorter than the reaction by the 2xx's way back;
- **unreacted**: not consumed within the reaction timeout (no end by the last read after
  the timeout, the wait timed out, or it ended later than the timeout);
- **stale**: the wait had ended before this event was even sent (more than the offset's
  error bound earlier): it consumed another event, so this one tells nothing;
- **unread**: the instance's steps could not be read before the timeout, or the run was
  stopped (a second Ctrl-C) before a read after the timeout.

The knee (:func:`knee`): arrivals and reactions are put in time buckets; the baseline is
the median reaction p50 of the third of buckets with the lowest arrival rate; the knee is
the lowest arrival rate from which on every bucket (by rate) has a reaction p50 above
:data:`KNEE_FACTOR` x baseline. No such rate, fewer than 3 buckets of 5 reactions, or
rates that span less than 1.5x (no ramp): no knee.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from dispatcher.report.summary import LatencyHistogram, LatencySummary

__all__ = [
    "KNEE_FACTOR",
    "OBSERVE_SUFFIX",
    "ObserveHeader",
    "ObserveSummary",
    "ObservedRow",
    "knee",
    "knee_of",
    "merge",
    "read_sidecar",
    "sidecar_path",
    "summarize",
    "write_sidecar",
]

OBSERVE_SUFFIX: Final = ".observe.jsonl"
KNEE_FACTOR: Final = 1.5
KNEE_MIN_SAMPLES: Final = 5  # reactions a bucket needs to count for the knee
KNEE_MIN_SPREAD: Final = 1.5  # the highest bucket rate over the lowest, at least: a ramp
_OUTCOMES: Final = ("reacted", "unreacted", "stale", "unread")


def sidecar_path(results: str) -> str:
    return f"{results}{OBSERVE_SUFFIX}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ObserveHeader:
    """How the observation was made: the source, the clock offset and its bound."""

    source: str
    offset_s: float | None  # server - ours; None: no Date header seen, taken as 0
    bound_s: float | None  # |true offset - offset_s| <= bound_s; None: unknown
    offset_how: str
    reaction_timeout: float
    sample: float
    budget: float  # reads per second at most
    reads: int = 0
    skipped_repeats: int = 0  # events to an instance already observed this run
    t0: float = 0.0  # epoch of the load's first arrival

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "offset_ms": None if self.offset_s is None else round(self.offset_s * 1000, 3),
            "offset_bound_ms": None if self.bound_s is None else round(self.bound_s * 1000, 3),
            "offset_how": self.offset_how,
            "reaction_timeout_s": self.reaction_timeout,
            "sample": self.sample,
            "budget_per_s": self.budget,
            "reads": self.reads,
            "skipped_repeats": self.skipped_repeats,
            "t0": self.t0,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ObserveHeader:
        off, bound = doc.get("offset_ms"), doc.get("offset_bound_ms")
        return cls(
            source=str(doc["source"]),
            offset_s=None if off is None else float(off) / 1000,
            bound_s=None if bound is None else float(bound) / 1000,
            offset_how=str(doc.get("offset_how", "")),
            reaction_timeout=float(doc["reaction_timeout_s"]),
            sample=float(doc["sample"]),
            budget=float(doc["budget_per_s"]),
            reads=int(doc.get("reads", 0)),
            skipped_repeats=int(doc.get("skipped_repeats", 0)),
            t0=float(doc.get("t0", 0.0)),
        )


@dataclass(slots=True, kw_only=True)
class ObservedRow:
    """One observed event: our epoch times, the server's as read (epoch, its clock)."""

    key: str
    instance_id: str
    sent: float
    accepted: float
    wait_end: float | None = None
    wait_failed: bool = False  # the wait ended without its event (timed out)
    next_end: float | None = None
    instance_end: float | None = None
    read_ok: bool = False  # at least one read answered with the instance's steps
    reads: int = 0
    # The event's own timestamp in the wait's output (wrangler dev, the emulator): when
    # the server accepted it, on the server's clock, so wait_end - event_at needs no offset.
    event_at: float | None = None
    settled: bool = False  # consumed and ended, or read after its timeout

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "instance_id": self.instance_id,
            "sent": self.sent,
            "accepted": self.accepted,
            "wait_end": self.wait_end,
            "wait_failed": self.wait_failed,
            "next_end": self.next_end,
            "instance_end": self.instance_end,
            "read_ok": self.read_ok,
            "reads": self.reads,
            "event_at": self.event_at,
            "settled": self.settled,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ObservedRow:
        def num(name: str) -> float | None:
            value = doc.get(name)
            return None if value is None else float(value)

        return cls(
            key=str(doc["key"]),
            instance_id=str(doc["instance_id"]),
            sent=float(doc["sent"]),
            accepted=float(doc["accepted"]),
            wait_end=num("wait_end"),
            wait_failed=bool(doc.get("wait_failed", False)),
            next_end=num("next_end"),
            instance_end=num("instance_end"),
            read_ok=bool(doc.get("read_ok", False)),
            reads=int(doc.get("reads", 0)),
            event_at=num("event_at"),
            settled=bool(doc.get("settled", True)),
        )


@dataclass(slots=True)
class ObserveSummary:
    header: ObserveHeader
    reaction: LatencySummary
    server_reaction: LatencySummary
    next_step: LatencySummary
    completion: LatencySummary
    counts: dict[str, int]
    # (accepted, reaction ms) of each reacted event, for the plot
    points: list[tuple[float, float]] = field(default_factory=list)

    @property
    def judged(self) -> int:
        return self.counts["reacted"] + self.counts["unreacted"]

    @property
    def unreacted(self) -> float | None:
        return self.counts["unreacted"] / self.judged if self.judged else None

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"unreacted": self.unreacted}
        for prefix, lat in (
            ("reaction_", self.reaction),
            ("next_step_", self.next_step),
            ("completion_", self.completion),
        ):
            values = lat.as_dict()
            for name in ("p50", "p90", "p95", "p99", "max", "mean", "min"):
                out[prefix + name] = values[name]
        return out

    def as_dict(self, accept: LatencySummary | None = None) -> dict[str, Any]:
        """With ``accept`` (the 2xx answers' latency) beside the reaction's."""
        return {
            **self.header.as_dict(),
            "counts": dict(self.counts),
            "unreacted": self.unreacted,
            **({} if accept is None else {"accept_ms": accept.as_dict()}),
            "reaction_ms": self.reaction.as_dict(),
            "server_reaction_ms": self.server_reaction.as_dict(),
            "next_step_ms": self.next_step.as_dict(),
            "completion_ms": self.completion.as_dict(),
        }


def summarize(header: ObserveHeader, rows: Iterable[ObservedRow]) -> ObserveSummary:
    offset = header.offset_s or 0.0
    bound = header.bound_s or 0.0
    timeout_ms = header.reaction_timeout * 1000
    reaction, next_step, completion = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    server = LatencyHistogram()
    counts = dict.fromkeys(_OUTCOMES, 0)
    points: list[tuple[float, float]] = []
    for row in rows:
        if row.wait_end is None:
            # Not consumed by a read after the timeout: unreacted. A run stopped before
            # that read cannot tell: unread.
            unreacted = row.settled and (row.read_ok or row.wait_failed)
            counts["unreacted" if unreacted else "unread"] += 1
            continue
        if row.wait_failed:
            counts["unreacted"] += 1
            continue
        end = row.wait_end - offset
        if end < row.sent - bound:
            counts["stale"] += 1
            continue
        ms = max(0.0, (end - row.accepted) * 1000)
        if ms > timeout_ms:
            counts["unreacted"] += 1
            continue
        counts["reacted"] += 1
        reaction.record(ms)
        points.append((row.accepted, ms))
        if row.event_at is not None:
            server.record(max(0.0, (row.wait_end - row.event_at) * 1000))
        if row.next_end is not None:
            next_step.record(max(0.0, (row.next_end - offset - row.accepted) * 1000))
        if row.instance_end is not None:
            completion.record(max(0.0, (row.instance_end - offset - row.accepted) * 1000))
    return ObserveSummary(
        header=header,
        reaction=reaction.summary(),
        server_reaction=server.summary(),
        next_step=next_step.summary(),
        completion=completion.summary(),
        counts=counts,
        points=points,
    )


def knee(
    arrivals: Sequence[float], reactions: Sequence[tuple[float, float]], width: float
) -> tuple[float | None, list[tuple[float, float]]]:
    """(knee rate or None, [(arrival rate, reaction p50 ms)] per bucket) — see the module.

    ``arrivals``: epoch send times of every arrival; ``reactions``: (accepted epoch, ms).
    """
    if not arrivals or not reactions or width <= 0:
        return None, []
    t0 = min(arrivals)
    n = int((max(arrivals) - t0) // width) + 1
    rate = [0.0] * n
    for t in arrivals:
        rate[min(int((t - t0) // width), n - 1)] += 1 / width
    per: list[list[float]] = [[] for _ in range(n)]
    for t, ms in reactions:
        b = int((t - t0) // width)
        if 0 <= b < n:
            per[b].append(ms)
    curve = sorted(
        (rate[b], statistics.median(per[b])) for b in range(n) if len(per[b]) >= KNEE_MIN_SAMPLES
    )
    if len(curve) < 3 or curve[-1][0] < KNEE_MIN_SPREAD * curve[0][0]:
        return None, curve  # too few buckets, or no ramp: the rate hardly changed
    low = curve[: max(1, len(curve) // 3)]
    baseline = statistics.median(p for _, p in low)
    limit = KNEE_FACTOR * baseline
    found: float | None = None
    for r, p in reversed(curve):
        if p > limit:
            found = r
        else:
            break
    if found is not None and found == curve[0][0]:
        return None, curve  # above the baseline everywhere cannot be: no knee to tell
    return found, curve


def merge(parts: Sequence[tuple[ObserveHeader, list[ObservedRow]]]) -> ObserveSummary:
    """One summary over several runs' sidecars: each run's server times are put on our
    clock with its own offset first; the bound is the widest of them."""
    if len(parts) == 1:
        return summarize(*parts[0])
    rows: list[ObservedRow] = []
    for header, own in parts:
        off = header.offset_s or 0.0
        for r in own:

            def mv(t: float | None, off: float = off) -> float | None:
                return None if t is None else t - off

            rows.append(
                ObservedRow(
                    key=r.key, instance_id=r.instance_id, sent=r.sent, accepted=r.accepted,
                    wait_end=mv(r.wait_end), wait_failed=r.wait_failed,
                    next_end=mv(r.next_end), instance_end=mv(r.instance_end),
                    read_ok=r.read_ok, reads=r.reads, event_at=mv(r.event_at),
                    settled=r.settled,
                )
            )  # fmt: skip
    bounds = [h.bound_s for h, _ in parts]
    first = parts[0][0]
    header = ObserveHeader(
        source="; ".join(sorted({h.source for h, _ in parts})),
        offset_s=0.0,
        bound_s=None if any(b is None for b in bounds) else max(b or 0.0 for b in bounds),
        offset_how=f"each of {len(parts)} runs' own offset applied",
        reaction_timeout=first.reaction_timeout,
        sample=first.sample,
        budget=first.budget,
        reads=sum(h.reads for h, _ in parts),
        skipped_repeats=sum(h.skipped_repeats for h, _ in parts),
        t0=min(h.t0 for h, _ in parts),
    )
    return summarize(header, rows)


def knee_of(arrivals: Sequence[float], summary: ObserveSummary) -> float | None:
    """The knee over buckets of the narrowest round width giving at most 30."""
    from dispatcher.report.summary import choose_bucket

    if not arrivals:
        return None
    width = float(choose_bucket(max(arrivals) - min(arrivals), 30))
    return knee(arrivals, summary.points, width)[0]


def write_sidecar(path: str, header: ObserveHeader, rows: Iterable[ObservedRow]) -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps({"observe": header.as_dict()}) + b"\n")
        for row in rows:
            f.write(orjson.dumps(row.as_dict()) + b"\n")


def read_sidecar(path: str) -> tuple[ObserveHeader, list[ObservedRow]]:
    """Raises :class:`ValueError` naming the file and line of what cannot be read."""
    header: ObserveHeader | None = None
    rows: list[ObservedRow] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    doc = orjson.loads(raw)
                    if header is None:
                        header = ObserveHeader.from_dict(doc["observe"])
                    else:
                        rows.append(ObservedRow.from_dict(doc))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    if raw.endswith(b"\n"):
                        raise ValueError(f"{path}:{lineno}: not an observation ({exc})") from None
                    break  # a torn last line: what came before stands
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if header is None:
        raise ValueError(f"{path}:1: no observe header")
    return header, rows


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:,.2f} s" if v >= 10_000 else f"{v:,.1f} ms"


def _row(name: str, lat: LatencySummary) -> str:
    if not lat.count:
        return f"  {name:<11}-"
    return (
        f"  {name:<11}p50 {_ms(lat.p50_ms)}  p90 {_ms(lat.p90_ms)}  p99 {_ms(lat.p99_ms)}  "
        f"max {_ms(lat.max_ms)}  (n={lat.count:,})"
    )


def offset_text(h: ObserveHeader) -> str:
    if h.offset_s is None:
        return f"clock offset taken as 0 ({h.offset_how})"
    bound = "unknown" if h.bound_s is None else f"±{h.bound_s * 1000:,.1f} ms"
    return f"clock offset {h.offset_s * 1000:+,.1f} ms {bound} ({h.offset_how})"


def render(s: ObserveSummary, accept: LatencySummary, fmt: str, knee_rate: float | None) -> str:
    """The observation's section: accept and reaction latency side by side."""
    h = s.header
    c = s.counts
    unreacted = "-" if s.unreacted is None else f"{s.unreacted:.2%}"
    if fmt == "markdown":
        lines = ["## Workflow reaction (load --observe)", ""]
        lines += [f"Source: {h.source}; {offset_text(h)}.", ""]
        lines += ["| latency | p50 | p90 | p99 | max | n |"]
        lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, lat in (
            ("accept (2xx)", accept),
            ("reaction", s.reaction),
            ("reaction, server clock", s.server_reaction),
            ("next step", s.next_step),
            ("completion", s.completion),
        ):
            lines.append(
                f"| {name} | {_ms(lat.p50_ms)} | {_ms(lat.p90_ms)} | {_ms(lat.p99_ms)} | "
                f"{_ms(lat.max_ms)} | {lat.count} |"
            )
        lines += ["", f"Reacted {c['reacted']}, unreacted {c['unreacted']} ({unreacted}), "
                  f"stale {c['stale']}, unread {c['unread']}."]  # fmt: skip
        if knee_rate is not None:
            lines.append(f"Knee: reaction climbs from about {knee_rate:,.1f} arrivals/s.")
        return "\n".join(lines)
    lines = [
        "",
        f"observe    source: {h.source}",
        f"  {offset_text(h)}",
        f"  sample {h.sample:.0%}, reaction timeout {h.reaction_timeout:g} s, reads {h.reads:,} "
        f"(at most {h.budget:,.1f}/s)",
        _row("accept", accept),
        _row("reaction", s.reaction),
        _row("  server", s.server_reaction),
        _row("next step", s.next_step),
        _row("completion", s.completion),
        f"  observed   {sum(c.values()):,}: {c['reacted']:,} reacted, {c['unreacted']:,} "
        f"unreacted ({unreacted}), {c['stale']:,} stale, {c['unread']:,} unread"
        + (f"; {h.skipped_repeats:,} repeats not observed" if h.skipped_repeats else ""),
    ]
    if knee_rate is not None:
        lines.append(f"  knee       reaction climbs from about {knee_rate:,.1f} arrivals/s")
    return "\n".join(lines)
