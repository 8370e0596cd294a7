"""One page a person can read at a glance: latency over time, rate per second, histogram.

``.png`` is drawn with matplotlib (Agg backend, no display needed), ``.html`` with plotly
(one self-contained file with plotly.js inside, so it opens offline, zooms and hovers).
Both are the optional ``plot`` extra: ``pip install 'cf-workflows-dispatcher[plot]'``; without it
:class:`PlotUnavailable` says so, and the commands check that before doing any work.

The three panels share one time axis, seconds since the run's start:

1. latency of every request at its send time (points, coloured by outcome; every k-th
   one past :data:`MAX_POINTS`), with the confirmed requests' p50 and p99 per time bucket
   drawn as lines;
2. requests per second by answer time, stacked: confirmed, 429, other errors, no answer,
   plus, for a load test, arrivals dropped for want of an idle worker and the target rate.
   Every request counts, retries included: an envelope's ``statuses`` counts its attempts
   by outcome, and those before the last (whose times are not recorded) are placed evenly
   between the record's first request and its last;
3. the latency histogram with the report's p50/p90/p99 (HdrHistogram's) of the 2xx
   answers marked.

With ``load --observe`` (a sidecar ``RESULTS.observe.jsonl``) two panels follow:

4. reaction latency (accepted → the waitForEvent step's end) of each observed event by
   its acceptance time, with the accept latency's p50 per bucket beside it for scale;
5. reaction p50 per time bucket against the arrival rate of that bucket, which during a
   ramp is the saturation curve, with the knee marked (dispatcher.report.observed.knee).

The headline's latency figures are the 2xx answers' too (``p50 (2xx)``), as the load
thresholds judge them; the other answers' p50 (429s first of all) is shown beside them.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from dispatcher.model import Envelope, UserError
from dispatcher.report.summary import Report, choose_bucket

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from dispatcher.report.observed import ObserveSummary

__all__ = [
    "MAX_POINTS",
    "LoadOverlay",
    "PlotUnavailable",
    "Points",
    "check_plot_path",
    "write_plot",
]

# Past this many requests the scatter shows every k-th one (lines and bars use them all):
# beyond it a PNG is a solid smear and an HTML page gets slow to open.
MAX_POINTS: Final = 100_000
_MAX_TIME_BUCKETS: Final = 300
INSTALL_HINT: Final = "pip install 'cf-workflows-dispatcher[plot]'"

# Outcome categories, in stacking order; EARLIER only for retries of envelopes written
# before they counted their attempts' outcomes.
OK, RATE_LIMITED, HTTP_ERROR, NO_ANSWER, EARLIER = 0, 1, 2, 3, 4
_LABELS: Final = (
    "confirmed",
    "429 rate limited",
    "other HTTP error",
    "no answer (timeout/conn.)",
    "earlier attempt (outcome not recorded)",
)
_COLORS: Final = ("#2b7bba", "#f39c12", "#d62728", "#222222", "#b39ddb")
_DROPPED_COLOR: Final = "#9e9e9e"
_LEGEND: Final[dict[str, Any]] = {
    "loc": "upper left",
    "bbox_to_anchor": (1.005, 1.0),
    "fontsize": 9,
    "frameon": False,
}


class PlotUnavailable(UserError):
    """The plotting library for this file type is not installed."""


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty run has nothing to explain
        ax.legend(**_LEGEND)


def _suffix(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ValueError(f"--plot {path!r}: the file must end in .png or .html")
    return suffix


def check_plot_path(path: str) -> None:
    """Fail early (before a run) if ``path`` cannot be plotted to: wrong suffix, no library."""
    if _suffix(path) == ".png":
        _import_matplotlib()
    else:
        _import_plotly()


def _import_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            f"a .png plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    return plt


def _import_plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise PlotUnavailable(
            f"an .html plot needs plotly, which is not installed: {INSTALL_HINT}"
        ) from None
    return go


def _kind_of(outcome: str) -> int:
    """The category of an answer that confirmed nothing, from its ``statuses`` key: an
    HTTP status, or an error kind (no answer)."""
    if outcome == "429":
        return RATE_LIMITED
    if outcome.isdigit():
        return HTTP_ERROR
    return NO_ANSWER


class Points:
    """Per-request columns, 17 bytes a request: send time (epoch s), latency (ms), outcome;
    and 9 bytes per earlier attempt (a retried record's requests before its last): an
    estimated answer time and the outcome."""

    __slots__ = ("earlier_kind", "earlier_t", "kind", "latency", "t")

    def __init__(self) -> None:
        self.t = array("d")
        self.latency = array("d")
        self.kind = array("b")
        self.earlier_t = array("d")
        self.earlier_kind = array("b")

    def __len__(self) -> int:
        return len(self.t)

    @property
    def requests(self) -> int:
        """Every request placed: last attempts and earlier ones."""
        return len(self.t) + len(self.earlier_t)

    def add(self, env: Envelope) -> None:
        lat = env.latency_ms
        finished = env.finished_at.timestamp()
        earlier = dict(env.statuses) if env.statuses else {}
        if lat is not None:
            # The envelope has the finish time; the request left one latency earlier.
            last_sent = finished - lat / 1000.0
            self.t.append(last_sent)
            self.latency.append(lat)
            last = str(env.status) if env.status is not None else _last_error(env)
            self.kind.append(OK if env.ok else _kind_of(last))
            if earlier.get(last, 0) > 0:
                earlier[last] -= 1
            elif earlier:
                # Counted under another name than expected: take one off the largest count
                # so that the total stays the number of requests made.
                top = max(earlier, key=lambda k: earlier[k])
                earlier[top] -= 1
        else:
            last_sent = finished
        if not earlier and env.attempts > (1 if lat is not None else 0):
            earlier = {"": env.attempts - (1 if lat is not None else 0)}
        n = sum(c for c in earlier.values() if c > 0)
        if n <= 0:
            return
        # When each earlier attempt was answered is not recorded: spread them evenly from
        # the record's first request to its last.
        start = env.started_at.timestamp() if env.started_at is not None else last_sent
        start = min(start, last_sent)
        step = (last_sent - start) / n
        i = 0
        for outcome, count in sorted(earlier.items()):
            kind = EARLIER if outcome == "" else _kind_of(outcome)
            for _ in range(max(count, 0)):
                self.earlier_t.append(start + step * i)
                self.earlier_kind.append(kind)
                i += 1


def _last_error(env: Envelope) -> str:
    return str(env.error.kind) if env.error is not None else "none"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOverlay:
    """What only a load test knows: its clock's origin, target rate and dropped arrivals."""

    t0: float  # epoch seconds of the first arrival
    target: Sequence[tuple[float, float]]  # (seconds since t0, requests/s), piecewise linear
    dropped: Sequence[float]  # epoch seconds of each dropped arrival


@dataclass(frozen=True, slots=True)
class _Series:
    """Everything both back ends draw, computed once with numpy."""

    t: npt.NDArray[np.float64]  # send time, s since t0
    latency: npt.NDArray[np.float64]
    kind: npt.NDArray[np.int8]
    shown: npt.NDArray[np.intp]  # indices of the points to scatter
    width: float  # time bucket, s
    centers: npt.NDArray[np.float64]  # bucket centres
    p50: npt.NDArray[np.float64]  # NaN where a bucket has no request
    p99: npt.NDArray[np.float64]
    per_kind: list[npt.NDArray[np.float64]]  # requests/s per outcome, by answer time
    dropped: npt.NDArray[np.float64] | None  # dropped arrivals/s
    target: list[tuple[float, float]] | None
    log_latency: bool
    hist_edges: npt.NDArray[np.float64]
    hist_counts: npt.NDArray[np.float64]


def _series(points: Points, overlay: LoadOverlay | None) -> _Series:
    import numpy as np

    t_abs = np.frombuffer(points.t, dtype=np.float64)
    latency = np.frombuffer(points.latency, dtype=np.float64)
    kind = np.frombuffer(points.kind, dtype=np.int8)
    dropped_abs = (
        np.asarray(overlay.dropped, dtype=np.float64) if overlay is not None else np.empty(0)
    )
    earlier_abs = np.frombuffer(points.earlier_t, dtype=np.float64)
    earlier_kind = np.frombuffer(points.earlier_kind, dtype=np.int8)
    if overlay is not None:
        t0 = overlay.t0
    elif len(t_abs) or len(earlier_abs):
        t0 = float(np.concatenate((t_abs, earlier_abs)).min())
    else:
        t0 = 0.0
    t = t_abs - t0
    earlier_t = earlier_abs - t0
    finish = t + latency / 1000.0
    end = max(
        float(finish.max()) if len(finish) else 0.0,
        float(earlier_t.max()) if len(earlier_t) else 0.0,
        float(dropped_abs.max() - t0) if len(dropped_abs) else 0.0,
        max((x for x, _ in overlay.target), default=0.0) if overlay is not None else 0.0,
    )
    width = float(choose_bucket(end, _MAX_TIME_BUCKETS))
    n = max(1, math.ceil(end / width + 1e-9))
    edges = np.arange(n + 1, dtype=np.float64) * width
    centers = edges[:-1] + width / 2

    # p50/p99 per bucket of send time, of the confirmed requests only (a 429 answers in a
    # fraction of a millisecond and would pull the line down): sort by bucket, split, one
    # percentile call each.
    p50 = np.full(n, np.nan)
    p99 = np.full(n, np.nan)
    confirmed = kind == OK
    t_ok, latency_ok = t[confirmed], latency[confirmed]
    if len(t_ok):
        idx = np.clip((t_ok // width).astype(np.int64), 0, n - 1)
        order = np.argsort(idx, kind="stable")
        bounds = np.searchsorted(idx[order], np.arange(n + 1))
        for b in range(n):
            chunk = latency_ok[order[bounds[b] : bounds[b + 1]]]
            if len(chunk):
                p50[b], p99[b] = np.percentile(chunk, [50, 99])

    per_kind = []
    for k in range(len(_LABELS)):
        at = np.concatenate((finish[kind == k], earlier_t[earlier_kind == k]))
        counts, _ = np.histogram(np.clip(at, 0, edges[-1]), bins=edges)
        per_kind.append(counts / width)
    dropped = None
    if overlay is not None:
        counts, _ = np.histogram(np.clip(dropped_abs - t0, 0, edges[-1]), bins=edges)
        dropped = counts / width

    shown = np.arange(len(t))
    if len(t) > MAX_POINTS:
        shown = shown[:: math.ceil(len(t) / MAX_POINTS)]

    positive = latency[latency > 0]
    log_latency = False
    if len(positive):
        lo, mid, hi = np.percentile(positive, [1, 50, 100])
        # A long tail squashes a linear axis into a line at the bottom: go logarithmic
        # when the slowest request is 20x the median or the fastest 10x below it.
        log_latency = bool(hi > 20 * mid or (lo > 0 and mid > 10 * lo))
    if len(positive) and log_latency:
        bins = np.geomspace(max(float(positive.min()), 1e-3), float(positive.max()) * 1.001, 60)
    elif len(latency):
        bins = np.linspace(0.0, max(float(latency.max()), 1e-3) * 1.001, 60)
    else:
        bins = np.linspace(0.0, 1.0, 2)
    hist_counts, hist_edges = np.histogram(latency, bins=bins)
    target = list(overlay.target) if overlay is not None and overlay.target else None
    return _Series(
        t=t,
        latency=latency,
        kind=kind,
        shown=shown,
        width=width,
        centers=centers,
        p50=p50,
        p99=p99,
        per_kind=per_kind,
        dropped=dropped,
        target=target,
        log_latency=log_latency,
        hist_edges=hist_edges,
        hist_counts=hist_counts.astype(np.float64),
    )


def _headline(report: Report, overlay: LoadOverlay | None, points: Points) -> str:
    # The 2xx answers' latency: a 429 comes back in a fraction of a millisecond, and mixed
    # in it would make a server that refuses most requests look fast (as the thresholds).
    lat = report.latency_accepted
    other = report.latency_rejected

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f} ms"

    # Every request, retries included (the envelopes' per-attempt statuses), not one per
    # record: a run that retried 482 faults made 10,482 requests for 10,000 records.
    requests = sum(report.requests.values()) if report.requests else report.attempts.total
    retried = requests - report.sent
    parts = [
        f"{report.sent:,} records sent, {requests:,} requests"
        + (f" ({retried:,} retries)" if retried > 0 else ""),
        f"{report.confirmed:,} confirmed ({report.confirmed / report.records:.1%})"
        if report.records
        else "no records",
        f"p50 (2xx) {ms(lat.p50_ms)}",
        f"p90 (2xx) {ms(lat.p90_ms)}",
        f"p99 (2xx) {ms(lat.p99_ms)}",
        f"max (2xx) {ms(lat.max_ms)}",
    ]
    if other.count:
        parts.append(f"p50 (429 and other errors, {other.count:,}) {ms(other.p50_ms)}")
    if report.rate is not None:
        parts.append(f"{report.rate:,.1f} req/s")
    if overlay is not None:
        parts.append(f"{len(overlay.dropped):,} dropped")
    if len(points) > MAX_POINTS:
        parts.append(f"scatter: every {math.ceil(len(points) / MAX_POINTS)}th request")
    return "  ·  ".join(parts)


def _title(report: Report) -> str:
    names = ", ".join(os.path.basename(r.path) for r in report.runs) or "results"
    return f"dispatcher: {names}"


def write_plot(
    path: str,
    report: Report,
    points: Points,
    *,
    overlay: LoadOverlay | None = None,
    observed: ObserveSummary | None = None,
) -> None:
    """Draw ``points`` (with the ``report``'s percentiles) into ``path`` (.png or .html)."""
    suffix = _suffix(path)
    if suffix == ".png":
        _png(path, report, points, overlay, observed)
    else:
        _html(path, report, points, overlay, observed)


@dataclass(frozen=True, slots=True)
class _Reaction:
    t: list[float]  # accepted, s since t0
    ms: list[float]
    curve: list[tuple[float, float]]  # (arrival rate, reaction p50 ms) per bucket
    knee: float | None
    width: float


def _reaction(points: Points, overlay: LoadOverlay | None, observed: ObserveSummary) -> _Reaction:
    from dispatcher.report.observed import knee

    arrivals = list(points.t)
    if overlay is not None:
        t0 = overlay.t0
    elif arrivals:
        t0 = min(arrivals)
    else:
        t0 = observed.header.t0
    span = (max(arrivals) - min(arrivals)) if arrivals else 0.0
    width = float(choose_bucket(span, 30))
    rate, curve = knee(arrivals, observed.points, width)
    return _Reaction(
        t=[a - t0 for a, _ in observed.points],
        ms=[m for _, m in observed.points],
        curve=curve,
        knee=rate,
        width=width,
    )


def _png(
    path: str,
    report: Report,
    points: Points,
    overlay: LoadOverlay | None,
    observed: ObserveSummary | None = None,
) -> None:
    plt = _import_matplotlib()
    import numpy as np

    s = _series(points, overlay)
    rows, ratios = (5, [3, 2, 2, 2, 2]) if observed is not None else (3, [3, 2, 2])
    fig, axes = plt.subplots(
        rows, 1, figsize=(15, 11 if rows == 3 else 17), gridspec_kw={"height_ratios": ratios}
    )
    ax_lat, ax_rate, ax_hist = axes[0], axes[1], axes[2]
    try:
        if observed is not None:
            _png_reaction(axes[3], axes[4], _reaction(points, overlay, observed), s, observed)
        fig.suptitle(_title(report), fontsize=14, fontweight="bold", x=0.01, ha="left")
        fig.text(0.01, 0.955, _headline(report, overlay, points), fontsize=10, ha="left")

        # 1. latency over time
        for k in (OK, RATE_LIMITED, HTTP_ERROR, NO_ANSWER):
            sel = s.shown[s.kind[s.shown] == k]
            if not len(sel):
                continue
            ax_lat.plot(
                s.t[sel],
                s.latency[sel],
                linestyle="none",
                marker="x" if k != OK else ".",
                markersize=3 if k == OK else 5,
                alpha=0.35 if k == OK else 0.8,
                color=_COLORS[k],
                label=f"{_LABELS[k]} ({int((s.kind == k).sum()):,})",
                rasterized=True,
            )
        # Steps, not a zigzag: each value belongs to a whole bucket, not to its centre.
        for name, values, color in (("p50", s.p50, "#1b5e20"), ("p99", s.p99, "#7b1fa2")):
            # The last value repeated at the right edge, so the last bucket gets its step.
            ax_lat.plot(
                np.append(s.centers - s.width / 2, s.centers[-1] + s.width / 2),
                np.append(values, values[-1]),
                color=color,
                linewidth=2,
                drawstyle="steps-post",
                label=f"{name} (confirmed) per {s.width:g} s",
            )
        ax_lat.set_ylabel("latency (ms)")
        ax_lat.set_title(
            "latency of each record's last attempt, by send time", loc="left", fontsize=11
        )
        if s.log_latency:
            ax_lat.set_yscale("log")
        else:
            ax_lat.set_ylim(bottom=0)
        # Legends sit right of the panels: inside, they hide the points they explain.
        _legend(ax_lat)

        # 2. rate per second
        bottom = np.zeros(len(s.centers))
        bar_w = s.width * 0.9
        for k in range(len(_LABELS)):
            values = s.per_kind[k]
            if not values.any():
                continue
            ax_rate.bar(
                s.centers, values, width=bar_w, bottom=bottom, color=_COLORS[k], label=_LABELS[k]
            )
            bottom = bottom + values
        if s.dropped is not None and s.dropped.any():
            ax_rate.bar(
                s.centers,
                s.dropped,
                width=bar_w,
                bottom=bottom,
                color=_DROPPED_COLOR,
                hatch="//",
                label="dropped (no idle worker)",
            )
        if s.target is not None:
            xs, ys = zip(*s.target, strict=True)
            ax_rate.plot(xs, ys, color="black", linestyle="--", linewidth=1.5, label="target rate")
        unit = f"{s.width:g} s buckets"
        ax_rate.set_ylabel("per second")
        ax_rate.set_title(
            f"requests per second by answer time, retries included ({unit}; a record's "
            "earlier attempts spread evenly over its span)",
            loc="left",
            fontsize=11,
        )
        ax_rate.set_xlabel("seconds since start")
        _legend(ax_rate)
        top = float(bottom.max()) if len(bottom) else 0.0
        if s.dropped is not None and len(s.dropped):
            top = max(top, float((bottom + s.dropped).max()))
        if s.target is not None:
            top = max(top, max(y for _, y in s.target))
        ax_rate.set_ylim(0, max(top * 1.1, 1.0))
        right = max(float(s.centers[-1] + s.width / 2), 1.0)
        ax_lat.set_xlim(0, right)
        ax_rate.set_xlim(0, right)

        # 3. histogram
        widths = np.diff(s.hist_edges)
        ax_hist.bar(
            s.hist_edges[:-1],
            s.hist_counts,
            width=widths,
            align="edge",
            color="#5c8fc9",
            edgecolor="white",
            linewidth=0.3,
        )
        if s.log_latency:
            ax_hist.set_xscale("log")
        lat = report.latency_accepted
        for label, value, color in (
            ("p50 (2xx)", lat.p50_ms, "#1b5e20"),
            ("p90 (2xx)", lat.p90_ms, "#ef6c00"),
            ("p99 (2xx)", lat.p99_ms, "#7b1fa2"),
        ):
            if value is None:
                continue
            ax_hist.axvline(
                value, color=color, linestyle="--", linewidth=1.5, label=f"{label} {value:,.1f} ms"
            )
        _legend(ax_hist)
        ax_hist.set_xlabel("latency (ms)")
        ax_hist.set_ylabel("requests")
        ax_hist.set_title(
            "latency distribution (last attempt of each record)", loc="left", fontsize=11
        )
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _png_reaction(
    ax_time: Any, ax_curve: Any, r: _Reaction, s: _Series, observed: ObserveSummary
) -> None:
    ax_time.plot(
        r.t, r.ms, linestyle="none", marker=".", markersize=3, alpha=0.5, color="#00897b",
        label=f"reaction ({len(r.ms):,})", rasterized=True,
    )  # fmt: skip
    ax_time.plot(
        s.centers, s.p50, color="#1b5e20", linewidth=1.5, drawstyle="steps-mid",
        label=f"accept p50 (2xx) per {s.width:g} s",
    )  # fmt: skip
    lat = observed.reaction
    if lat.p50_ms is not None:
        ax_time.axhline(lat.p50_ms, color="#00897b", linestyle="--", linewidth=1,
                        label=f"reaction p50 {lat.p50_ms:,.1f} ms")  # fmt: skip
    ax_time.set_ylabel("ms")
    ax_time.set_ylim(bottom=0)
    ax_time.set_xlim(left=0)
    ax_time.set_xlabel("seconds since start (acceptance)")
    ax_time.set_title(
        "reaction latency: accepted → waitForEvent step's end (load --observe)",
        loc="left",
        fontsize=11,
    )
    _legend(ax_time)
    if r.curve:
        xs, ys = zip(*r.curve, strict=True)
        ax_curve.plot(xs, ys, marker="o", color="#00897b", label=f"reaction p50 per {r.width:g} s")
    if r.knee is not None:
        ax_curve.axvline(r.knee, color="#c62828", linestyle="--", linewidth=1.5,
                         label=f"knee ≈ {r.knee:,.1f}/s")  # fmt: skip
    ax_curve.set_xlabel("arrival rate (per second)")
    ax_curve.set_ylabel("reaction p50 (ms)")
    ax_curve.set_ylim(bottom=0)
    ax_curve.set_title(
        "reaction against arrival rate (knee: from where p50 stays above 1.5x its low-rate level)",
        loc="left",
        fontsize=11,
    )
    _legend(ax_curve)


def _html(
    path: str,
    report: Report,
    points: Points,
    overlay: LoadOverlay | None,
    observed: ObserveSummary | None = None,
) -> None:
    go = _import_plotly()
    from plotly.subplots import make_subplots

    s = _series(points, overlay)
    titles = [
        "latency of each record's last attempt, by send time (ms)",
        "requests per second by answer time, retries included",
        "latency distribution, last attempt of each record (ms)",
    ]
    if observed is not None:
        titles += [
            "reaction latency: accepted → waitForEvent step's end (ms)",
            "reaction p50 (ms) against arrival rate (/s), knee marked",
        ]
    fig = make_subplots(
        rows=len(titles),
        cols=1,
        vertical_spacing=0.06,
        subplot_titles=tuple(titles),
    )
    if observed is not None:
        r = _reaction(points, overlay, observed)
        fig.add_trace(
            go.Scattergl(x=r.t, y=r.ms, mode="markers", name="reaction",
                         marker={"color": "#00897b", "size": 4}),
            row=4, col=1,
        )  # fmt: skip
        if r.curve:
            xs, ys = zip(*r.curve, strict=True)
            fig.add_trace(
                go.Scatter(x=list(xs), y=list(ys), mode="lines+markers", name="reaction p50",
                           line={"color": "#00897b"}),
                row=5, col=1,
            )  # fmt: skip
        if r.knee is not None:
            fig.add_vline(x=r.knee, line_dash="dash", line_color="#c62828", row=5, col=1,
                          annotation_text=f"knee ≈ {r.knee:,.1f}/s")  # fmt: skip
    for k in (OK, RATE_LIMITED, HTTP_ERROR, NO_ANSWER):
        sel = s.shown[s.kind[s.shown] == k]
        if not len(sel):
            continue
        fig.add_trace(
            go.Scattergl(
                x=s.t[sel],
                y=s.latency[sel],
                mode="markers",
                name=_LABELS[k],
                marker={
                    "color": _COLORS[k],
                    "size": 4 if k == OK else 7,
                    "symbol": "circle" if k == OK else "x",
                    "opacity": 0.5,
                },
                legendgroup="lat",
            ),
            row=1,
            col=1,
        )
    for name, values, color in (("p50", s.p50, "#1b5e20"), ("p99", s.p99, "#7b1fa2")):
        fig.add_trace(
            go.Scatter(
                x=s.centers,
                y=values,
                mode="lines",
                name=f"{name} (confirmed) per bucket",
                line={"color": color, "width": 2},
            ),
            row=1,
            col=1,
        )
    for k in range(len(_LABELS)):
        if s.per_kind[k].any():
            fig.add_trace(
                go.Bar(
                    x=s.centers,
                    y=s.per_kind[k],
                    name=f"{_LABELS[k]}/s",
                    marker_color=_COLORS[k],
                    width=s.width * 0.9,
                ),
                row=2,
                col=1,
            )
    if s.dropped is not None and s.dropped.any():
        fig.add_trace(
            go.Bar(
                x=s.centers,
                y=s.dropped,
                name="dropped/s (no idle worker)",
                marker_color=_DROPPED_COLOR,
                width=s.width * 0.9,
            ),
            row=2,
            col=1,
        )
    if s.target is not None:
        xs, ys = zip(*s.target, strict=True)
        fig.add_trace(
            go.Scatter(
                x=list(xs),
                y=list(ys),
                mode="lines",
                name="target rate",
                line={"color": "black", "dash": "dash"},
            ),
            row=2,
            col=1,
        )
    centers = (s.hist_edges[:-1] + s.hist_edges[1:]) / 2
    fig.add_trace(
        go.Bar(
            x=centers,
            y=s.hist_counts,
            width=list(s.hist_edges[1:] - s.hist_edges[:-1]),
            name="requests",
            marker_color="#5c8fc9",
        ),
        row=3,
        col=1,
    )
    lat = report.latency_accepted
    for label, value, color in (
        ("p50 (2xx)", lat.p50_ms, "#1b5e20"),
        ("p90 (2xx)", lat.p90_ms, "#ef6c00"),
        ("p99 (2xx)", lat.p99_ms, "#7b1fa2"),
    ):
        if value is not None:
            fig.add_vline(
                x=math.log10(value) if s.log_latency else value,
                line_dash="dash",
                line_color=color,
                row=3,
                col=1,
                annotation_text=f"{label} {value:,.1f} ms",
                annotation_font_color=color,
            )
    fig.update_layout(
        barmode="stack",
        height=1100 if observed is None else 1700,
        title={"text": f"{_title(report)}<br><sup>{_headline(report, overlay, points)}</sup>"},
        legend={"orientation": "h"},
        template="plotly_white",
    )
    fig.update_xaxes(title_text="seconds since start", row=2, col=1)
    fig.update_xaxes(matches="x", row=2, col=1)
    if s.log_latency:
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_xaxes(type="log", row=3, col=1)
    fig.update_yaxes(title_text="ms", row=1, col=1)
    fig.update_yaxes(title_text="per second", row=2, col=1)
    fig.update_yaxes(title_text="requests", row=3, col=1)
    # plotly.js inside the file: the page must open where there is no internet.
    fig.write_html(path, include_plotlyjs=True, full_html=True)
