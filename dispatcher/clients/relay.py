"""The relay client: per-event ``send()`` calls coalesced into ``POST /events`` batches.

The engine's workers each call :meth:`RelayTransport.send` for one event, as with any
transport. Sends that arrive together are gathered into one batch (up to ``batch_size``
events, or whatever came within ``linger`` seconds) and posted to the relay Worker
(``relay/``); each event's :class:`~dispatcher.model.Outcome` comes from its own result in
the answer, so every record still gets its own envelope and the truth rule applies per
event. A batch that timed out or lost its connection makes each of its events an
answerless "may have arrived" outcome; retrying is safe because the relay remembers
delivered record keys and answers a second copy as delivered without sending it.

How one answer becomes each event's outcome (the truth rule of docs/results.md, per event):

- could not connect: the batch never left, so every event is ``not_sent`` (``connect``);
- no complete answer (timeout, connection closed or reset, a cut body, an answer that is
  not HTTP/1.x, one over the caps): every event may have arrived (``unknown``, retried);
- 1xx, 3xx, 4xx: the relay, or something in front of it, refused the whole batch before
  any of it was sent (401 wrong secret, 400, 429 with ``Retry-After``): an error answer
  for every event; no redirect is followed;
- 413, the batch is too large: nothing of it was sent, so no event is rejected for it.
  When the relay says it holds fewer events per batch (its ``MAX_BATCH``) than this batch,
  ``--batch-size`` is above the relay's setting: the run stops with one line naming it, and
  the batch's events are left for ``--resume``. Otherwise (too many bytes, for the relay or
  a proxy in front of it) the batch is split in halves and each is posted again, down to
  one event, which alone too large is rejected; later batches are no larger than the
  halves that went through;
- 5xx: the Worker may have failed halfway through the batch: in doubt for every event
  (``unknown``), retried, since the relay's dedupe makes a retry safe;
- 2xx: each event's own entry of ``results``, matched by position *and* key. Only an
  entry ``{"key": <this event's key>, "ok": true}`` confirms. A body that is not the
  relay's complete answer (not JSON, ``success`` not ``true``, no ``results``, a count
  that is not the batch's) leaves every event in doubt; an entry naming another key, or
  one that is not an object, leaves that event in doubt (``unknown``, not retried, as a
  2xx without the API's envelope).

Every text that came from the relay or an exception is redacted of the secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import orjson
from yarl import URL

from dispatcher.clients.base import (
    MAX_FIELD,
    MAX_HEADERS,
    MAX_LINE,
    NO_SECRETS,
    USER_AGENT,
    Redactor,
    describe,
    failure,
    is_refused,
    outcome_from_response,
    refused_outcome,
    short,
)
from dispatcher.clients.proxy import proxy_for
from dispatcher.model import ErrorKind, Event, Outcome

__all__ = ["RelayConfig", "RelayTransport", "outcome_of_result"]

# The relay's body limit (relay/src/index.ts MAX_BODY_BYTES) with room for the framing.
MAX_BATCH_BYTES: Final = 30 * 1024 * 1024
# Per-event statuses for what the relay answered of that event alone: each code says that
# nothing was delivered. key_reused: the key was used for another workflow, instance, type
# or payload (Stripe answers an idempotency key reused so with an error, as this does).
_CODE_STATUS: Final = {"not_found": 404, "invalid": 400, "failed": 503, "key_reused": 409}
# The relay cannot tell whether the event an earlier relay delivered under this key (one
# that kept no fingerprint) was this one: it may have arrived, and sending it again
# answers the same, so it is in doubt and not retried.
_UNVERIFIABLE: Final = "unverifiable"
_TOO_LARGE: Final = 413
_CF_INSTANCE_NOT_FOUND: Final = 10501
# An answer holds one result per event (key up to 512 characters, a message): a few
# hundred KiB for the largest batch. Anything much larger is not the relay's answer.
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
_READ: Final = 64 * 1024


class _TooLarge(Exception):
    """An answer over :data:`MAX_ANSWER_BYTES`: not the relay's."""


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


def _maybe_arrived(kind: ErrorKind, message: str, latency_s: float) -> Outcome:
    # No per-event answer, and the batch may have been acted on: unknown unless retried.
    return Outcome(
        status=None, ok=False, sent=True, latency_s=latency_s, error_kind=kind, message=message
    )


def _in_doubt(
    status: int, message: str, latency_s: float, retry_after: float | None = None
) -> Outcome:
    # An HTTP answer that neither confirms nor refuses this event: whoever answered may have
    # sent it. The truth rule makes it unknown; the policy retries a 5xx, not a 2xx.
    return Outcome(
        status=status,
        ok=False,
        sent=True,
        latency_s=latency_s,
        error_kind=ErrorKind.HTTP,
        message=message,
        retry_after=retry_after,
        in_doubt=True,
    )


