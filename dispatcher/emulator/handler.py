"""One request in, one Cloudflare-shaped answer out: the emulator's hot path.

Order of checks, each answering at the first failure:
rate limit (every API request counts, keyed by credential, else client IP) -> route ->
method -> credentials -> path rules -> known instance -> body size -> JSON body ->
injected faults -> success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from hashlib import sha256
from typing import Final
from urllib.parse import unquote

import orjson
from aiohttp import web

from dispatcher.emulator import envelope
from dispatcher.emulator.auth import Authenticator
from dispatcher.emulator.config import EmulatorConfig
from dispatcher.emulator.envelope import ApiError
from dispatcher.emulator.faults import EventKey, FaultKind, FaultPlan
from dispatcher.emulator.instances import Answer, InstanceStore
from dispatcher.emulator.log import EmulatorLog, RequestEntry
from dispatcher.emulator.ratelimit import FixedWindowLimiter
from dispatcher.emulator.units import format_seconds
from dispatcher.inputs.validation import MAX_BODY_BYTES, RuleViolation, check_body_size, check_path

API_ROOT: Final = "/client/v4"
STATS_PATH: Final = "/__emulator/stats"
_ADMIN_PREFIX: Final = "/__emulator/"
_ACCOUNTS: Final = API_ROOT + "/accounts/"
Names = tuple[str | None, str | None, str | None]  # workflow, instance_id, event_type
_NO_PATH: Final[Names] = (None, None, None)

Route = tuple[str, str, str, str]  # account, workflow, instance_id, event_type (decoded)


class BadSegment(ValueError):
    """A path segment whose percent-encoding does not decode to UTF-8."""


def parse_event_path(path: str) -> Route | None:
    """The decoded path parameters of an event URL, or ``None`` for any other path.

    Splitting happens before decoding, so an encoded ``%2F`` stays inside its segment
    (and is then refused by the name pattern, as the real API does).
    """
    if not path.startswith(_ACCOUNTS):
        return None
    parts = path[len(_ACCOUNTS) :].split("/")
    if (
        len(parts) != 7
        or parts[1] != "workflows"
        or parts[3] != "instances"
        or parts[5] != "events"
        or not (parts[0] and parts[2] and parts[4] and parts[6])
    ):
        return None
    if "%" not in path:
        return parts[0], parts[2], parts[4], parts[6]
    try:
        return (
            unquote(parts[0], errors="strict"),
            unquote(parts[2], errors="strict"),
            unquote(parts[4], errors="strict"),
            unquote(parts[6], errors="strict"),
        )
    except UnicodeDecodeError as exc:
        raise BadSegment("a path segment is not valid percent-encoded UTF-8") from exc


def parse_instances_path(path: str) -> tuple[str, str, str | None] | None:
    """(workflow, "list"|"batch"|"one", instance_id) for an instances URL, else None."""
    if not path.startswith(_ACCOUNTS):
        return None
    parts = path[len(_ACCOUNTS) :].split("/")
    if len(parts) < 4 or parts[1] != "workflows" or parts[3] != "instances" or not parts[2]:
        return None
    try:
        workflow = unquote(parts[2], errors="strict")
        if len(parts) == 4:
            return workflow, "list", None
        if len(parts) == 5 and parts[4] == "batch":
            return workflow, "batch", None
        if len(parts) == 5 and parts[4]:
            return workflow, "one", unquote(parts[4], errors="strict")
    except UnicodeDecodeError:
        return None
    return None


class EventService:
    """Holds the emulator's state (budgets, fault plan, log) and answers requests."""

    def __init__(
        self, config: EmulatorConfig, log: EmulatorLog, clock: Callable[[], float]
    ) -> None:
        self._log = log
        self._clock = clock
        self._auth = Authenticator(config.tokens, config.legacy_keys)
        self._known = config.known_instances
        self._strict_ids = config.strict_ids
        limit = config.limit
        lockout = config.effective_lockout
        self._limiter = (
            FixedWindowLimiter(limit.quota, limit.window, lockout)
            if limit is not None and lockout is not None
            else None
        )
        # Constant for the whole run, so built once.
        self._policy = (
            f'"burst";q={limit.quota};w={format_seconds(limit.window)}' if limit is not None else ""
        )
        faults = config.faults
        self._plan = (
            FaultPlan(faults, config.seed) if faults.any_failure or faults.any_latency else None
        )
        self._timestamps = envelope.Timestamps()
        self.instances = (
            InstanceStore(
                config.instances, config.seed, clock, log.creations, strict_ids=config.strict_ids
            )
            if config.instances is not None
            else None
        )

    # -- the hot path -------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = self._clock()
        raw = request.raw_path
        cut = raw.find("?")
        path = raw if cut < 0 else raw[:cut]
        if path.startswith(_ADMIN_PREFIX):
            return self._admin(request, path)

        try:
            route = parse_event_path(path)
        except BadSegment as exc:
            route = None
            bad_segment: str | None = str(exc)
        else:
            bad_segment = None
        names: Names = _NO_PATH if route is None else route[1:]

        identity, auth_error = self._auth.check(request.headers)
        headers: dict[str, str] = {"Content-Type": envelope.JSON_TYPE}
        if self._limiter is not None:
            verdict = self._limiter.hit(identity or f"ip:{request.remote}", now)
            headers["Ratelimit"] = f'"default";r={verdict.remaining};t={verdict.reset}'
            headers["Ratelimit-Policy"] = self._policy
            if not verdict.allowed:
                headers["Retry-After"] = str(verdict.retry_after)
                return self._error(envelope.RATE_LIMITED, headers, now, names)

        if route is None and bad_segment is None:
            if self.instances is not None:
                target = parse_instances_path(path)
                if target is not None:
                    return await self._instances(request, target, auth_error, headers, now)
            return self._error(envelope.NO_ROUTE, headers, now, names)
        if request.method != "POST":
            headers["Allow"] = "POST"
            return self._error(envelope.METHOD_NOT_ALLOWED, headers, now, names)
        if auth_error is not None:
            return self._error(auth_error, headers, now, names)
        if route is None:
            bad = envelope.api_error(400, envelope.BAD_PATH_CODE, bad_segment or "bad path")
            return self._error(bad, headers, now, names)

        _, workflow, instance_id, event_type = route
        try:
            check_path(workflow, instance_id, event_type, strict_ids=self._strict_ids)
        except RuleViolation as exc:
            bad = envelope.api_error(400, envelope.BAD_PATH_CODE, exc.message)
            return self._error(bad, headers, now, names)
        if self._known is not None and instance_id not in self._known:
            return self._error(envelope.INSTANCE_NOT_FOUND, headers, now, names)
        store = self.instances
        if store is not None and store.instance(workflow, instance_id) is None:
            return self._error(envelope.INSTANCE_NOT_FOUND, headers, now, names)

        body_sha: str | None = None
        if request.body_exists:
            declared = request.content_length
            try:
                # A declared size is refused before a byte of the body is read.
                if declared is not None:
                    check_body_size(declared)
                body = await request.read()
            except RuleViolation as exc:
                return self._error(_too_large(exc.message), headers, now, names)
            except web.HTTPRequestEntityTooLarge:
                too_big = f"body is over the API's limit of {MAX_BODY_BYTES} bytes"
                return self._error(_too_large(too_big), headers, now, names)
            if body:
                try:
                    orjson.loads(body)
                except orjson.JSONDecodeError:
                    return self._error(envelope.MALFORMED_JSON, headers, now, names)
                body_sha = sha256(body).hexdigest()

        event: EventKey = (workflow, instance_id, event_type, body_sha)
        if self._plan is not None:
            fault, latency = self._plan.decide(event)
            if latency > 0:
                await asyncio.sleep(latency)
            if fault is not None:
                return self._fault(request, fault, headers, now, event)

        log = self._log
        if store is not None:
            store.receive_event(workflow, instance_id, event_type, self._clock())
        log.accept(event, self._clock() if self._plan is not None else now)
        log.record(RequestEntry(now, 200, workflow, instance_id, event_type, body_sha))
        return web.Response(
            body=envelope.success_body(instance_id, self._timestamps.now()),
            status=200,
            headers=headers,
        )

    async def _instances(
        self,
        request: web.Request,
        target: tuple[str, str, str | None],
        auth_error: ApiError | None,
        headers: dict[str, str],
        now: float,
    ) -> web.Response:
        store = self.instances
        assert store is not None
        workflow, kind, instance_id = target
        names: Names = (workflow, instance_id, None)
        allowed = {"list": "GET, POST", "batch": "POST", "one": "GET"}[kind]
        if request.method not in allowed.split(", "):
            headers["Allow"] = allowed
            return self._error(envelope.METHOD_NOT_ALLOWED, headers, now, names)
        if auth_error is not None:
            return self._error(auth_error, headers, now, names)
        try:
            check_path(workflow, instance_id or "x", "x", strict_ids=self._strict_ids)
        except RuleViolation as exc:
            bad = envelope.api_error(400, envelope.BAD_PATH_CODE, exc.message)
            return self._error(bad, headers, now, names)
        query = dict(request.query)
        if request.method == "GET":
            answer = (
                store.list(workflow, query)
                if instance_id is None
                else store.get(workflow, instance_id, query)
            )
        else:
            raw = await request.read() if request.body_exists else b""
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return self._error(envelope.MALFORMED_JSON, headers, now, names)
            if self._plan is not None:
                # Faults hit creations too: a lost answer is what resume must survive.
                fault, latency = self._plan.decide((workflow, kind, sha256(raw).hexdigest(), None))
                if latency > 0:
                    await asyncio.sleep(latency)
                if fault is not None and fault is not FaultKind.DROP:
                    return self._fault(request, fault, headers, now, (workflow, "", "", None))
                if fault is FaultKind.DROP:
                    answer = store.create(workflow, body, single=kind == "list")
                    return self._fault(request, fault, headers, now, (workflow, "", "", None))
            answer = store.create(workflow, body, single=kind == "list")
        return self._answer(answer, headers, now, names)

    def _answer(
        self, answer: Answer, headers: dict[str, str], now: float, names: Names
    ) -> web.Response:
        self._log.record(RequestEntry(now, answer.status, *names, None, answer.code))
        return web.Response(body=answer.body, status=answer.status, headers=headers)

    # -- answers ------------------------------------------------------------------------

    def _error(
        self,
        error: ApiError,
        headers: dict[str, str],
        now: float,
        names: Names,
        body_sha: str | None = None,
    ) -> web.Response:
        workflow, instance_id, event_type = names
        self._log.record(
            RequestEntry(now, error.status, workflow, instance_id, event_type, body_sha, error.code)
        )
        return web.Response(body=error.body, status=error.status, headers=headers)

    def _fault(
        self,
        request: web.Request,
        fault: FaultKind,
        headers: dict[str, str],
        now: float,
        event: EventKey,
    ) -> web.Response:
        self._log.fault(fault)
        names = event[:3]
        if fault is FaultKind.HTTP_500:
            return self._error(envelope.INTERNAL_ERROR, headers, now, names, event[3])
        if fault is FaultKind.HTTP_503:
            return self._error(envelope.UNAVAILABLE, headers, now, names, event[3])
        if fault is FaultKind.HTTP_502:
            headers["Content-Type"] = envelope.HTML_TYPE
            self._log.record(RequestEntry(now, 502, *names, event[3]))
            return web.Response(body=envelope.BAD_GATEWAY_HTML, status=502, headers=headers)
        # DROP: close without a byte of answer. aiohttp then fails to write the response
        # below, treats it as a client disconnect and stays quiet.
        self._log.record(RequestEntry(now, None, *names, event[3]))
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=200)

    def _admin(self, request: web.Request, path: str) -> web.Response:
        headers = {"Content-Type": envelope.JSON_TYPE}
        if path != STATS_PATH:
            return web.Response(body=envelope.NO_ROUTE.body, status=404, headers=headers)
        if request.method not in {"GET", "HEAD"}:
            headers["Allow"] = "GET"
            return web.Response(body=envelope.METHOD_NOT_ALLOWED.body, status=405, headers=headers)
        return web.Response(body=orjson.dumps(self._log.snapshot()), headers=headers)


def _too_large(message: str) -> ApiError:
    return envelope.api_error(413, envelope.BODY_TOO_LARGE_CODE, message)
