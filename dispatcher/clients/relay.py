"""The relay client: per-event ``send()`` calls coalesced into ``POST /events`` batches.

The engine's workers each call :meth:`RelayTransport.send` for one event, as with any
transport. Sends that arrive together are gathered into one batch (up to ``batch_size``
events, or whatever came within ``linger`` seconds) and posted to the relay Worker
(``relay/``); each event's :class:`~dispatcher.model.Outcome` comes from its own result in
the answer, so every record still gets its own envelope and the truth rule applies per
event. A batch that timed out or lost its connection makes each of its events an
answerless "may have arrived" outcome; retrying is safe because the relay remembers
delivered record keys and answers a second copy as delivered without sending it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import orjson

from dispatcher.clients.base import USER_AGENT, outcome_from_response
from dispatcher.model import ErrorKind, Event, Outcome

__all__ = ["RelayConfig", "RelayTransport", "outcome_of_result"]

_MAX_MESSAGE_CHARS: Final = 300
# The relay's body limit (relay/src/index.ts MAX_BODY_BYTES) with room for the framing.
MAX_BATCH_BYTES: Final = 30 * 1024 * 1024
# Per-event statuses for what the relay answered of that event alone.
_CODE_STATUS: Final = {"not_found": 404, "invalid": 400, "failed": 503}
_CF_INSTANCE_NOT_FOUND: Final = 10501


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    """Everything the relay client needs, built once per run."""

    base_url: str
    secret: str = field(repr=False)
    batch_size: int = 100
    linger: float = 0.005
    timeout: float = 30.0
    connect_timeout: float = 10.0
    pool_size: int = 4

    def __repr__(self) -> str:
        return (
            f"RelayConfig(base_url={self.base_url!r}, secret=<redacted>, "
            f"batch_size={self.batch_size}, linger={self.linger}, timeout={self.timeout})"
        )


def _text(value: object) -> str:
    return str(value)[:_MAX_MESSAGE_CHARS]


def _maybe_arrived(kind: ErrorKind, message: str, latency_s: float) -> Outcome:
    # No per-event answer, and the batch may have been acted on: unknown unless retried.
    return Outcome(
        status=None, ok=False, sent=True, latency_s=latency_s, error_kind=kind, message=message
    )


def outcome_of_result(result: object, latency_s: float) -> Outcome:
    """One event's :class:`Outcome` from its entry in the relay's ``results`` list."""
    if not isinstance(result, dict):
        return _maybe_arrived(ErrorKind.CONNECTION, "relay: no result for this event", latency_s)
    if result.get("ok") is True:
        return Outcome(status=200, ok=True, sent=True, latency_s=latency_s)
    code = result.get("code")
    message = f"relay: {code}: {_text(result.get('message', ''))}"
    status = _CODE_STATUS.get(code) if isinstance(code, str) else None
    if status is not None:
        # The relay knows nothing was delivered: a real answer, final or retryable by status.
        cf_code = _CF_INSTANCE_NOT_FOUND if code == "not_found" else None
        return Outcome(
            status=status,
            ok=False,
            sent=True,
            latency_s=latency_s,
            error_kind=ErrorKind.HTTP,
            cf_code=cf_code,
            message=message,
        )
    # maybe_delivered, in_flight, or a code this client does not know: it may have arrived.
    return _maybe_arrived(ErrorKind.CONNECTION, message, latency_s)


class _Pending:
    __slots__ = ("event", "future")

    def __init__(self, event: Event, future: asyncio.Future[Outcome]) -> None:
        self.event = event
        self.future = future


class RelayTransport:
    """A :class:`~dispatcher.clients.base.Transport` that batches events for the relay."""

    __slots__ = (
        "_batches",
        "_config",
        "_headers",
        "_pending",
        "_pending_bytes",
        "_session",
        "_timer",
        "_url",
    )

    def __init__(self, config: RelayConfig, *, session: aiohttp.ClientSession | None = None):
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
        self._config = config
        self._url = f"{config.base_url.rstrip('/')}/events"
        self._headers = {
            "User-Agent": USER_AGENT,
            "Authorization": f"Bearer {config.secret}",
            "Content-Type": "application/json",
        }
        self._session = session
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"RelayTransport({self._config!r})"

    def _open(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._config.pool_size),
            timeout=aiohttp.ClientTimeout(
                total=self._config.timeout, connect=self._config.connect_timeout
            ),
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        self._flush()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _encode(event: Event) -> bytes:
        # The payload is already JSON (encoded once when read): splice it in as is.
        head = orjson.dumps(
            {
                "key": event.key,
                "instance_id": event.instance_id,
                "type": event.event_type,
                "workflow": event.workflow,
            }
        )
        if event.body is None:
            return head
        return head[:-1] + b',"payload":' + event.body + b"}"

    async def send(self, event: Event) -> Outcome:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        size = 0 if event.body is None else len(event.body)
        if self._pending and self._pending_bytes + size > MAX_BATCH_BYTES:
            self._flush()
        self._pending.append(_Pending(event, future))
        self._pending_bytes += size
        if len(self._pending) >= self._config.batch_size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._config.linger, self._flush)
        # A worker cancelled while waiting leaves its event in the batch: the batch still
        # goes (others wait on it), and this event's answer is simply not read.
        return await asyncio.shield(future)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        task = asyncio.get_running_loop().create_task(self._post(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _post(self, batch: list[_Pending]) -> None:
        try:
            outcomes = await self._exchange([p.event for p in batch])
        except BaseException as exc:
            # Never leave a worker waiting on an answer that will not come.
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            raise
        for pending, outcome in zip(batch, outcomes, strict=True):
            if not pending.future.done():
                pending.future.set_result(outcome)

    async def _exchange(self, events: list[Event]) -> list[Outcome]:
        body = b'{"events":[' + b",".join(self._encode(e) for e in events) + b"]}"
        session = self._session
        if session is None:
            session = self._session = self._open()
        started = time.perf_counter()
        try:
            async with session.post(
                self._url, data=body, headers=self._headers, allow_redirects=False
            ) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # Could not connect: the batch never left.
            failed = Outcome(
                status=None,
                ok=False,
                sent=False,
                latency_s=time.perf_counter() - started,
                error_kind=ErrorKind.CONNECT,
                message=_describe(exc),
            )
            return [failed] * len(events)
        except TimeoutError as exc:
            return self._all_unknown(events, ErrorKind.TIMEOUT, started, exc)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            return self._all_unknown(events, ErrorKind.CONNECTION, started, exc)
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return self._per_event(events, raw, status, latency)
        if 400 <= status < 500:
            # The relay refuses a whole batch (wrong secret, malformed, too large) before it
            # sends any of it; a 429 carries Retry-After for the gate.
            refused = outcome_from_response(status, raw, headers, latency)
            return [refused] * len(events)
        # A 5xx or a redirect: the Worker may have failed halfway through the batch.
        return [
            _maybe_arrived(
                ErrorKind.CONNECTION,
                f"relay answered HTTP {status}; the batch may have been partly sent",
                latency,
            )
        ] * len(events)

    @staticmethod
    def _per_event(events: list[Event], raw: bytes, status: int, latency: float) -> list[Outcome]:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        results = doc.get("results") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("success") is not True
            or not isinstance(results, list)
            or len(results) != len(events)
        ):
            message = f"relay answered HTTP {status} without one result per event"
            return [_maybe_arrived(ErrorKind.CONNECTION, message, latency)] * len(events)
        outcomes = []
        for event, result in zip(events, results, strict=True):
            if isinstance(result, dict) and result.get("key") != event.key:
                result = None  # answers out of order would be attributed to the wrong record
            outcomes.append(outcome_of_result(result, latency))
        return outcomes

    @staticmethod
    def _all_unknown(
        events: list[Event], kind: ErrorKind, started: float, exc: BaseException
    ) -> list[Outcome]:
        failed = _maybe_arrived(kind, _describe(exc), time.perf_counter() - started)
        return [failed] * len(events)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
