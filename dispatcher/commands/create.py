"""`dispatcher create INPUT --workflow W`: create Workflow instances in bulk, once each.

Every instance has its id before anything is sent (taken from the input, or made from
``--id-prefix`` and the line or count number), so a rerun can tell what exists. Before a
batch is sent its ids are journalled in the results file as ``pending``; after the answer,
each id gets its one envelope: ``created``, ``exists``, ``rejected`` (with the reason) or
``unknown``. A batch whose answer was lost (dropped connection, timeout, 5xx, or the run
killed) is never created again blind: its ids are read back one GET each, and only those
the API says do not exist (10400) are created again. A batch refused because one of its
ids exists is created one by one, so each id gets its own answer.

Pacing: batches go one at a time, spaced to the creation limit (``--creation-rate``,
default 100/s per workflow, counted per instance) and to the REST budget (``--rate``,
default 1200/5m, counted per request: creations and read-backs alike).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson

from dispatcher.inputs.validation import RuleViolation, check_path
from dispatcher.model import UserError
from dispatcher.results import lock as results_lock
from dispatcher.results.ledger import repair_jsonl_tail
from dispatcher.run.settings import parse_rate

PROG: Final = "dispatcher create"
MAX_BATCH: Final = 100
DEFAULT_BASE_URL: Final = "https://api.cloudflare.com/client/v4"
DEFAULT_CREATION_RATE: Final = "100/s"
DEFAULT_REST_RATE: Final = "1200/5m"
FINAL: Final = frozenset({"created", "exists", "rejected"})
NOT_FOUND: Final = 10400
ALREADY_EXISTS: Final = 10405
READ_BACK_TRIES: Final = 3


class CreateInputError(UserError):
    exit_code = 2


Item = tuple[str, Any]  # instance_id, params (None: none)


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
    try:
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
                iid = _check_id(where, obj.get("instance_id", f"{prefix}{n}"))
                if iid in seen:
                    raise CreateInputError(f"{where}: instance_id {iid!r} repeats line {seen[iid]}")
                seen[iid] = n
                items.append((iid, obj.get("params")))
    except OSError as exc:
        raise CreateInputError(f"{path}: {exc.strerror or exc}") from None
    return items


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
    """Spaces ``wait(n)`` calls so that at most ``rate`` units pass per second, no burst."""

    __slots__ = ("_next", "_rate")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._next = 0.0

    async def wait(self, units: int) -> None:
        now = time.monotonic()
        start = max(self._next, now)
        self._next = start + units / self._rate
        if start > now:
            await asyncio.sleep(start - now)


class Creator:
    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession, fd: int) -> None:
        self._url = (
            f"{args.base_url.rstrip('/')}/accounts/{args.account_id}/workflows/{args.workflow}"
            "/instances"
        )
        self._session = session
        self._fd = fd
        self._creation = Pacer(_rate("--creation-rate", args.creation_rate))
        self._rest = Pacer(_rate("--rate", args.rate))
        self._workflow = args.workflow
        self.counts: dict[str, int] = {}
        self.requests = 0

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

    async def _request(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        """(status, envelope or None); status 0 when no answer came."""
        await self._rest.wait(1)
        self.requests += 1
        try:
            async with self._session.request(method, url, json=body, allow_redirects=False) as resp:
                raw = await resp.read()
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    doc = None
                return resp.status, doc if isinstance(doc, dict) else None
        except (aiohttp.ClientError, TimeoutError):
            return 0, None

    @staticmethod
    def _code(doc: Any) -> int | None:
        try:
            return int(doc["errors"][0]["code"])
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    @staticmethod
    def _reason(status: int, doc: Any) -> str:
        try:
            err = doc["errors"][0]
            return f"{status} code {err['code']}: {err['message']}"
        except (KeyError, IndexError, TypeError):
            return f"HTTP {status}" if status else "no answer"

    async def batch(self, items: list[Item]) -> None:
        for iid, _ in items:
            self.write(iid, "pending")
        await self._creation.wait(len(items))
        body = [
            {"instance_id": iid} | ({} if params is None else {"params": params})
            for iid, params in items
        ]
        status, doc = await self._request("POST", self._url + "/batch", body)
        if 200 <= status < 300 and doc is not None and doc.get("success") is True:
            for iid, _ in items:
                self.write(iid, "created")
            return
        if status == 0 or status >= 500 or status == 429:
            await self.resolve(items)  # the answer is lost, not the batch: read back
            return
        # Refused as a whole (an id exists, a bad item): one by one, each its own answer.
        for item in items:
            await self.single(item)

    async def single(self, item: Item) -> None:
        iid, params = item
        await self._creation.wait(1)
        body = {"instance_id": iid} | ({} if params is None else {"params": params})
        status, doc = await self._request("POST", self._url, body)
        if 200 <= status < 300 and doc is not None and doc.get("success") is True:
            self.write(iid, "created")
        elif status == 409 or self._code(doc) == ALREADY_EXISTS:
            self.write(iid, "exists")
        elif status == 0 or status >= 500 or status == 429:
            await self.resolve([item])
        else:
            self.write(iid, "rejected", self._reason(status, doc))

    async def resolve(self, items: list[Item], tries: int = READ_BACK_TRIES) -> None:
        """Settle ids whose creation may or may not have happened, by reading them back."""
        missing: list[Item] = []
        for item in items:
            iid = item[0]
            status, doc = await self._request("GET", f"{self._url}/{iid}?simple=true")
            if 200 <= status < 300 and doc is not None and doc.get("success") is True:
                self.write(iid, "created", "read back after a lost answer")
            elif status == 404 and self._code(doc) == NOT_FOUND:
                missing.append(item)
            else:
                self.write(iid, "unknown", f"read back failed: {self._reason(status, doc)}")
        if missing and tries > 1:
            await asyncio.sleep(0.5)
            for n in range(0, len(missing), MAX_BATCH):
                chunk = missing[n : n + MAX_BATCH]
                for iid, _ in chunk:
                    self.write(iid, "pending")
                await self._creation.wait(len(chunk))
                body = [
                    {"instance_id": iid} | ({} if params is None else {"params": params})
                    for iid, params in chunk
                ]
                status, doc = await self._request("POST", self._url + "/batch", body)
                if 200 <= status < 300 and doc is not None and doc.get("success") is True:
                    for iid, _ in chunk:
                        self.write(iid, "created")
                elif status == 0 or status >= 500 or status == 429:
                    await self.resolve(chunk, tries - 1)
                else:
                    for item in chunk:
                        await self.single(item)
        else:
            for iid, _ in missing:
                self.write(iid, "unknown", "not found, and no tries left")


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("input", nargs="?", default=None, metavar="INPUT", help="JSONL of {instance_id?, params?}")
    add("--workflow", required=True, help="the workflow to create instances of")
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
        default=os.environ.get("CLOUDFLARE_BASE_URL", DEFAULT_BASE_URL),
        help="API base URL (default: CLOUDFLARE_BASE_URL or the real API)",
    )
    add(
        "--creation-rate",
        default=DEFAULT_CREATION_RATE,
        help=f"instances per period, per workflow (default: {DEFAULT_CREATION_RATE})",
    )
    add(
        "--rate",
        default=DEFAULT_REST_RATE,
        help=f"REST requests per period (default: {DEFAULT_REST_RATE})",
    )
    add("--results", default=None, metavar="FILE", help="JSONL envelopes, one per instance")
    add("--resume", action="store_true", help="skip the ids the --results already settle")
    add("--overwrite", action="store_true", help="start --results afresh")


def _batches(items: list[Item]) -> Iterator[list[Item]]:
    for n in range(0, len(items), MAX_BATCH):
        yield items[n : n + MAX_BATCH]


async def _run(args: argparse.Namespace, items: list[Item], state: dict[str, str], fd: int) -> int:
    token = os.environ.get("CLOUDFLARE_API_TOKEN")
    if not token:
        raise CreateInputError("CLOUDFLARE_API_TOKEN: not set")
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        creator = Creator(args, session, fd)
        # Ids an earlier run left pending or unknown: read back, never re-created blind.
        doubtful = [item for item in items if state.get(item[0]) in {"pending", "unknown"}]
        for chunk in _batches(doubtful):
            await creator.resolve(chunk)
        todo = [item for item in items if item[0] not in state]
        for chunk in _batches(todo):
            await creator.batch(chunk)
    counts = creator.counts
    skipped = sum(1 for item in items if state.get(item[0]) in FINAL)
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(
        f"{PROG}: {len(items)} instance(s); {parts or 'nothing new'}; "
        f"{skipped} settled earlier; {creator.requests} request(s)",
        file=sys.stderr,
    )
    return 0 if not (counts.get("rejected") or counts.get("unknown")) else 1


def run(args: argparse.Namespace) -> int:
    if not args.account_id:
        raise CreateInputError("--account-id: not set (nor CLOUDFLARE_ACCOUNT_ID)")
    try:
        check_path(args.workflow, "i", "e")
    except RuleViolation as exc:
        raise CreateInputError(f"--workflow: {exc.message}") from None
    _rate("--creation-rate", args.creation_rate)
    _rate("--rate", args.rate)
    items = read_items(args)
    results = args.results
    if results is None:
        raise CreateInputError("--results: needed, so that a rerun creates nothing twice")
    if args.resume and args.overwrite:
        raise CreateInputError("--overwrite: cannot be combined with --resume")
    held = results_lock.acquire(results)
    try:
        exists = os.path.exists(results) and os.path.getsize(results) > 0
        if exists and not (args.resume or args.overwrite):
            raise CreateInputError(
                f"--results {results} exists: add --resume to finish it, or --overwrite"
            )
        state = load_state(results) if args.resume else {}
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if args.overwrite else 0)
        fd = os.open(results, flags, 0o644)
        try:
            return asyncio.run(_run(args, items, state, fd))
        finally:
            os.close(fd)
    finally:
        if held is not None:
            held.release()
