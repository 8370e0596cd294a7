"""`dispatcher create INPUT --workflow W`: create Workflow instances in bulk, once each.

Every instance has its id before anything is sent (taken from the input, JSONL or CSV, or
made from ``--id-prefix`` and the line or count number), so a rerun can tell what exists. Before a
batch is sent its ids are journalled in the results file as ``pending``; after the answer,
each id gets its one envelope: ``created``, ``exists``, ``rejected`` (with the reason) or
``unknown``. A batch whose answer was lost (dropped connection, timeout, 5xx, or the run
killed) is never created again blind: its ids are read back one GET each, and only those
the API says do not exist (10400) are created again. A batch refused because one of its
ids exists is created one by one, so each id gets its own answer.

Targets: ``api`` (``POST …/instances/batch``, read back with ``GET …/instances/{id}``),
``relay`` (the relay Worker's ``POST /create``, one ``createBatch`` per batch, read back with
its ``POST /status``) and ``wrangler-dev`` (the local explorer API: one ``POST …/instances``
per instance, as it has no batch route; read back with its ``GET``). A 429 from any of them
is waited out (``Retry-After``, at least 1 s) and the same request sent again.

``--metrics-port PORT`` serves the counts live as Prometheus text (docs/metrics.md); one
that cannot be served exits 2 before anything is sent.

Pacing: batches go one at a time, spaced to the creation limits (``--creation-rate``,
default 100/s per workflow, and ``--account-creation-rate``, default 300/s per account,
both counted per instance: the slower sets the pace) and to the REST budget (``--rate``,
default 1200/5m, counted per request: creations and read-backs alike).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from dispatcher.clients.answer import read_answer
from dispatcher.clients.targets import (
    RELAY_SECRET_ENV,
    WRANGLER_DEV_API_PATH,
    WRANGLER_DEV_BASE_URL,
)
from dispatcher.commands.metrics import add_metrics_arguments
from dispatcher.commands.metrics import start as start_metrics
from dispatcher.commands.metrics_snapshot import Snapshot
from dispatcher.inputs.validation import RuleViolation, check_path
from dispatcher.model import UserError
from dispatcher.results import lock as results_lock
from dispatcher.results.ledger import repair_jsonl_tail
from dispatcher.run.settings import parse_rate
from dispatcher.sending.stats import LatencyBuckets

PROG: Final = "dispatcher create"
MAX_BATCH: Final = 100
DEFAULT_BASE_URL: Final = "https://api.cloudflare.com/client/v4"
DEFAULT_CREATION_RATE: Final = "100/s"
DEFAULT_ACCOUNT_CREATION_RATE: Final = "300/s"
DEFAULT_REST_RATE: Final = "1200/5m"
CREATE_TARGETS: Final = ("api", "relay", "wrangler-dev")
FINAL: Final = frozenset({"created", "exists", "rejected"})
NOT_FOUND: Final = 10400
ALREADY_EXISTS: Final = 10405
READ_BACK_TRIES: Final = 3
WRANGLER_NOT_FOUND: Final = 10501
# A 429 is waited out (its Retry-After, at least MIN_RETRY_AFTER) and the request sent
# again, up to MAX_429 times in a row; then it counts as a lost answer (read back).
MAX_429: Final = 10
MIN_RETRY_AFTER: Final = 1.0
MAX_RETRY_AFTER: Final = 300.0
# A request that could not connect is sent again (after 1 s, then 2 s); after that the
# run stops (exit 3) rather than writing each id unknown.
CONNECT_TRIES: Final = 3
CSV_COLUMNS: Final = frozenset({"instance_id", "params"})


class CreateInputError(UserError):
    exit_code = 2


Item = tuple[str, Any]  # instance_id, params (None: none)
# (where, line number, instance_id or None, params): one input item, checked and kept.
_Add = Callable[[str, int, object, Any], None]


def _rate(flag: str, text: str) -> float:
    try:
        rate = parse_rate(text)
    except ValueError as exc:
        raise CreateInputError(f"{flag}: {exc}") from None
    if isinstance(rate, str):
        raise CreateInputError(f"{flag}: give a number per period, like 100/s")
    return rate.per_second


def _check_id(where: str, instance_id: object) -> str:
    try:
        check_path("w", instance_id, "e")
    except RuleViolation as exc:
        raise CreateInputError(f"{where}: {exc.message}") from None
    assert isinstance(instance_id, str)
    return instance_id


def read_items(args: argparse.Namespace) -> list[Item]:
    """The instances to create, in order, every one with its id. Raises CreateInputError."""
    if args.count is not None:
        if args.input is not None:
            raise CreateInputError("--count: give either INPUT or --count, not both")
        if args.count < 1:
            raise CreateInputError("--count: must be a whole number >= 1")
        try:
            params = None if args.params is None else orjson.loads(args.params)
        except orjson.JSONDecodeError as exc:
            raise CreateInputError(f"--params: not JSON: {exc}") from None
        prefix = args.id_prefix or "instance-"
        width = len(str(args.count))
        return [
            (_check_id("--id-prefix", f"{prefix}{n:0{width}d}"), params)
            for n in range(1, args.count + 1)
        ]
    if args.input is None:
        raise CreateInputError("give INPUT (JSONL of {instance_id?, params?}) or --count N")
    if args.params is not None:
        raise CreateInputError("--params: only with --count")
    path = args.input
    prefix = args.id_prefix if args.id_prefix is not None else Path(path).stem + "-"
    items: list[Item] = []
    seen: dict[str, int] = {}

    def add(where: str, n: int, iid: object, params: Any) -> None:
        checked = _check_id(where, f"{prefix}{n}" if iid is None else iid)
        if checked in seen:
            raise CreateInputError(f"{where}: instance_id {checked!r} repeats line {seen[checked]}")
        seen[checked] = n
        items.append((checked, params))

    try:
        if path.lower().endswith(".csv"):
            _read_csv(path, add)
        else:
            _read_jsonl(path, add)
    except OSError as exc:
        raise CreateInputError(f"{path}: {exc.strerror or exc}") from None
    return items


def _read_jsonl(path: str, add: _Add) -> None:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise CreateInputError(f"{where}: not a JSON object") from None
            if not isinstance(obj, dict) or set(obj) - {"instance_id", "params"}:
                raise CreateInputError(
                    f"{where}: expected an object with instance_id? and params? only"
                )
            add(where, n, obj.get("instance_id"), obj.get("params"))


def _read_csv(path: str, add: _Add) -> None:
    """CSV with a header of ``instance_id`` and/or ``params`` (a JSON cell); an empty
    ``instance_id`` cell gets an id made from the line number, an empty ``params`` none."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CreateInputError(f"{path}:1: not CSV: {exc}") from None
        names = [h.strip() for h in header or []]
        if not names or set(names) - CSV_COLUMNS or len(set(names)) != len(names):
            raise CreateInputError(
                f"{path}:1: expected a header of instance_id and/or params, got {','.join(names)!r}"
            )
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise CreateInputError(f"{path}:{start}: not CSV: {exc}") from None
            if row is None:
                return
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{start}"
            if len(row) != len(names):
                raise CreateInputError(f"{where}: {len(row)} cell(s), the header has {len(names)}")
            cells = dict(zip(names, row, strict=True))
            iid = cells.get("instance_id", "").strip() or None
            text = cells.get("params", "").strip()
            try:
                params = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                raise CreateInputError(f"{where}: params is not JSON") from None
            add(where, start, iid, params)


