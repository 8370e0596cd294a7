"""``--redis`` and ``--job``: wiring a run to the coordination stage.

With ``--redis`` the run's gate is the account's shared budget. With ``--job`` too, the
records come from shards of the job (the first process to arrive cuts the input into
shards while the others already start on them) and every envelope goes through its claim
before it is written, straight to the OS. Claims go in batches: one script call claims
what the engine finished meanwhile, marks the previous batch written and acknowledges
the shards it finished (see :mod:`dispatcher.coordination.job` for why a claim carries
its envelope until then, and who writes it when its process dies).

A stopped run (Ctrl-C) claims only what is final: a record stopped before its last
attempt, with no attempt that may have arrived, is neither claimed nor written (another
process, or the next run, sends it), and the shards it did not finish are handed back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import anyio.abc
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream

from dispatcher.coordination.budget import SharedGate
from dispatcher.coordination.coalesce import Coalescer, FlushCancelled
from dispatcher.coordination.connection import Link, RedisGone
from dispatcher.coordination.job import (
    HEARTBEAT_S,
    PENDING,
    RECOVER_WITHOUT_ENV,
    RECOVERY_WAIT_ENV,
    TIMEOUT_ENV,
    Job,
    JobMismatch,
    JobStateLost,
    Shard,
    heartbeat_timeout,
    recover_without,
    recovery_wait,
)
from dispatcher.inputs.keys import KeyDeriver
from dispatcher.inputs.records import (
    ReadOptions,
    detect_format,
    line_offsets,
    read_batches,
    read_line_range,
)
from dispatcher.model import Delivery, Envelope, ErrorKind, Event, Record, UserError
from dispatcher.results import envelopes as make_envelope
from dispatcher.results.errors import ResultsWriteError
from dispatcher.results.journal import (
    Journal,
    crashed_unsettled,
    iter_paths,
    remove_settled,
)
from dispatcher.results.ledger import envelope_from_json, load_ledger
from dispatcher.results.sinks import JsonlSink, Sink, encode
from dispatcher.run.settings import ConfigError, Rate, SendSettings
from dispatcher.sending.gate import default_burst
from dispatcher.sending.pacing import Pacer, guarded
from dispatcher.sending.stats import RunStats

__all__ = ["SHARD_RECORDS", "Coordinated", "coordinated"]

SHARD_RECORDS: Final = 2000  # lines per shard: a Stream entry per shard, not per record
SHARD_ENV: Final = "DISPATCHER_JOB_SHARD_LINES"  # for tests and benchmarks of small jobs
# Claims wait this long for company after the first envelope of a batch: at 50 records/s
# per process a batch then holds a few, so a claim costs well under a round trip each.
LINGER_S: Final = 0.05
MAX_CLAIMS: Final = 500  # envelopes per claim call
_LEAVE_S: Final = 3.0  # how long a stopping process tries to hand its shards back


def shard_lines() -> int:
    raw = os.environ.get(SHARD_ENV, "").strip()
    if not raw:
        return SHARD_RECORDS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(SHARD_ENV, f"must be a whole number of lines >= 1, got {raw!r}")
    return int(raw)


def check_job_settings(settings: SendSettings) -> None:
    """A --job's inputs and environment settings, before anything is sent (exit 2)."""
    if settings.job is None:
        return
    check_job_inputs(settings)
    shard_lines()
    try:
        heartbeat_timeout()
    except ValueError as exc:
        raise ConfigError(TIMEOUT_ENV, str(exc)) from None
    try:
        recovery_wait()
    except ValueError as exc:
        raise ConfigError(RECOVERY_WAIT_ENV, str(exc)) from None


def check_job_inputs(settings: SendSettings) -> None:
    for path in settings.inputs:
        if path == "-":
            raise ConfigError("--job", "shares line ranges of files: stdin cannot be shared")
        fmt = detect_format(path, settings.format)
        if fmt == "csv":
            raise ConfigError("--job", f"{path}: CSV rows may span lines; use JSONL or an id list")


class _Tracker:
    """Which shard each record in the engine came from, and how many are left per shard."""

    def __init__(self) -> None:
        self.shard_of: dict[str, list[str]] = {}
        self.left: Counter[str] = Counter()
        self.sealed: set[str] = set()

    def add(self, shard: str, keys: list[str]) -> None:
        for key in keys:
            self.shard_of.setdefault(key, []).append(shard)
        self.left[shard] += len(keys)

    def finished(self, key: str) -> str | None:
        """One record of ``key`` is final; its shard if that was the shard's last."""
        shards = self.shard_of.get(key)
        if not shards:
            return None
        shard = shards.pop()
        if not shards:
            del self.shard_of[key]
        self.left[shard] -= 1
        if self.left[shard] <= 0:
            del self.left[shard]
            return shard
        return None


