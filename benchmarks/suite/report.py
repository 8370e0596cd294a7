"""The table writer: BENCHMARKS.md and the text summary from the measurements."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from suite.compare import Comparison
from suite.config import (
    EVENT_BODY,
    FLAT_TOLERANCE,
    SUCCESS_BODY,
    TARGET_RATE_ERROR,
    TARGET_RSS_MIB,
    TARGET_VS_BASELINE,
    TARGET_VS_LEAN,
    TARGET_VS_SDK,
    deciles,
    pct,
    signed_pct,
    span,
    times,
    verdict_text,
)
from suite.memory import MemoryRun
from suite.peers import CONTENDERS, LOOPS, TOOLS
from suite.profiling import SAMPLE_RATE, Profile, profile_table, top_table
from suite.rate import RateRun


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass(slots=True)
class Report:
    command: str
    mode: str
    machine: dict[str, str]
    load_start: str
    concurrency: int
    load_end: str = ""
    wrk_rates: list[float] = field(default_factory=list)
    wrk_command: str = ""
    comparison: Comparison | None = None
    memory: list[MemoryRun] = field(default_factory=list)
    rate: RateRun | None = None
    elapsed_s: float = 0.0

    profiles: list[Profile] = field(default_factory=list)
    profile_events: int = 0
    strict_ns: float | None = None

    # -- figures

    def loops(self) -> list[str]:
        return list(LOOPS)

    def ratio(self, a: str, b: str) -> float:
        c = self.comparison
        assert c is not None
        return c.median_rate(a) / c.median_rate(b)

    def steady_ratio(self, a: str, b: str) -> float:
        c = self.comparison
        assert c is not None
        # 0 when start-up took all of a run's time (tiny runs): no figure, not a ratio.
        ours, theirs = c.steady_rate(a), c.steady_rate(b)
        return ours / theirs if ours > 0 and theirs > 0 else math.nan

    def cpu_ratio(self, a: str, b: str) -> float:
        """CPU per event of ``b`` over that of ``a``: above 1, ``a`` is cheaper."""
        c = self.comparison
        assert c is not None
        return c.median_cpu(b) / c.median_cpu(a)

    def verdicts(self) -> list[Verdict]:
        out = []
        c = self.comparison
        for loop in LOOPS:
            ours = f"dispatcher/{loop}"
            if c is not None:
                for tool, target in (
                    ("lean", TARGET_VS_LEAN),
                    ("typical", TARGET_VS_BASELINE),
                    ("sdk", TARGET_VS_SDK),
                ):
                    other = f"{tool}/{loop}"
                    ratio = self.ratio(ours, other)
                    out.append(
                        Verdict(
                            target=f"{ours} >= {target:g}x {other}'s events/s",
                            measured=f"{times(ratio)} (excl. start-up "
                            f"{times(self.steady_ratio(ours, other))}, CPU per event "
                            f"{times(self.cpu_ratio(ours, other))})",
                            met=ratio >= target,
                        )
                    )
            big = next((m for m in self.memory if m.loop == loop), None)
            if big is not None and not big.result.timed_out and big.result.problem is None:
                peak = big.result.maxrss_mib
                out.append(
                    Verdict(
                        target=f"{ours}: peak RSS <= {TARGET_RSS_MIB:g} MiB at "
                        f"{big.records:,} records",
                        measured=f"{peak:.1f} MiB",
                        met=peak <= TARGET_RSS_MIB,
                    )
                )
                if c is not None and c.results(ours):
                    small = statistics.median(r.maxrss_mib for r in c.results(ours))
                    out.append(
                        Verdict(
                            target=f"{ours}: peak RSS flat from {c.events[ours]:,} to "
                            f"{big.records:,} records (within {FLAT_TOLERANCE:.0%})",
                            measured=f"{small:.1f} -> {peak:.1f} MiB ({peak - small:+.1f} MiB)",
                            met=peak <= small * (1 + FLAT_TOLERANCE),
                        )
                    )
            else:
                out.append(
                    Verdict(
                        target=f"{ours}: peak RSS <= {TARGET_RSS_MIB:g} MiB at 1,000,000 records",
                        measured="no 1M-record run in this run (quick mode, `--skip memory`, "
                        "or it failed)",
                        met=None,
                    )
                )
        if self.rate is not None:
            r = self.rate
            err = r.server_rate / r.requested - 1
            out.append(
                Verdict(
                    target=f"rate within {TARGET_RATE_ERROR:.0%} of {r.requested:g}/s "
                    f"over {r.events / r.requested:g} s",
                    measured=f"{r.server_rate:.1f}/s ({signed_pct(err)})",
                    met=abs(err) <= TARGET_RATE_ERROR,
                )
            )
        return out

    # -- tables

    def like_for_like_table(self) -> list[str]:
        """The headline: dispatcher over each baseline, on the same event loop, same run."""
        c = self.comparison
        if c is None:  # --skip compare
            return ["(not measured in this run: `--skip compare`)"]
        rows = [
            "| loop | dispatcher events/s | lean events/s | **dispatcher / lean** | per round "
            "| typical events/s | **dispatcher / typical** | per round | httpx events/s "
            "| sdk events/s | CPU us/event: dispatcher, lean, floor |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for loop in LOOPS:
            d, lean, typ, hx, sdk, floor = (f"{tool}/{loop}" for tool in TOOLS)
            rows.append(
                f"| {loop} | {c.median_rate(d):,.0f} | {c.median_rate(lean):,.0f} | "
                f"**{times(self.ratio(d, lean))}** | {span(c.round_ratios(d, lean), times)} | "
                f"{c.median_rate(typ):,.0f} | **{times(self.ratio(d, typ))}** | "
                f"{span(c.round_ratios(d, typ), times)} | {c.median_rate(hx):,.0f} | "
                f"{c.median_rate(sdk):,.0f} | {c.median_cpu(d):,.0f}, {c.median_cpu(lean):,.0f}, "
                f"{c.median_cpu(floor):,.0f} |"
            )
        return rows

    def ratio_lines(self) -> list[str]:
        """The two headline ratios on each loop, one line each (for bench-quick)."""
        c = self.comparison
        if c is None:
            return []
        out = []
        for loop in LOOPS:
            d = f"dispatcher/{loop}"
            out.append(
                f"{loop:>8}: dispatcher / lean = {times(self.ratio(d, f'lean/{loop}'))}, "
                f"dispatcher / typical = {times(self.ratio(d, f'typical/{loop}'))}  "
                f"(CPU us/event: dispatcher {c.median_cpu(d):,.0f}, "
                f"lean {c.median_cpu(f'lean/{loop}'):,.0f}, "
                f"floor {c.median_cpu(f'floor/{loop}'):,.0f})"
            )
        return out

    def does_table(self) -> list[str]:
        """What each row does and skips: the ratios compare unequal work, said here."""
        return [
            "| row | reads and validates records | per-event result | durable (journal, "
            "fsync, resume) | retries, rate limit | HTTP client |",
            "| --- | --- | --- | --- | --- | --- |",
            "| dispatcher | yes: JSONL streamed, every record validated, keys derived | an "
            "envelope per event | yes: crash journal, group-committed fsync | yes (unlimited "
            "here) | its own httptools client |",
            "| lean | parsed with orjson, not validated; whole file in memory | no (a count) "
            "| no | no | aiohttp |",
            "| typical | `json.loads` per line, not validated | a `json.dumps` line per event, "
            "not fsynced | no | no | aiohttp |",
            "| httpx | as lean | no (a count) | no | no | httpx |",
            "| sdk | `json.loads` per line | a line per event, not fsynced | no | SDK's 2 "
            "retries | httpx (in the SDK) |",
            "| floor | as lean | no (a count) | no | no, and no timeouts or error "
            "handling | raw asyncio Protocol + httptools |",
        ]

    def loop_table(self) -> list[str]:
        """What uvloop gives each tool: uvloop's events/s over asyncio's, same run."""
        c = self.comparison
        assert c is not None
        rows = ["| tool | uvloop / asyncio, events/s | per round |", "| --- | ---: | ---: |"]
        for tool in TOOLS:
            u, a = f"{tool}/uvloop", f"{tool}/asyncio"
            rows.append(
                f"| {tool} | {times(self.ratio(u, a))} | {span(c.round_ratios(u, a), times)} |"
            )
        return rows

    def contender_table(self) -> list[str]:
        c = self.comparison
        assert c is not None
        rows = [
            "| contender | events | events/s | range | excl. start-up | CPU us/event "
            "| peak RSS MiB | start-up s | nginx busy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in CONTENDERS:
            rs = c.results(name)
            busy = [r.nginx_busy for r in rs if r.nginx_busy is not None]
            rows.append(
                f"| {name} | {c.events[name]:,} | **{c.median_rate(name):,.0f}** | "
                f"{span([r.rate for r in rs], lambda v: f'{v:,.0f}')} | "
                f"{c.steady_rate(name):,.0f} | "
                f"{c.median_cpu(name):,.0f} | "
                f"{statistics.median(r.maxrss_mib for r in rs):.1f} | "
                f"{c.median_startup(name):.2f} | "
                f"{pct(statistics.median(busy)) if busy else 'n/a'} |"
            )
        return rows

    def profile_section(self) -> list[str]:
        out = ["### Where the time goes: py-spy over `dispatcher send`", ""]
        if not self.profiles:
            return [*out, "Not run (py-spy missing, or left out)."]
        c = self.comparison
        cpu = {}
        if c is not None:
            cpu = {p.label: c.median_cpu(p.label) for p in self.profiles if c.results(p.label)}
        events = self.profile_events
        out += [
            f"One run of each, {events:,} events, sampled by py-spy at "
            f"{SAMPLE_RATE}/s (every thread; idle waits left out). A sample counts for the "
            "innermost `dispatcher/` frame on its stack (stages: `STAGES` in "
            "`benchmarks/suite/profiling.py`); `us` = that share of the contender's "
            "median CPU per event in the runs above. `start-up: imports` is a whole-run cost "
            "spread over the events.",
            "",
            *profile_table(self.profiles, cpu),
            "",
        ]
        for prof in self.profiles:
            out += [*top_table(prof), ""]
        if self.strict_ns is not None:
            out.append(
                f"The strict success check (`orjson.loads` of every 2xx body, which both "
                f"clients do: `is_success_envelope`) costs **{self.strict_ns:,.0f} ns** per "
                "answer on this "
                f"{len(SUCCESS_BODY)}-byte success body"
                + (
                    ": "
                    + ", ".join(
                        f"{self.strict_ns / 1000 / cpu[p]:.1%} of {p}'s CPU per event" for p in cpu
                    )
                    if cpu
                    else ""
                )
                + "."
            )
        return out

    def memory_table(self) -> list[str]:
        rows = [
            "| contender | records | wall s | events/s | peak RSS MiB "
            "| RSS at 10%, 20% ... 100% of the run, MiB |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for m in self.memory:
            r = m.result
            flag = " (stopped at its time limit)" if r.timed_out else ""
            rows.append(
                f"| dispatcher/{m.loop} | {m.records:,}{flag} | {r.wall_s:.1f} | {r.rate:,.0f} | "
                f"**{r.maxrss_mib:.1f}** | {deciles(r.rss_samples)} |"
            )
        return rows

    def rate_table(self) -> list[str]:
        r = self.rate
        assert r is not None
        return [
            "| requested | requests seen | span s | achieved (server) | error "
            "| achieved (envelopes) | max in any 1 s | wall s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r.requested:g}/s | {r.arrivals:,} | {r.server_span_s:.3f} | "
            f"**{r.server_rate:.1f}/s** | {signed_pct(r.server_rate / r.requested - 1)} | "
            f"{r.client_rate:.1f}/s | {r.max_per_second} | {r.result.wall_s:.2f} |",
        ]

    def verdict_table(self) -> list[str]:
        rows = ["| target | measured | |", "| --- | --- | --- |"]
        rows += [f"| {v.target} | {v.measured} | {verdict_text(v.met)} |" for v in self.verdicts()]
        return rows

    # -- outputs

    def text_summary(self) -> str:
        lines = ["", "=" * 100]
        lines.append(
            "nginx ceiling (wrk): " + ", ".join(f"{w:,.0f}" for w in self.wrk_rates) + " req/s"
        )
        if self.comparison is not None:
            lines += ["", *self.like_for_like_table(), "", *self.contender_table()]
            lines += ["", f"load average: {self.load_start} -> {self.load_end}"]
            lines += ["", *self.ratio_lines()]
        if self.memory:
            lines += ["", *self.memory_table()]
        if self.rate is not None:
            lines += ["", *self.rate_table()]
        lines += ["", *self.verdict_table(), "=" * 100]
        return "\n".join(lines)

    def markdown(self) -> str:
        m = self.machine
        conc = self.concurrency
        out = [
            "## Throughput, memory and rate: `make bench`",
            "",
            "Written by `benchmarks/run.py` (`make bench`) between the two `benchmarks/run.py` "
            "markers of this file; run it again rather than edit. "
            f"Mode: **{self.mode}**; the whole run took {self.elapsed_s / 60:.1f} min:",
            "",
            "```",
            self.command,
            "```",
            "",
            "Read the ratios: absolute figures move with the machine and its load, ratios "
            "between contenders measured in the same run, interleaved, much less.",
            "",
            "### Like for like: each ratio on one event loop",
            "",
            *self.like_for_like_table(),
            "",
            "Medians over the rounds; `per round`: the ratio within each round, lowest and "
            "highest; `CPU us/event`: the process's CPU time / events (floor: the "
            "Protocol + httptools loop, see below). Every contender runs on both loops in "
            f"every round, so no ratio mixes loops. Load average (1, 5, 15 min) "
            f"{self.load_start} at the start, {self.load_end} at the end, on "
            f"{m['cpus']} shared CPUs.",
            "",
            *self.does_table(),
            "",
            "### Targets",
            "",
            *self.verdict_table(),
            "",
            "### Machine",
            "",
            "| | |",
            "| --- | --- |",
            f"| date | {m['date']} |",
            f"| CPUs | {m['cpus']}: {m['cpu']} |",
            f"| RAM | {m['ram']} |",
            f"| OS | {m['os']} |",
            f"| Python | {m['python']} |",
            f"| packages | aiohttp {m['aiohttp']}, httpx {m['httpx']}, "
            f"cloudflare {m['cloudflare']}, httptools {m['httptools']}, anyio {m['anyio']}, "
            f"orjson {m['orjson']}, "
            f"uvloop {m['uvloop']} |",
            f"| event loops | {m['loops']} |",
            f"| server | {m['nginx']} |",
            f"| load generator | {m['wrk']} |",
            f"| code measured | git {m['git']} |",
            f"| load average (1, 5, 15 min) | {self.load_start} at the start, "
            f"{self.load_end} at the end |",
            "",
            "The machine is shared with other work (see the load average): expect noise in "
            "absolute figures.",
            "",
            "### The server: nginx, not the bottleneck",
            "",
            "nginx answers the success envelope with `return 200` on 127.0.0.1 (1 worker "
            "process, access log off), for any path of the send-event endpoint. Its ceiling, "
            f"measured with `{self.wrk_command}` posting a {len(EVENT_BODY)}-byte JSON body "
            "at the start and at the end of the run: **"
            + " and ".join(f"{w:,.0f}" for w in self.wrk_rates)
            + " requests/s**.",
        ]
        if self.comparison is not None:
            c = self.comparison
            fastest = max(c.median_rate(n) for n in CONTENDERS)
            out += [
                f"The lower of the two is {min(self.wrk_rates) / fastest:.0f}x the fastest "
                "contender below, and the `nginx busy` column (CPU time of the nginx worker "
                "during a run / the run's wall time) shows how little of one core it needed.",
                "",
                "### Events per second: six tools on two event loops, interleaved",
                "",
                f"{len(c.rounds)} rounds; in each, every contender runs once, in an order that "
                f"rotates from round to round, with {conc} requests in flight at most. Each run "
                "is a whole process: start the interpreter, read the JSONL, send every event, "
                "write its output, exit. events/s = events / wall time of that "
                "process. CPU and peak RSS come from `os.wait4` (the process's own "
                "`ru_utime + ru_stime` and `ru_maxrss`, taken by a bare `python -S` launcher "
                "that posix_spawns the contender: Linux carries the peak RSS across exec, so a "
                "contender forked from the benchmark itself would inherit its size as a "
                "floor). Every run is checked: exit code 0 and one `ok` result line per "
                "event (lean, httpx, floor: a summary line whose `ok` count equals the "
                "events). Figures are medians over the rounds.",
                "",
                "- **dispatcher/uvloop**: `dispatcher send INPUT --workflow W --results OUT "
                f"--rate unlimited --concurrency {conc} --quiet --overwrite --progress off` "
                "(uvloop installed: the dispatcher uses it; the default fast httptools "
                "client); **dispatcher/asyncio**: the "
                "same command started with uvloop hidden (`sys.modules['uvloop'] = None`, then "
                "the CLI's `main()`), so the dispatcher falls back to asyncio's default loop",
                "- **lean**: `benchmarks/baseline_lean.py`: input read as bytes, every request "
                "(URL, `orjson.dumps` body) built in memory first, one `ClientSession`, "
                f"{conc} workers on one shared iterator, `orjson.loads` of each answer to "
                "check `success`, one summary line at the end",
                "- **typical**: `benchmarks/baseline_aiohttp.py`, the simplest hand-written "
                f"aiohttp worker pool: one `ClientSession`, an `asyncio.Queue`, {conc} workers, "
                "`json.loads` per line, `session.post(url, json=body, headers=auth)`, "
                "`json.dumps` per result line",
                "- **httpx**: `benchmarks/baseline_httpx.py`: the lean client on one "
                f"`httpx.AsyncClient` ({conc} keep-alive connections)",
                "- **sdk**: `benchmarks/sdk_cloudflare.py`, the official `cloudflare` SDK's "
                "`AsyncCloudflare` (default retries) behind a queue-fed pool, "
                "`client.workflows.instances.events.create(...)` per event",
                "- **floor**: `benchmarks/floor_protocol.py`: requests prebuilt as bytes, "
                f"{conc} `asyncio.Protocol` connections, each writing its next request when "
                "httptools has parsed the last answer (`orjson.loads` success check); no "
                "futures, timeouts, errors, results: the floor of CPython on this work",
                "",
                "Each script takes `--loop uvloop` to run on `uvloop.new_event_loop`.",
                "",
            ]
            slow = [
                f"{tool} sends the first {c.events[f'{tool}/uvloop']:,}"
                for tool in ("httpx", "sdk")
                if c.events[f"{tool}/uvloop"] != c.events["dispatcher/uvloop"]
            ]
            if slow:
                out += [
                    "httpx's pool and the SDK are much slower per event, so "
                    + " and ".join(slow)
                    + f" events of the same input instead of all "
                    f"{c.events['dispatcher/uvloop']:,}.",
                    "",
                ]
            out += [
                *self.contender_table(),
                "",
                "`range`: slowest and fastest round. `excl. start-up`: events/s with the median "
                "wall time of a 1-event run of the same contender (interpreter start, imports, "
                "set-up, exit; one in every round) taken out. `CPU us/event`: the process's "
                "CPU time / events, less sensitive to the machine's load than wall time.",
                "",
                "What uvloop gives each tool (same run):",
                "",
                *self.loop_table(),
            ]
        records = f"{self.memory[0].records:,}" if self.memory else "1,000,000"
        out += ["", f"### Peak RSS of `dispatcher send` at {records} records, on each loop", ""]
        if self.memory:
            out += [
                "The same command and server, with "
                f"{self.memory[0].records:,} generated records; the peak at the runs above "
                "is the table above's. Peak RSS from `os.wait4`; RSS also read from "
                "`/proc/PID/status` once a second, shown at each tenth of the run.",
                "",
                *self.memory_table(),
            ]
        else:
            out.append("Not run in this run (quick mode or `--skip memory`).")
        out += ["", *self.profile_section()]
        out += ["", "### Rate accuracy", ""]
        if self.rate is not None:
            r = self.rate
            out += [
                f"`dispatcher send --rate {r.requested:g}/s --concurrency {conc}` with "
                f"{r.events:,} events, against a second nginx server block that logs every "
                "request's arrival time (`$msec`, millisecond resolution). Achieved rate = "
                "(requests - 1) / (last arrival - first arrival): the pace from the first to "
                "the last request, leaving out start-up and shut-down. `achieved "
                "(envelopes)` is the same from the client's side: each envelope's "
                "`finished_at - latency_ms` is when its request left. `max in any 1 s`: the "
                "most requests nginx saw in any sliding second.",
                "",
                *self.rate_table(),
            ]
        else:
            out.append("Not run.")
        if self.comparison is not None:
            out += [
                "",
                "### Every run",
                "",
                "| round | contender | events | wall s | events/s | CPU s | peak RSS MiB "
                "| nginx busy | 1-event run s |",
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for i, (rnd, start) in enumerate(
                zip(self.comparison.rounds, self.comparison.startup, strict=True), 1
            ):
                for name, one in rnd.items():
                    mark = f" (failed: {one.problem}; not counted)" if one.problem else ""
                    out.append(
                        f"| {i} | {name}{mark} | {one.events:,} | {one.wall_s:.2f} | "
                        f"{one.rate:,.0f} | {one.cpu_s:.2f} | {one.maxrss_mib:.1f} | "
                        f"{pct(one.nginx_busy)} | {start[name].wall_s:.2f} |"
                    )
        return "\n".join(out) + "\n"


BEGIN: Final = "<!-- benchmarks/run.py: begin (written by make bench; edit the script) -->"
END: Final = "<!-- benchmarks/run.py: end -->"
INTRO: Final = """\
# Benchmarks

Each section below is written by one script in `benchmarks/`; a script rewrites only its own
section, so run it again rather than edit. Speed claims are ratios against a baseline
measured in the same run.
"""


def write_section(path: Path, section: str) -> None:
    """Put ``section`` between this script's markers in ``path``, keeping everything else."""
    block = f"{BEGIN}\n\n{section.rstrip()}\n\n{END}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, _, rest = old.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail.removeprefix("\n")
    else:
        # First run with markers: the old file was all this script's, so it is replaced.
        text = f"{INTRO}\n{block}"
    path.write_text(text)