def load_state(path: str) -> dict[str, str]:
    """instance_id -> its last outcome in a results file (``pending`` included)."""
    repair_jsonl_tail(path)
    state: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    obj = orjson.loads(raw)
                    state[obj["instance_id"]] = obj["outcome"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    raise CreateInputError(f"--results {path}:{n}: not a create envelope") from None
    except FileNotFoundError:
        pass
    return state


class Pacer:
    """Spaces ``wait(n)`` calls so that at most ``rate`` units pass per second, no burst.

    ``clock`` and ``sleep`` are injected so that tests move time instead of waiting.
    """

    __slots__ = ("_clock", "_next", "_rate", "_sleep")

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rate = rate
        self._next = 0.0
        self._clock = clock
        self._sleep = sleep

    @property
    def rate(self) -> float:
        return self._rate

    async def wait(self, units: int) -> None:
        now = self._clock()
        start = max(self._next, now)
        self._next = start + units / self._rate
        if start > now:
            await self._sleep(start - now)


class CreationPacer:
    """The creation limits: ``per_workflow`` and ``per_account`` instances a second, each
    its own :class:`Pacer`; a batch waits for both, so the slower one sets the pace."""

    __slots__ = ("_pacers",)

    def __init__(
        self,
        per_workflow: float,
        per_account: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._pacers = tuple(
            Pacer(rate, clock=clock, sleep=sleep) for rate in (per_workflow, per_account)
        )

    async def wait(self, units: int) -> None:
        for pacer in self._pacers:
            await pacer.wait(units)


# What a create call made of one instance: created, exists, rejected (with the reason) or
# lost (the answer did not come, or does not say: read it back). What a read-back found:
# found, missing, or unknown (with the reason).
Verdict = tuple[str, str | None]


def _body(item: Item, id_key: str = "instance_id") -> dict[str, Any]:
    iid, params = item
    return {id_key: iid} | ({} if params is None else {"params": params})


def _code(doc: Any) -> int | None:
    try:
        return int(doc["errors"][0]["code"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _message(doc: Any) -> str:
    try:
        return str(doc["errors"][0]["message"])
    except (KeyError, IndexError, TypeError):
        return ""


def _reason(status: int, doc: Any) -> str:
    try:
        err = doc["errors"][0]
        return f"{status} code {err['code']}: {err['message']}"
    except (KeyError, IndexError, TypeError):
        return f"HTTP {status}" if status else "no answer"


def _ok(status: int, doc: Any) -> bool:
    return 200 <= status < 300 and doc is not None and doc.get("success") is True


def _lost(status: int) -> bool:
    return status == 0 or status >= 500 or status == 429


class CreateStopped(UserError):
    """The target refused the credentials, or cannot be reached: every later request would
    fare the same."""

    exit_code = 3


class Http:
    """One request at a time under the REST pacer; a 429 waits its Retry-After and retries."""

    def __init__(self, session: aiohttp.ClientSession, rate: float, secret: str | None) -> None:
        self._session = session
        self._pacer = Pacer(rate)
        self._secret = secret
        self.requests = 0
        self.rate_limited = 0
        # For --metrics-port: re-sends (429, refused connection), answers by status (0:
        # none), the request in flight, latencies.
        self.retries = 0
        self.in_flight = 0
        self.answers: Counter[int] = Counter()
        self.latency = LatencyBuckets()

    @property
    def rate(self) -> float | None:
        rate = self._pacer.rate
        return rate if math.isfinite(rate) else None

    def redact(self, text: str) -> str:
        return text.replace(self._secret, "<redacted>") if self._secret else text

    async def request(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        """(status, envelope or None); status 0 when no answer came."""
        attempt = unreached = 0
        while True:
            await self._pacer.wait(1)
            if attempt or unreached:
                self.retries += 1
            self.requests += 1
            self.in_flight += 1
            t0 = time.perf_counter()
            answered = 0
            try:
                async with self._session.request(
                    method, url, json=body, allow_redirects=False
                ) as resp:
                    answer = await read_answer(resp)
                    answered = answer.status
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Could not connect: the request never left, so sending it again is safe.
                unreached += 1
                if unreached >= CONNECT_TRIES:
                    host = URL(url).with_path("/").with_query(None)
                    raise CreateStopped(
                        f"could not connect to {host} ({CONNECT_TRIES} tries): "
                        f"{self.redact(type(exc).__name__)}; the ids in flight are left "
                        "pending for --resume"
                    ) from None
                await asyncio.sleep(unreached)
                continue
            except (aiohttp.ClientError, TimeoutError):
                return 0, None
            finally:
                self.in_flight -= 1
                self.answers[answered] += 1
                self.latency.add((time.perf_counter() - t0) * 1000.0)
            attempt += 1
            status, doc, retry_after = answer.status, answer.doc, answer.retry_after
            if status != 429 or attempt >= MAX_429:
                return status, doc
            # Refused before anything was done: wait as told (at least 1 s: a 0 or a missing
            # header would retry at once into the same limit), then the same request again.
            self.rate_limited += 1
            await asyncio.sleep(min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, retry_after or 0.0)))


class ApiBackend:
    """The REST API: ``POST …/instances/batch``, ``GET …/instances/{id}?simple=true``."""

    batch_size = MAX_BATCH

    def __init__(self, http: Http, base_url: str, account_id: str, workflow: str) -> None:
        self._http = http
        self._url = f"{base_url.rstrip('/')}/accounts/{account_id}/workflows/{workflow}/instances"

    async def create(self, items: list[Item]) -> list[Verdict]:
        status, doc = await self._http.request(
            "POST", self._url + "/batch", list(map(_body, items))
        )
        if _ok(status, doc):
            return [("created", None)] * len(items)
        if _lost(status):
            return [("lost", _reason(status, doc))] * len(items)
        # Refused as a whole (an id exists, a bad item): one by one, each its own answer.
        return [await self._single(item) for item in items]

    async def _single(self, item: Item) -> Verdict:
        status, doc = await self._http.request("POST", self._url, _body(item))
        if _ok(status, doc):
            return "created", None
        if status == 409 or _code(doc) == ALREADY_EXISTS:
            return "exists", None
        if _lost(status):
            return "lost", _reason(status, doc)
        return "rejected", _reason(status, doc)

    async def lookup(self, ids: list[str]) -> list[Verdict]:
        found: list[Verdict] = []
        for iid in ids:
            status, doc = await self._http.request("GET", f"{self._url}/{iid}?simple=true")
            if _ok(status, doc):
                found.append(("found", None))
            elif status == 404 and _code(doc) == NOT_FOUND:
                found.append(("missing", None))
            else:
                found.append(("unknown", f"read back failed: {_reason(status, doc)}"))
        return found


class WranglerDevBackend:
    """wrangler dev's local explorer API: one ``POST …/instances`` per instance (it has no
    batch route), ``GET …/instances/{id}`` to read back."""

    batch_size = 1

    def __init__(self, http: Http, base_url: str, workflow: str) -> None:
        self._http = http
        self._url = f"{base_url.rstrip('/')}{WRANGLER_DEV_API_PATH}/workflows/{workflow}/instances"

    async def create(self, items: list[Item]) -> list[Verdict]:
        return [await self._one(item) for item in items]

    async def _one(self, item: Item) -> Verdict:
        status, doc = await self._http.request("POST", self._url, _body(item, "id"))
        if _ok(status, doc):
            return "created", None
        message = _message(doc)
        # wrangler (4.164) answers every binding error 500 code 10001 with its message.
        if "already exists" in message:
            return "exists", None
        if "invalid id" in message or (400 <= status < 500 and status != 429):
            return "rejected", _reason(status, doc)
        return "lost", _reason(status, doc)

    async def lookup(self, ids: list[str]) -> list[Verdict]:
        found: list[Verdict] = []
        for iid in ids:
            status, doc = await self._http.request("GET", f"{self._url}/{iid}")
            if _ok(status, doc):
                found.append(("found", None))
            elif status == 404 and _code(doc) == WRANGLER_NOT_FOUND:
                found.append(("missing", None))
            else:
                found.append(("unknown", f"read back failed: {_reason(status, doc)}"))
        return found


class RelayBackend:
    """The relay Worker (relay/): ``POST /create`` (createBatch) and ``POST /status``."""

    batch_size = MAX_BATCH

    def __init__(self, http: Http, relay_url: str) -> None:
        self._http = http
        self._url = relay_url.rstrip("/")

    def _refused(self, status: int, doc: Any) -> None:
        if status in (401, 403):
            raise CreateStopped(
                f"--target relay: credentials rejected (HTTP {status}); check that "
                f"{RELAY_SECRET_ENV} (or --relay-secret-file) holds the relay Worker's "
                "RELAY_SECRET; the ids sent are left pending for --resume"
            )

    def _results(self, status: int, doc: Any, n: int) -> list[Any] | None:
        results = doc.get("results") if _ok(status, doc) else None
        return results if isinstance(results, list) and len(results) == n else None

    async def create(self, items: list[Item]) -> list[Verdict]:
        status, doc = await self._http.request(
            "POST", self._url + "/create", {"instances": list(map(_body, items))}
        )
        self._refused(status, doc)
        if status == 413 and len(items) > 1:
            half = (len(items) + 1) // 2
            return [*await self.create(items[:half]), *await self.create(items[half:])]
        if not 200 <= status < 300:
            if _lost(status):
                return [("lost", _reason(status, doc))] * len(items)
            return [("rejected", self._http.redact(_reason(status, doc)))] * len(items)
        results = self._results(status, doc, len(items))
        if results is None:
            return [("lost", f"relay answered HTTP {status} without one result each")] * len(items)
        verdicts: list[Verdict] = []
        for (iid, _), res in zip(items, results, strict=True):
            if not isinstance(res, dict) or res.get("instance_id") != iid:
                verdicts.append(("lost", "the relay's result names another instance"))
                continue
            outcome = res.get("outcome")
            said = self._http.redact(
                f"relay: {outcome} code {res.get('code')}: {res.get('message')}"
            )
            if outcome in ("created", "exists"):
                verdicts.append((str(outcome), None))
            elif outcome == "invalid":
                verdicts.append(("rejected", said))
            else:  # failed, or an outcome this client does not know: it may exist
                verdicts.append(("lost", said))
        return verdicts

    async def lookup(self, ids: list[str]) -> list[Verdict]:
        status, doc = await self._http.request("POST", self._url + "/status", {"ids": ids})
        self._refused(status, doc)
        results = self._results(status, doc, len(ids))
        if results is None:
            reason = f"read back failed: {self._http.redact(_reason(status, doc))}"
            return [("unknown", reason)] * len(ids)
        found: list[Verdict] = []
        for iid, res in zip(ids, results, strict=True):
            if not isinstance(res, dict) or res.get("id") != iid:
                found.append(("unknown", "read back failed: the relay's result names another id"))
            elif isinstance(res.get("status"), str):
                found.append(("found", None))
            elif res.get("code") == "not_found":
                found.append(("missing", None))
            else:
                said = self._http.redact(f"{res.get('code')}: {res.get('message')}")
                found.append(("unknown", f"read back failed: relay: {said}"))
        return found


Backend = ApiBackend | WranglerDevBackend | RelayBackend


class Creator:
    def __init__(self, args: argparse.Namespace, backend: Backend, fd: int) -> None:
        self._backend = backend
        self._fd = fd
        self._creation = CreationPacer(
            _rate("--creation-rate", args.creation_rate),
            _rate("--account-creation-rate", args.account_creation_rate),
        )
        self._workflow = args.workflow
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()

    def write(self, instance_id: str, outcome: str, reason: str | None = None) -> None:
        doc: dict[str, Any] = {
            "instance_id": instance_id,
            "workflow": self._workflow,
            "outcome": outcome,
        }
        if reason is not None:
            doc["reason"] = reason
        if outcome != "pending":
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
        # One write per line with O_APPEND: a kill -9 leaves whole lines or a torn tail
        # that load_state repairs.
        os.write(self._fd, orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))

    async def batch(self, items: list[Item], tries: int = READ_BACK_TRIES) -> None:
        for iid, _ in items:
            self.write(iid, "pending")
        await self._creation.wait(len(items))
        lost: list[Item] = []
        for item, (verdict, reason) in zip(items, await self._backend.create(items), strict=True):
            if verdict == "lost":
                lost.append(item)  # the answer is lost, not the instance: read back
            else:
                self.write(item[0], verdict, reason)
        if lost:
            await self.resolve(lost, tries)

    async def resolve(self, items: list[Item], tries: int = READ_BACK_TRIES) -> None:
        """Settle ids whose creation may or may not have happened, by reading them back."""
        missing: list[Item] = []
        for n in range(0, len(items), MAX_BATCH):
            chunk = items[n : n + MAX_BATCH]
            found = await self._backend.lookup([iid for iid, _ in chunk])
            for item, (verdict, reason) in zip(chunk, found, strict=True):
                if verdict == "found":
                    self.write(item[0], "created", "read back after a lost answer")
                elif verdict == "missing":
                    missing.append(item)
                else:
                    self.write(item[0], "unknown", reason)
        if missing and tries > 1:
            await asyncio.sleep(0.5)
            size = self._backend.batch_size
            for n in range(0, len(missing), size):
                await self.batch(missing[n : n + size], tries - 1)
        else:
            for iid, _ in missing:
                self.write(iid, "unknown", "not found, and no tries left")


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "input",
        nargs="?",
        default=None,
        metavar="INPUT",
        help="JSONL of {instance_id?, params?}, or CSV (*.csv) with an instance_id,params header",
    )
    add("--workflow", required=True, help="the workflow to create instances of")
    add(
        "--target",
        choices=CREATE_TARGETS,
        default="api",
        help="api (REST batches), relay (its POST /create) or wrangler-dev (one by one)",
    )
    add("--relay-url", default=None, metavar="URL", help="the relay Worker's URL (--target relay)")
    add(
        "--relay-secret-file",
        default=None,
        metavar="PATH",
        help=f"read the relay's secret from PATH (beats {RELAY_SECRET_ENV})",
    )
    add("--count", type=int, default=None, metavar="N", help="create N instances (load tests)")
    add("--id-prefix", default=None, metavar="P", help="ids are P1..PN (default: INPUT's stem-)")
    add("--params", default=None, metavar="JSON", help="params of every --count instance")
    add(
        "--account-id",
        default=os.environ.get("CLOUDFLARE_ACCOUNT_ID"),
        help="account id (default: CLOUDFLARE_ACCOUNT_ID)",
    )
    add(
        "--base-url",
        default=None,
        help="API base URL (default: CLOUDFLARE_BASE_URL or the real API; with "
        f"--target wrangler-dev: {WRANGLER_DEV_BASE_URL}; with --target relay: as --relay-url)",
    )
    add(
        "--creation-rate",
        default=DEFAULT_CREATION_RATE,
        help=f"instances per period, per workflow (default: {DEFAULT_CREATION_RATE})",
    )
    add(
        "--account-creation-rate",
        default=DEFAULT_ACCOUNT_CREATION_RATE,
        help="instances per period for the whole account; lower it when other runs create "
        f"in the same account (default: {DEFAULT_ACCOUNT_CREATION_RATE})",
    )
    add(
        "--rate",
        default=None,
        help=f"requests per period (default: {DEFAULT_REST_RATE} for --target api, else unlimited)",
    )
    add("--results", default=None, metavar="FILE", help="JSONL envelopes, one per instance")
    add("--resume", action="store_true", help="skip the ids the --results already settle")
    add("--overwrite", action="store_true", help="start --results afresh")
    add_metrics_arguments(parser)


def _relay_secret(args: argparse.Namespace) -> str:
    if args.relay_secret_file is not None:
        try:
            with open(args.relay_secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        # The path is not quoted back: a secret pasted where its path belongs would leak.
        except OSError as exc:
            raise CreateInputError(
                f"--relay-secret-file: cannot read the file: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise CreateInputError("--relay-secret-file: the file is not UTF-8 text") from None
        if not secret:
            raise CreateInputError("--relay-secret-file: the file is empty")
        return secret
    secret = os.environ.get(RELAY_SECRET_ENV, "").strip()
    if not secret:
        raise CreateInputError(
            f"--target relay: needs the relay's secret; set {RELAY_SECRET_ENV} "
            "or pass --relay-secret-file PATH"
        )
    return secret


def _check_target(args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """(request headers, secret) for the target; raises CreateInputError for what is missing."""
    if args.target == "relay":
        args.relay_url = args.relay_url or args.base_url
        if not args.relay_url:
            raise CreateInputError(
                "--relay-url: required with --target relay: the relay Worker's URL, such as "
                "https://dispatcher-relay.<subdomain>.workers.dev"
            )
        secret = _relay_secret(args)
        return {"Authorization": f"Bearer {secret}"}, secret
    if args.target == "wrangler-dev":
        args.base_url = args.base_url or WRANGLER_DEV_BASE_URL
        return {}, None
    args.base_url = args.base_url or os.environ.get("CLOUDFLARE_BASE_URL") or DEFAULT_BASE_URL
    if not args.account_id:
        raise CreateInputError("--account-id: not set (nor CLOUDFLARE_ACCOUNT_ID)")
    token = os.environ.get("CLOUDFLARE_API_TOKEN")
    if not token:
        raise CreateInputError("CLOUDFLARE_API_TOKEN: not set")
    return {"Authorization": f"Bearer {token}"}, token


def _request_rate(args: argparse.Namespace) -> float:
    if args.rate is None:
        return _rate("--rate", DEFAULT_REST_RATE) if args.target == "api" else float("inf")
    return _rate("--rate", args.rate)


async def _run(
    args: argparse.Namespace,
    items: list[Item],
    state: dict[str, str],
    fd: int,
    headers: dict[str, str],
    secret: str | None,
    watched: list[tuple[Creator, Http]],
) -> int:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        http = Http(session, _request_rate(args), secret)
        backend: Backend
        if args.target == "relay":
            backend = RelayBackend(http, args.relay_url)
        elif args.target == "wrangler-dev":
            backend = WranglerDevBackend(http, args.base_url, args.workflow)
        else:
            backend = ApiBackend(http, args.base_url, args.account_id, args.workflow)
        creator = Creator(args, backend, fd)
        watched.append((creator, http))
        # Ids an earlier run left pending or unknown: read back, never re-created blind.
        doubtful = [item for item in items if state.get(item[0]) in {"pending", "unknown"}]
        if doubtful:
            await creator.resolve(doubtful)
        todo = [item for item in items if item[0] not in state]
        size = backend.batch_size
        for n in range(0, len(todo), size):
            await creator.batch(todo[n : n + size])
    counts = creator.counts
    skipped = sum(1 for item in items if state.get(item[0]) in FINAL)
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    limited = f" ({http.rate_limited} answered 429 and waited)" if http.rate_limited else ""
    print(
        f"{PROG}: {len(items)} instance(s); {parts or 'nothing new'}; "
        f"{skipped} settled earlier; {http.requests} request(s){limited}",
        file=sys.stderr,
    )
    return 0 if not (counts.get("rejected") or counts.get("unknown")) else 1


def run(args: argparse.Namespace) -> int:
    try:
        check_path(args.workflow, "i", "e")
    except RuleViolation as exc:
        raise CreateInputError(f"--workflow: {exc.message}") from None
    _rate("--creation-rate", args.creation_rate)
    _rate("--account-creation-rate", args.account_creation_rate)
    _request_rate(args)
    items = read_items(args)
    results = args.results
    if results is None:
        raise CreateInputError("--results: needed, so that a rerun creates nothing twice")
    if args.resume and args.overwrite:
        raise CreateInputError("--overwrite: cannot be combined with --resume")
    headers, secret = _check_target(args)
    held = results_lock.acquire(results)
    try:
        exists = os.path.exists(results) and os.path.getsize(results) > 0
        if exists and not (args.resume or args.overwrite):
            raise CreateInputError(
                f"--results {results} exists: add --resume to finish it, or --overwrite"
            )
        state = load_state(results) if args.resume else {}
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if args.overwrite else 0)
        watched: list[tuple[Creator, Http]] = []
        metrics = start_metrics(args, lambda: _snapshot(watched), prog=PROG)
        fd = os.open(results, flags, 0o644)
        try:
            return asyncio.run(_run(args, items, state, fd, headers, secret, watched))
        finally:
            os.close(fd)
            if metrics is not None:
                metrics.close()
    finally:
        if held is not None:
            held.release()


def _snapshot(watched: list[tuple[Creator, Http]]) -> Snapshot | None:
    """What ``--metrics-port`` shows of the run, once it has begun."""
    if not watched:
        return None
    creator, http = watched[0]
    return Snapshot(
        attempts=http.requests,
        retries=http.retries,
        rate_limited=http.rate_limited,
        in_flight=http.in_flight,
        answers=dict(http.answers),
        latency_counts=list(http.latency.counts),
        latency_sum_ms=http.latency.sum_ms,
        gate_rate=http.rate,
        instances=dict(creator.counts),
        elapsed_s=time.monotonic() - creator.started,
    )