class Coordinated:
    """One process's part in a coordinated run: the shared gate, and the job if any."""

    def __init__(self, settings: SendSettings, stats: RunStats, options: ReadOptions) -> None:
        self.settings = settings
        self.options = options
        self.stats = stats
        assert settings.redis_url is not None
        self.link = Link(settings.redis_url, on_state=self._state)
        rate = settings.rate
        requested = rate.per_second if isinstance(rate, Rate) else None
        burst = 1 if requested is None else default_burst(requested)
        # Keyed by account: every run on it shares the budget (a relay has none: its URL).
        budget_key = settings.account_id or settings.base_url
        self.gate = SharedGate(self.link, budget_key, requested, burst=burst)
        # The budget is the account's, shared in Redis: each process paces on all of it.
        self.pacer = Pacer(
            self.gate,
            requested,
            auto=rate == "auto",
            clock=time.monotonic,
            share=1.0,
            guarded=guarded(settings.base_url),
        )
        self.job = Job(self.link, settings.job) if settings.job is not None else None
        self._results_path = os.path.abspath(settings.results)
        self._tracker = _Tracker()
        self._tg: anyio.abc.TaskGroup | None = None
        self._fd: int | None = None
        self._sink: Sink | None = None
        # Set once the results refused a write (a full disk): from then on envelopes are
        # claimed but not written, so their claims keep them for the job's next process.
        self._broken: ResultsWriteError | None = None
        self._on_error: Callable[[ResultsWriteError], None] | None = None
        self._owed: tuple[list[str], list[str]] = ([], [])
        self.adopted = 0  # envelopes of dead workers' pending claims written here
        self.left = 0  # stopped records left unclaimed for another process
        # Set by the runner: stops the engine (no new record starts; in flight ones finish).
        self.stop_run: Callable[[str], None] | None = None
        self.lost: str | None = None  # why Redis's state of the job cannot be trusted
        self.in_doubt = 0  # `unknown` envelopes for records a dead process may have sent
        self.reseeded = 0  # settled records claimed again after Redis lost the job
        self.fingerprint = ""
        self.prior: dict[str, Any] | None = None  # the job file an earlier run left here
        self.recovering = ""  # why this run claims its results again (Redis lost them)
        self._recovered = False
        self._journal: Journal | None = None
        self._ready = anyio.Event()  # set once earlier runs' records in doubt are claimed
        self._peers: set[str] = set()  # results files of the job's workers on this host
        self._hosts: set[str] = set()  # hosts of the job's workers (every host's results count)
        if self.job is not None:
            self._hosts.add(self.job.host)
        self._seeded: set[str] = set()  # results files claimed again (after Redis lost all)
        self._sidecar = self._results_path + JOB_FILE
        self._journal_file: str | None = None  # this run's journal (known once joined)
        self.cut: list[Envelope] = []  # not claimed: the run gave up on Redis (RedisGone)
        # The write-ahead: keys announced to Redis before their first request, until their
        # envelope reaches the claims (see announce); what is left when the run ends was
        # never sent, and its announcement is withdrawn.
        self._ahead: set[str] = set()
        self._announcer: Coalescer[str] = Coalescer(self._flush_announced)

    def journal_path(self, base: str) -> str:
        """This run's journal: ``<results>.inflight.<n>``, n its number in the job."""
        assert self.job is not None
        return f"{base}.{int(self.job.tag, 16)}"

    async def join(self) -> None:
        """Join (or create) the job, bound to this input; find out whether Redis lost
        what an earlier run of these results saw of it."""
        job = self.job
        assert job is not None
        settings = self.settings
        self.fingerprint, described = await anyio.to_thread.run_sync(job_fingerprint, settings)
        try:
            await job.create(
                settings.account_id or settings.base_url,
                fingerprint=self.fingerprint,
                inputs=described,
            )
        except JobMismatch as exc:
            raise ConfigError(
                "--job", f"{job.name} {exc}: give this input its own --job name"
            ) from None
        except JobStateLost as exc:
            raise ConfigError(
                "--job", f"{exc}; the results files are the record: rerun under a new --job name"
            ) from None
        if settings.results != "-":
            self._journal_file = self.journal_path(self._results_path + ".inflight")
        prior = None if settings.overwrite else _read_job_file(self._sidecar)
        if (
            prior is None
            or prior.get("job") != job.name
            or prior.get("fingerprint") != self.fingerprint
        ):
            return
        self.prior = prior
        if prior.get("lost"):
            self.recovering = "an earlier run found that Redis had lost the job's state"
        elif prior.get("epoch") != job.epoch:
            self.recovering = "Redis holds a new job of that name (the old one was lost or expired)"
        elif await job.generation(str(prior.get("tag"))) < int(prior.get("gen") or 0):
            self.recovering = (
                "Redis holds an older state of the job than this process saw "
                "(restored from a snapshot)"
            )

    def _state(self, state: str) -> None:
        self.stats.coordination = None if state == "connected" else state

    # --- the records ---------------------------------------------------------------

    def _plan(self) -> Iterator[dict[str, str]]:
        """Shards of every input, with the keys a one-process run would give their records
        where a shard read alone would give another (repeats of an earlier shard's record)."""
        settings = self.settings
        options = self.options
        everything = KeyDeriver()
        try:
            for index, path in enumerate(settings.inputs):
                fmt = detect_format(path, settings.format)
                whole = (r for batch in read_batches(path, fmt, options, everything) for r in batch)
                for first, offset, count in line_offsets(path, shard_lines()):
                    own = KeyDeriver()
                    fixes: dict[str, str] = {}
                    n = 0
                    try:
                        for batch in read_line_range(
                            path, fmt, options, own, offset=offset, first_line=first, count=count
                        ):
                            for record in batch:
                                n += 1
                                truth = next(whole)
                                if truth.key != record.key:
                                    fixes[str(record.line)] = truth.key
                    finally:
                        own.close()
                    yield {
                        "input": str(index),
                        "path": path,
                        "offset": str(offset),
                        "first": str(first),
                        "lines": str(count),
                        "records": str(n),
                        "keys": _json(fixes),
                    }
        finally:
            everything.close()

    async def _publish_plan(self) -> None:
        assert self.job is not None
        job = self.job
        plan = self._plan()
        try:
            done = await job.published()  # a planner that died left off here
            shards = records = 0
            while True:
                shard = await anyio.to_thread.run_sync(next, plan, None)
                if shard is None:
                    break
                if shards >= done:
                    await job.publish(shards, shard)
                shards += 1
                records += int(shard["records"])
            await job.seal(shards, records)
        except JobStateLost as exc:
            self.lose(exc)
        job.planning = False

    def _read(self, shard: Shard) -> list[Record]:
        fields = shard.fields
        path = fields["path"]
        fmt = detect_format(path, self.settings.format)
        fixes = _unjson(fields.get("keys", "{}"))
        keys = KeyDeriver()
        out: list[Record] = []
        try:
            for batch in read_line_range(
                path,
                fmt,
                self.options,
                keys,
                offset=int(fields["offset"]),
                first_line=int(fields["first"]),
                count=int(fields["lines"]),
            ):
                for record in batch:
                    fixed = fixes.get(str(record.line))
                    if fixed is not None:
                        record = dataclasses.replace(record, key=fixed)
                    out.append(record)
        finally:
            keys.close()
        return out

    async def batches(self) -> AsyncGenerator[list[Record], None]:
        """Records of the shards this process takes, until every shard of the job is done."""
        job = self.job
        assert job is not None
        await self._ready.wait()
        try:
            async for batch in self._shards(job):
                yield batch
        except JobStateLost as exc:
            self.lose(exc)

    async def _shards(self, job: Job) -> AsyncGenerator[list[Record], None]:
        while self.lost is None:
            if self.recovering:
                # A process of the job that came back since: what its results hold too.
                for path in await self._learn_peers():
                    if path not in self._seeded:
                        await self._seed_file(path)
            shard = await job.take()
            if shard is None:
                if await job.done():
                    return
                if (
                    not job.planning
                    and self._tg is not None
                    and not await job.sealed()
                    and await job.become_planner()
                ):
                    self._tg.start_soon(self._publish_plan)
                continue
            records = await anyio.to_thread.run_sync(self._read, shard)
            final = await job.claimers([r.key for r in records])
            pending = {k: v for k, v in final.items() if v.startswith(PENDING)}
            if pending:
                await self._recover(pending, taken_over=shard.reclaimed)
            todo = [r for r in records if r.key not in final]
            if todo and shard.reclaimed:
                # Its holder died: what its journal says it had in flight is in doubt.
                settled = await self._claim_in_doubt(await self._dead_in_doubt(todo))
                todo = [r for r in todo if r.key not in settled]
            if not todo:
                await job.settle(acks=[shard.id])
                continue
            self._tracker.add(shard.id, [r.key for r in todo])
            for start in range(0, len(todo), 1000):
                yield todo[start : start + 1000]

    async def _recover(self, pending: dict[str, bytes], *, taken_over: bool) -> None:
        """Write the envelopes of dead workers' pending claims (they were claimed and then
        the process died, before its write or before saying it was done).

        In a shard ``taken_over`` from another process, every claim pending under another
        name is a dead one's: the shard came here because its holder stopped heartbeating
        (judged by Redis's clock, not by the hosts'). Elsewhere (a key repeated in another
        shard) a claim stands while its worker heartbeats: its write is on its way. A dead
        worker's claim is adopted and its envelope written here, unless the worker was on
        this host and its results file already has that key (it died after the write,
        before the mark): then it is only marked.
        """
        job = self.job
        assert job is not None
        beats = {str(b.get("tag")): b for b in (await job.workers()).values()}
        now = time.time()
        dead: dict[str, str] = {}
        for key, value in pending.items():
            worker = value[len(PENDING) :].split(b"\n", 1)[0].decode()
            if worker == job.tag:
                continue
            beat = beats.get(worker)
            if (
                taken_over
                or beat is None
                or beat.get("gone")
                or now - float(beat.get("seen", 0)) > job.timeout
            ):
                dead[key] = worker
        if not dead:
            return
        envelopes = await job.adopt(dead)
        on_file: set[str] = set()
        for worker in set(dead.values()):
            beat = beats.get(worker) or {}
            path = beat.get("results")
            if beat.get("host") == job.host and isinstance(path, str):
                on_file |= await anyio.to_thread.run_sync(_keys_in, path)
        data = b"".join(env for key, env in envelopes.items() if key not in on_file)
        if data:
            self._write(data)
        self.adopted += sum(1 for key in envelopes if key not in on_file)
        await job.settle(written=list(envelopes))

    async def _dead_in_doubt(self, todo: list[Record]) -> list[Envelope]:
        """``unknown`` envelopes for the records of ``todo`` that a dead worker may have
        sent: in its journal (same host), or in flight at its last heartbeat."""
        job = self.job
        assert job is not None
        wanted = {r.key: r for r in todo}
        now = time.time()
        beats = [b for b in (await job.workers()).values() if b.get("tag") != job.tag]
        dead = [b for b in beats if b.get("gone") or now - float(b.get("seen", 0)) > job.timeout]
        # A worker of this host that no longer runs, whose journal we can read: the
        # journal, written before each record's first request, says what it may have
        # sent. (Not one that is only late with its heartbeat: stalled between its
        # announcement and its journal line, it may send yet.)
        readable = {
            b.get("tag"): b
            for b in dead
            if b.get("host") == job.host
            and isinstance(b.get("journal"), str)
            and isinstance(b.get("results"), str)
            and (b.get("gone") or not _runs(b.get("pid")))
        }
        # Announced before their first request left (any host): in doubt, whoever it was
        # (a worker that stalled past the timeout and came back may send it yet); but not
        # when the announcer's own journal is at hand and does not name the record. Its
        # announcement outlived it (it could not release it: Redis was away as it left)
        # and nothing of the record left: it is sent now, not given `unknown`.
        announced = await job.announced(list(wanted))
        doubt: set[str] = {
            k for k, tag in announced.items() if tag != job.tag and tag not in readable
        }
        for beat in dead:
            doubt.update(k for k in beat.get("inflight") or () if k in wanted)
            if beat.get("tag") in readable:
                journal, results = beat["journal"], beat["results"]
                found = await anyio.to_thread.run_sync(_journaled, [journal], results)
                doubt.update(k for k in found if k in wanted)
        stamp = datetime.now(UTC)
        return [make_envelope.for_crashed(wanted[k], stamp) for k in doubt]

    async def _claim_in_doubt(self, envs: list[Envelope]) -> set[str]:
        """Claim and write ``unknown`` envelopes; the keys now final (ours or another's)."""
        job = self.job
        assert job is not None
        if not envs:
            return set()
        lines = {env.key: encode(env) for env in envs}
        won = await job.settle(claims=list(lines.items()))
        mine = [key for key, w in zip(lines, won, strict=True) if w]
        data = b"".join(lines[key] for key in mine)
        if data:
            self._write(data)
            await self._sync(None)
            await job.settle(written=mine)
        self.in_doubt += len(mine)
        self.stats.crashed_unknown += len(mine)
        return set(lines)

    async def _startup(self) -> None:
        """Before this process takes a shard: claim again what the results files hold if
        Redis lost the job, then settle what earlier runs of these results left in doubt."""
        job = self.job
        assert job is not None
        if self.recovering:
            await self._reseed()
        await self._await_hosts()
        if self.lost is not None:
            return
        await self._known_by_all()
        own = self._journal.path if self._journal is not None else None
        journals = [p for p in iter_paths(self.settings.results) if p != own]
        if journals:
            envs = await anyio.to_thread.run_sync(
                _crashed_envelopes, journals, self.settings.results
            )
            await self._claim_in_doubt(envs)
            for path in journals:
                warning = remove_settled(path)
                if warning is not None:
                    self.stats.warnings.append(warning)
        self._save()

    async def _reseed(self) -> None:
        """Claim what every results file of the job on this host settles: this run's, the
        peers its earlier run knew, theirs in turn (their job files), and those of the
        processes of the job in Redis now."""
        job = self.job
        assert job is not None
        todo = {self._results_path, *_peers_of(self.prior)}
        await self._learn_peers()
        todo |= self._peers
        count = 0
        while todo:
            path = todo.pop()
            if path in self._seeded:
                continue
            count += await self._seed_file(path)
            todo |= _peers_of(_read_job_file(path + JOB_FILE)) - self._seeded
        self._recovered = True
        self.stats.warnings.append(
            f"job {job.name}: {self.recovering}; {count:,} records settled in "
            f"{len(self._seeded)} results file(s) on this host were claimed again before sending"
        )

    async def _await_hosts(self) -> None:
        """After Redis lost the job, send nothing until every host the job had before
        has rejoined and claimed what its results hold: until then, a record only its
        results know of could be sent again. A recovering process names the hosts it
        knew (``<results>.job``), so a process that joins afresh waits for them too."""
        job = self.job
        assert job is not None
        without = recover_without()
        expect = sorted(_hosts_of(self.prior) - {job.host}) if self.recovering else []
        limit = recovery_wait()
        deadline = time.monotonic() + limit
        recovered = bool(self.recovering)
        while True:
            missing = await job.recovery(expect, recovered)
            expect, recovered = [], False  # said once
            missing = set() if "*" in without else missing - without - {job.host}
            if not missing:
                self.stats.coordination = None
                return
            names = ", ".join(sorted(missing))
            if time.monotonic() >= deadline:
                self.lose(
                    JobStateLost(
                        f"job {job.name}: host(s) {names} did not rejoin within {limit:g} s "
                        f"({RECOVERY_WAIT_ENV}) after Redis lost the job's state; until "
                        "each has claimed what its results hold, their records could be "
                        f"sent twice ({RECOVER_WITHOUT_ENV}={names} goes on without them, "
                        "if their results are gone)"
                    )
                )
                return
            self.stats.coordination = (
                f"waiting for host(s) {names} to rejoin job {job.name} after Redis lost it"
            )
            await anyio.sleep(HEARTBEAT_S)

    async def _known_by_all(self) -> None:
        """Before sending: wait until every live worker of another host names this host
        in its heartbeat, so their ``<results>.job`` lists it should Redis lose the job
        (after a loss a host waits for the hosts it knows: one it never heard of could
        have its records sent again). At most a heartbeat or two; a worker that does not
        beat within the timeout is dead and not waited for."""
        job = self.job
        assert job is not None
        deadline = time.monotonic() + job.timeout
        while time.monotonic() < deadline:
            now = time.time()
            unaware = [
                beat
                for beat in (await job.workers()).values()
                if beat.get("host") != job.host
                and not beat.get("gone")
                and now - float(beat.get("seen", 0)) <= job.timeout
                and isinstance(beat.get("hosts"), list)
                and job.host not in beat["hosts"]
            ]
            if not unaware:
                return
            await anyio.sleep(HEARTBEAT_S / 4)

    async def _seed_file(self, path: str) -> int:
        job = self.job
        assert job is not None
        self._seeded.add(path)
        self._peers.add(path)
        keys = await anyio.to_thread.run_sync(_settled_keys, path)
        for start in range(0, len(keys), 1000):
            self.reseeded += await job.seed(keys[start : start + 1000])
        return len(keys)

    async def _learn_peers(self) -> set[str]:
        """The results files of this job's workers on this host (every heartbeat)."""
        job = self.job
        assert job is not None
        beats = (await job.workers()).values()
        self._hosts |= {b["host"] for b in beats if isinstance(b.get("host"), str)}
        found = {
            beat["results"]
            for beat in beats
            if beat.get("host") == job.host and isinstance(beat.get("results"), str)
        }
        new = found - self._peers
        self._peers |= found
        return new

    def lose(self, exc: JobStateLost) -> None:
        """Redis lost the job: stop sending; envelopes from now on go to the file alone."""
        if self.lost is not None:
            return
        self.lost = str(exc)
        self._save()
        self._stop_for_loss()

    def attach(self, stop: Callable[[str], None]) -> None:
        """The engine's stop: called at once if Redis lost the job before it started."""
        self.stop_run = stop
        self._stop_for_loss()

    def _stop_for_loss(self) -> None:
        if self.lost is not None and self.stop_run is not None:
            self.stop_run(
                f"{self.lost}: stopped sending, every envelope is in the results; start the "
                "same command again (on every host): it claims what the results hold first"
            )

    def _save(self) -> None:
        """This process's view of the job, beside its results, for its next run."""
        job = self.job
        if job is None or not job.epoch:
            return
        state = {
            "job": job.name,
            "fingerprint": self.fingerprint,
            "epoch": job.epoch,
            "tag": job.tag,
            "gen": job.gen,
            # Still owed: the claims a recovery makes (a crash in the middle starts it again).
            "lost": self.lost is not None or (bool(self.recovering) and not self._recovered),
            "peers": sorted(_peers_of(self.prior) | self._peers),
            "hosts": sorted(_hosts_of(self.prior) | self._hosts | {job.host}),
        }
        with contextlib.suppress(OSError):
            tmp = self._sidecar + ".tmp"
            with open(tmp, "wb") as file:
                file.write(orjson.dumps(state))
            os.replace(tmp, self._sidecar)

    async def _heartbeat(self) -> None:
        assert self.job is not None
        try:
            while True:
                await self.job.heartbeat(self._beat())
                await self._learn_peers()
                self._save()
                await anyio.sleep(HEARTBEAT_S)
        except JobStateLost as exc:
            self.lose(exc)

    def _beat(self) -> dict[str, object]:
        stats = self.stats
        return {
            "records": stats.records,
            "attempts": stats.attempts,
            "rate_limited": stats.rate_limited,
            "in_flight": stats.in_flight,
            "elapsed": stats.elapsed(),
            "results": self._results_path,
            # Known from the first beat: a process may die before its engine starts.
            "journal": self._journal_file,
            "pid": os.getpid(),  # on its host: whether it still runs (see _dead_in_doubt)
            "inflight": [] if self._journal is None else self._journal.in_flight(),
            "trips": self.link.trips,
            "adopted": self.adopted,
            # The hosts this process knows the job has (kept in <results>.job too): a new
            # host sends nothing until every live worker names it (see _known_by_all).
            "hosts": sorted(self._hosts),
            "left": self.left,
        }

    # --- the write-ahead -----------------------------------------------------------

    async def announce(self, event: Event) -> str | None:
        """The engine's hook before a record's first request: announce its key to Redis,
        with every other key announced meanwhile (one round trip per flush). A process
        that takes the shard over after this one died gives the record ``unknown``,
        whichever host it is on. ``None`` to send it, else why the run stops."""
        if self.job is None:
            return None
        if self.lost is not None:
            return self.lost
        # Tracked from here: a flush cut off (a stop) may still have reached Redis.
        self._ahead.add(event.key)
        try:
            await self._announcer.add(event.key)
        except JobStateLost as exc:
            self.lose(exc)
            return str(exc)
        except RedisGone as exc:
            return f"gave up on Redis: {exc}"
        except FlushCancelled:
            return "stopped while announcing the record to Redis"
        return None

    async def _flush_announced(self, keys: list[str]) -> None:
        assert self.job is not None
        await self.job.announce(keys)

    # --- the envelopes -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._fd is not None:
            view = memoryview(data)
            try:
                while view:  # whole lines: a short write is carried on, not torn
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                # A full disk: exit 5 like any run. These envelopes stay in their claims
                # (never marked written), so the job's next process writes them.
                raise ResultsWriteError(self.settings.results, exc) from exc
        elif self._sink is not None:
            for line in data.splitlines(keepends=True):
                self._sink.write(envelope_from_json(orjson.loads(line)))
        else:  # the drain opens them before the first shard is read
            raise RuntimeError("claimed envelopes with no results to write them to")

    async def drain(
        self,
        receive: MemoryObjectReceiveStream[Envelope],
        sink: Sink,
        journal: Journal | None = None,
        on_error: Callable[[ResultsWriteError], None] | None = None,
    ) -> None:
        """Claim envelopes in batches, write the claimed ones through, acknowledge
        finished shards (with the next batch's claims, or at once when none is ready).

        ``on_error`` hears of a write the results refused (the run then stops sending)."""
        job = self.job
        assert job is not None
        self._on_error = on_error
        # Claimed envelopes go to the OS at once, through a handle of our own opened for
        # appending (whole lines, one write per batch): a kill -9 right after the write
        # cannot lose them, as it could from a buffer.
        self._sink = sink
        self._fd = (
            os.open(self.settings.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if isinstance(sink, JsonlSink)
            else None
        )
        self._owed = ([], [])  # (written, finished shards): for the next call to say
        self._journal = journal
        try:
            try:
                await self._startup()
            except JobStateLost as exc:
                self.lose(exc)
            except RedisGone:
                self._ready.set()  # the run gave up on Redis before it sent anything
                return
            self._ready.set()
            ended = False
            while not ended:
                batch: list[Envelope] = []
                if not (self._owed[0] or self._owed[1]):
                    try:
                        batch.append(await receive.receive())
                    except anyio.EndOfStream:
                        break
                    # Wait a little for more, unless the engine's buffer is filling up.
                    stats = receive.statistics()
                    if stats.current_buffer_used * 2 < stats.max_buffer_size:
                        await anyio.sleep(LINGER_S)
                while len(batch) < MAX_CLAIMS:
                    try:
                        batch.append(receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                    except anyio.EndOfStream:
                        ended = True
                        break
                try:
                    self._owed = await self._settle(batch, self._owed, journal)
                except RedisGone:  # the caller writes the final ones unclaimed
                    self.cut += batch + [env async for env in receive]
                    self._enveloped(self.cut)
                    return
                if self._owed[0]:
                    # Durable before the next claim: the journal then forgets them, and
                    # the engine, which holds new records while too many are in doubt
                    # (Journal.limit), goes on.
                    await self._sync(journal)
            while self._owed[0] or self._owed[1]:
                self._owed = await self._settle([], self._owed, journal)
            await self._sync(journal)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def settle_leftovers(
        self, envs: list[Envelope], sink: Sink, journal: Journal | None
    ) -> None:
        """After a hard stop: claim and write what the engine had finished or abandoned.

        Bounded: with Redis away, :class:`RedisGone`, and the caller writes them unclaimed
        and lists them (an envelope is never lost; a process of the job on other results
        that takes the shard over first may write one too for the same record)."""
        if not envs and not (self._owed[0] or self._owed[1]):
            return
        self._sink = sink
        self._fd = (
            os.open(self.settings.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if self._fd is None and isinstance(self._sink, JsonlSink)
            else self._fd
        )
        try:
            claimed = False
            with anyio.move_on_after(_LEAVE_S):
                # With what the drain owed when it was cut off.
                owed = await self._settle(envs, self._owed, journal)
                claimed = True
                self._owed = ([], [])
                await self._settle([], owed, journal)
            if not claimed:
                # Written unclaimed and listed by the caller (RESULTS.unclaimed.jsonl), so
                # the job's next run here claims them before it sends anything.
                self._enveloped(envs)
                raise RedisGone(f"Redis did not take the claims within {_LEAVE_S:g} s")
            await self._sync(journal)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def _settle(
        self, batch: list[Envelope], owed: tuple[list[str], list[str]], journal: Journal | None
    ) -> tuple[list[str], list[str]]:
        """One claim call for ``batch`` (with what ``owed`` says); what the next one owes."""
        job = self.job
        assert job is not None
        final = [env for env in batch if _is_final(env)]
        unsent = self._enveloped(batch)
        # A record stopped before its last attempt, none of which may have arrived, is not
        # final: left unclaimed and unwritten, for another process or the next run.
        self.left += len(batch) - len(final)
        for env in (env for env in batch if not _is_final(env)):
            self.stats.unrecord(env)  # not written: the summary counts what is
        # One claim per key and call: a claim found to be ours counts as won (that is how
        # a retried call sees its own), so a key twice in one call would be written twice.
        lines: dict[str, bytes] = {}
        for env in final:
            lines.setdefault(env.key, encode(env))
        won: dict[str, bool] = dict.fromkeys(lines, True)
        if self.lost is None:
            try:
                claimed = await job.settle(owed[0], owed[1], list(lines.items()), unsent)
                won = dict(zip(lines, claimed, strict=True))
            except JobStateLost as exc:
                self.lose(exc)
        if self.lost is not None:
            # Redis's claims cannot be trusted: every envelope goes to this file, where
            # the next run finds it (and claims it again) before it sends anything.
            if lines and self._broken is None:
                try:
                    self._write(b"".join(lines.values()))
                except ResultsWriteError as exc:
                    self._failed(exc)
            if journal is not None and self._broken is None:
                for env in final:
                    journal.written(env.key)
            return [], []
        data = b"".join(line for key, line in lines.items() if won[key])
        if data and self._broken is None:
            try:
                self._write(data)
            except ResultsWriteError as exc:
                self._failed(exc)
        if self._broken is not None:
            # Nothing is marked written and no shard acknowledged: the claims hold these
            # envelopes, and whoever takes the shards over writes them.
            return [], []
        written = [key for key in lines if won[key]]
        acks: list[str] = []
        for env in final:
            if won.pop(env.key, False) is False:
                self.stats.coordination_dropped += 1
            if journal is not None:
                journal.written(env.key)
            done = self._tracker.finished(env.key)
            if done is not None:
                acks.append(done)
        return written, acks

    def _enveloped(self, envs: Iterable[Envelope]) -> list[str]:
        """These records have their envelopes: out of the write-ahead's care. Returns the
        announced ones that ended unsent (their announcements can go)."""
        unsent: list[str] = []
        for env in envs:
            if env.key in self._ahead:
                self._ahead.discard(env.key)
                if not _is_final(env):
                    unsent.append(env.key)
        return unsent

    def _failed(self, exc: ResultsWriteError) -> None:
        if self._broken is None:
            self._broken = exc
            if self._on_error is not None:
                self._on_error(exc)
            else:
                raise exc

    async def _sync(self, journal: Journal | None) -> None:
        """fsync what was written; then the journal forgets the records it settled."""
        if self._broken is not None:
            return
        upto = journal.given_total if journal is not None else 0
        try:
            if self._fd is not None:
                try:
                    await anyio.to_thread.run_sync(os.fsync, self._fd)
                except OSError as exc:
                    raise ResultsWriteError(self.settings.results, exc) from exc
            elif self._sink is not None:
                await self._sink.flush()
        except ResultsWriteError as exc:
            self._failed(exc)
            return
        if journal is not None:
            journal.durable(upto)
            journal.maybe_compact()

    async def leave(self) -> None:
        """Hand back the unfinished shards and say this process has gone (bounded)."""
        if self.job is None:
            return
        with anyio.move_on_after(_LEAVE_S):
            if self._ahead and self.lost is None and self.link.gone is None:
                # Announced, then stopped before the request left: never sent.
                with contextlib.suppress(JobStateLost):
                    await self.job.settle(unsent=sorted(self._ahead))
                self._ahead.clear()
            await self.job.leave(self._beat())


def _is_final(env: Envelope) -> bool:
    """Whether ``env`` settles its record (``--resume`` would not send it again)."""
    error = env.error
    return not (
        error is not None
        and error.kind is ErrorKind.STOPPED
        and env.delivery is not Delivery.UNKNOWN
    )


JOB_FILE: Final = ".job"  # beside the results: this process's view of its job


def job_fingerprint(settings: SendSettings) -> tuple[str, str]:
    """What a job's name is bound to: a SHA-256 of every input's bytes and of the options
    that make records of them; and a few words for a message (names and sizes)."""
    digest = hashlib.sha256()
    body = settings.body
    options = {
        "format": settings.format,
        "workflow": settings.workflow,
        "event_type": settings.event_type,
        "body": None if body is None else hashlib.sha256(body).hexdigest(),
        "validate_ids": settings.validate_ids,
        "allow_extra_fields": settings.allow_extra_fields,
        "target": settings.target,
        "account": settings.account_id or settings.base_url,
    }
    digest.update(orjson.dumps(options, option=orjson.OPT_SORT_KEYS))
    described: list[str] = []
    for path in settings.inputs:
        try:
            with open(path, "rb") as file:
                digest.update(hashlib.file_digest(file, "sha256").digest())
                size = os.fstat(file.fileno()).st_size
        except OSError as exc:
            raise ConfigError("INPUT", f"{path}: cannot read: {exc.strerror or exc}") from None
        described.append(f"{os.path.basename(path)}, {size:,} bytes")
    return digest.hexdigest(), "; ".join(described)


def _peers_of(state: dict[str, Any] | None) -> set[str]:
    peers = (state or {}).get("peers")
    return {p for p in peers if isinstance(p, str)} if isinstance(peers, list) else set()


def _hosts_of(state: dict[str, Any] | None) -> set[str]:
    hosts = (state or {}).get("hosts")
    return {h for h in hosts if isinstance(h, str)} if isinstance(hosts, list) else set()


def _read_job_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as file:
            state = orjson.loads(file.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _settled_keys(path: str) -> list[str]:
    """The keys a results file settles (what a rerun would not send again)."""
    try:
        ledger = load_ledger(path, on_torn=lambda torn: None)
    except Exception:  # unreadable results: nothing can be claimed from them
        return []
    return [
        key
        for key, state in ledger.items()
        if not (state.error_kind is ErrorKind.STOPPED and state.delivery is not Delivery.UNKNOWN)
    ]


def _runs(pid: object) -> bool:
    """Whether process ``pid`` of this host still runs (True when that cannot be told)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, another user's
    return True


def _journaled(journals: Iterable[str], results: str) -> set[str]:
    """Keys the ``journals`` name that have no envelope in ``results`` written since."""
    return {env.key for env in _crashed_envelopes(journals, results)}


def _crashed_envelopes(journals: Iterable[str], results: str) -> list[Envelope]:
    """``unknown`` envelopes for what crashed runs' journals name and ``results`` lacks."""
    now = datetime.now(UTC)
    out: dict[str, Envelope] = {}
    for path in journals:
        found = crashed_unsettled(path, results)
        for entry in found[1] if found is not None else ():
            out.setdefault(entry.key, make_envelope.for_crashed(entry, now))
    return list(out.values())


def _keys_in(path: str) -> set[str]:
    """The record keys of every whole envelope line of a JSONL results file."""
    keys: set[str] = set()
    try:
        with open(path, "rb") as file:
            for line in file:
                try:
                    key = orjson.loads(line).get("key")
                except (orjson.JSONDecodeError, AttributeError):
                    continue  # a torn last line: its envelope did not make it
                if isinstance(key, str):
                    keys.add(key)
    except OSError:
        pass
    return keys


def _json(value: dict[str, str]) -> str:
    return orjson.dumps(value).decode()


def _unjson(text: str) -> dict[str, str]:
    value = orjson.loads(text)
    return value if isinstance(value, dict) else {}


class RedisUnavailable(UserError):
    """Redis went away while the run joined its job, for longer than the outage timeout:
    nothing was sent; the same command, once Redis is back, starts the run."""

    exit_code = 3


async def _within_outage(
    link: Link, limit: float, step: Callable[[], Awaitable[None]], *, poll: float = 0.25
) -> None:
    """``step()``, given up once Redis has been unreachable for ``limit`` seconds."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while link.connected or link.unreachable_for() < limit:  # noqa: ASYNC110 (the link has no event for "away this long")
                    await anyio.sleep(poll)
                scope.cancel()

            tg.start_soon(watch)
            await step()
            tg.cancel_scope.cancel()
    if scope.cancelled_caught:
        raise RedisUnavailable(
            f"--redis: unreachable for {link.unreachable_for():.0f} s while joining the job "
            f"(--redis-outage-timeout {limit:g}s): nothing was sent; run the same command "
            "again once Redis is back"
        )


@contextlib.asynccontextmanager
async def coordinated(
    settings: SendSettings, stats: RunStats, options: ReadOptions
) -> AsyncIterator[Coordinated]:
    """The run's coordination, live for the ``async with`` block."""
    check_job_settings(settings)
    shared = Coordinated(settings, stats, options)
    try:
        async with shared.gate.running():
            try:
                async with anyio.create_task_group() as tg:
                    shared._tg = tg
                    if shared.job is not None:
                        job = shared.job

                        async def start() -> None:
                            await shared.join()
                            # Before any record is sent: a process that dies from then on
                            # is known, with its journal, to whoever takes its shards over.
                            await job.heartbeat(shared._beat())

                        # The run's outage watch starts with the engine: until then, this.
                        await _within_outage(shared.link, settings.redis_outage_timeout, start)
                        if await job.become_planner():
                            tg.start_soon(shared._publish_plan)
                        tg.start_soon(shared._heartbeat)
                    try:
                        yield shared
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                # After the heartbeat stopped: it would make the shards handed back look
                # held again.
                with anyio.CancelScope(shield=True):
                    await shared.leave()
    finally:
        with anyio.CancelScope(shield=True):
            await shared.link.aclose()