def outcome_of_result(
    result: object,
    latency_s: float,
    *,
    key: str | None = None,
    status: int = 200,
    redact: Redactor = NO_SECRETS,
) -> Outcome:
    """One event's :class:`Outcome` from its entry in the relay's ``results`` list.

    ``key`` (when given) is the event's record key: an entry naming another key is not
    this event's answer, whatever it says. ``status`` is the HTTP status of the answer.
    """
    if not isinstance(result, dict) or (key is not None and result.get("key") != key):
        return _in_doubt(
            status, f"relay answered HTTP {status} without a result for this event", latency_s
        )
    if result.get("ok") is True:
        return Outcome(status=status, ok=True, sent=True, latency_s=latency_s)
    code = result.get("code")
    text = " ".join(redact(str(result.get("message", ""))).split())
    message = short(f"relay: {redact(str(code))}: {text}")
    if code == _UNVERIFIABLE:
        return _in_doubt(status, message, latency_s)
    known = _CODE_STATUS.get(code) if isinstance(code, str) else None
    if known is not None:
        # The relay knows nothing was delivered: a real answer, final or retryable by status.
        cf_code = _CF_INSTANCE_NOT_FOUND if code == "not_found" else None
        return Outcome(
            status=known,
            ok=False,
            sent=True,
            latency_s=latency_s,
            error_kind=ErrorKind.HTTP,
            cf_code=cf_code,
            message=message,
        )
    # maybe_delivered, in_flight, or a code this client does not know: it may have arrived,
    # and a retry is safe (the relay remembers delivered keys), so it is retried.
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
        "_cap",
        "_config",
        "_headers",
        "_pending",
        "_pending_bytes",
        "_proxy",
        "_reached",
        "_redact",
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
        self._redact = Redactor({"Authorization": self._headers["Authorization"]})
        # HTTPS_PROXY / NO_PROXY as for the API (clients/proxy.py): a relay on workers.dev
        # is reached the same way. The secret goes with each request, inside the tunnel:
        # aiohttp would copy a session default header into the CONNECT the proxy reads.
        route = proxy_for(config.base_url)
        self._proxy = route.url if route is not None else None
        self._session = session
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._batches: set[asyncio.Task[None]] = set()
        # Events per batch: batch_size, lowered for the rest of the run when a batch of
        # more was refused as too large (413) and had to be split.
        self._cap = config.batch_size
        # Some batch of this run got through to the relay: a refusal after that is a
        # restart to retry, not a relay that was never there (see refused_outcome).
        self._reached = False

    def __repr__(self) -> str:
        return f"RelayTransport({self._config!r})"

    def _open(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._config.pool_size),
            timeout=aiohttp.ClientTimeout(
                total=self._config.timeout, connect=self._config.connect_timeout
            ),
            raise_for_status=False,
            # The same head limits as the other clients; the body is capped when read.
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            # aiohttp decodes Content-Encoding here (auto_decompress): bodies reach
            # outcome_from_response decoded, and a corrupt one is a ClientPayloadError.
        )

    async def aclose(self) -> None:
        # The engine is done when this is called: no one waits for an answer any more. An
        # event still gathering is not sent (the run has stopped), and a batch still in
        # flight is cut off instead of waited for up to its timeout: its events' envelopes
        # already say it may have arrived, and Ctrl-C with --grace 1s must not take 30 s.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for left in pending:
            left.future.cancel()
        for task in self._batches:
            task.cancel()
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
        if len(self._pending) >= self._cap:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._config.linger, self._flush)
        # A worker cancelled while waiting leaves its event in the batch: the batch still
        # goes (others wait on it), and this event's answer is simply not read (the
        # engine writes the event's envelope as cut off in flight: it may have arrived).
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
            await self._post_split(batch)
        except asyncio.CancelledError:
            # Cut off by aclose(): a cancelled future, unlike one holding an exception,
            # logs nothing when no one reads it. (Events of a half already answered keep
            # their answer: cancelling a done future does nothing.)
            for pending in batch:
                pending.future.cancel()
            raise
        except BaseException as exc:
            # Never leave a worker waiting on an answer that will not come.
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            raise

    async def _post_split(self, batch: list[_Pending]) -> None:
        outcomes = await self._exchange([p.event for p in batch])
        if outcomes is None:
            # Refused as too large, and nothing of it was sent: each half goes on its own,
            # one after the other, and answers its own events as soon as it is answered.
            half = (len(batch) + 1) // 2
            self._cap = min(self._cap, half)
            await self._post_split(batch[:half])
            await self._post_split(batch[half:])
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            if not pending.future.done():
                pending.future.set_result(outcome)

    async def _exchange(self, events: list[Event]) -> list[Outcome] | None:
        """Each event's outcome of one ``POST /events``; ``None``: split it and try again."""
        body = b'{"events":[' + b",".join(self._encode(e) for e in events) + b"]}"
        session = self._session
        if session is None:
            session = self._session = self._open()
        n = len(events)
        started = time.perf_counter()
        try:
            async with session.post(
                self._url,
                data=body,
                headers=self._headers,
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                raw = await _read_capped(resp)
                status = resp.status
                headers = resp.headers
        # The transport boundary: every exception becomes an outcome, none escapes.
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # Could not connect: the batch never left.
            outcome = self._failed(ErrorKind.CONNECT, False, started, exc)
            if (
                isinstance(exc, aiohttp.ClientConnectorError)
                and not isinstance(exc, aiohttp.ClientProxyConnectionError)
                and not self._reached
                and self._proxy is None
                and is_refused(exc.os_error)
            ):
                outcome = refused_outcome(outcome, exc.host, exc.port or URL(self._url).port or 0)
            return [outcome] * n
        except TimeoutError as exc:
            self._reached = True
            return [self._failed(ErrorKind.TIMEOUT, True, started, exc)] * n
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # Closed, reset or cut off after the batch was written.
            self._reached = True
            return [self._failed(ErrorKind.CONNECTION, True, started, exc)] * n
        except Exception as exc:
            # An answer that is not HTTP/1.x aiohttp can frame, or over the caps: the batch
            # left, so any of it may have been sent.
            self._reached = True
            return [self._failed(ErrorKind.PROTOCOL, True, started, exc)] * n
        self._reached = True
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return self._per_event(events, raw, status, latency)
        if status == _TOO_LARGE:
            refused = outcome_from_response(status, raw, headers, latency, self._redact)
            return self._too_large(events, refused, raw)
        if status >= 500:
            # The Worker may have failed halfway through the batch.
            answer = outcome_from_response(
                status, raw, headers, latency, self._redact, decoded=True
            )
            said = f" ({answer.message})" if answer.message else ""
            doubt = _in_doubt(
                status,
                short(f"relay answered HTTP {status}; the batch may have been partly sent{said}"),
                latency,
                answer.retry_after,
            )
            return [doubt] * n
        # 1xx, 3xx, 4xx: refused as a whole before any of it was sent (a wrong secret, a
        # malformed or too large batch; a 429 carries Retry-After for the gate). Nothing in
        # front of a Worker redirects after the Worker acted, and no redirect is followed.
        return [
            outcome_from_response(status, raw, headers, latency, self._redact, decoded=True)
        ] * n

    def _per_event(
        self, events: list[Event], raw: bytes, status: int, latency: float
    ) -> list[Outcome]:
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
            # Not the relay's complete answer: nothing in it can be attributed to an event.
            message = f"relay answered HTTP {status} without one result per event"
            return [_in_doubt(status, message, latency)] * len(events)
        redact = self._redact
        return [
            # By position and key: an answer out of order would confirm the wrong record.
            outcome_of_result(result, latency, key=event.key, status=status, redact=redact)
            for event, result in zip(events, results, strict=True)
        ]

    def _too_large(self, events: list[Event], refused: Outcome, raw: bytes) -> list[Outcome] | None:
        # A 413 is the relay's (or a proxy's) refusal of the whole request before anything
        # was sent: no event of it is rejected for its size unless it is alone.
        n = len(events)
        max_batch = _max_batch(raw)
        if max_batch is not None and n > max_batch:
            # The relay says how many it takes: fewer than --batch-size, a setting of this
            # run that every batch would break. Stop, and leave the events for --resume.
            reason = (
                f"the relay takes at most {max_batch} events per request (its MAX_BATCH) and "
                f"--batch-size is {self._config.batch_size}: run again with --batch-size "
                f"{max_batch} or less (or raise the relay's MAX_BATCH) and --resume"
            )
            return [dataclasses.replace(refused, stop_run=reason)] * n
        if n > 1:
            return None
        said = f": {refused.message}" if refused.message else ""
        message = short(f"relay refused this event alone as too large (HTTP 413{said})")
        return [dataclasses.replace(refused, message=message)]

    def _failed(self, kind: ErrorKind, sent: bool, started: float, exc: BaseException) -> Outcome:
        redact = self._redact
        return failure(kind, sent, time.perf_counter() - started, describe(exc, redact), redact)


def _max_batch(raw: bytes) -> int | None:
    """The relay's ``MAX_BATCH`` from a 413's ``limits``, when the answer names it."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    limits = doc.get("limits") if isinstance(doc, dict) else None
    value = limits.get("max_batch") if isinstance(limits, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, refusing one over :data:`MAX_ANSWER_BYTES`."""
    length = resp.content_length
    if length is not None and length > MAX_ANSWER_BYTES:
        raise _TooLarge(f"relay answer of {length} bytes is over {MAX_ANSWER_BYTES}")
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(_READ):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _TooLarge(f"relay answer over {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
