"""What every client shares: the transport protocol, its config, URLs, the answer rule.

A client makes one HTTP attempt for one event and nothing else. The URL (percent-encoded
segments) and the auth headers are built once per run; every answer is mapped to an
:class:`~dispatcher.model.Outcome` by :func:`outcome_from_response`, and every client maps
its own exceptions to our :class:`~dispatcher.model.ErrorKind` at its boundary. Clients
know nothing of retries or rates: those are the policy's and the gate's.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import quote

import orjson

from dispatcher.clients.headers import parse_ratelimit, parse_retry_after
from dispatcher.model import ErrorKind, Event, Outcome

USER_AGENT: Final = "dispatcher/0.1 (+cloudflare-workflows-events)"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# Bodies of error answers can be large HTML pages from a proxy; keep only a readable head.
_MAX_MESSAGE_CHARS: Final = 300
REDACTED: Final = "<redacted>"

# What both clients accept from a server, so that they agree on every answer. The line and
# field limits are aiohttp's own defaults; the head and body caps bound the memory a hostile
# server can take (an API answer is a few hundred bytes).
MAX_LINE: Final = 8190
MAX_FIELD: Final = 8190
MAX_HEADERS: Final = 128
MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 1024 * 1024


class Transport(Protocol):
    """What the engine needs from a transport: one attempt, mapped to an :class:`Outcome`."""

    async def send(self, event: Event) -> Outcome: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportConfig:
    """Everything a transport needs, built once per run."""

    base_url: str
    account_id: str | None  # None: the target's URLs have no /accounts/{id} segment
    auth_headers: Mapping[str, str]
    timeout: float = 30.0
    connect_timeout: float = 10.0
    pool_size: int = 8

    def __repr__(self) -> str:
        # auth_headers hold the secret: never print them.
        return (
            f"TransportConfig(base_url={self.base_url!r}, account_id={self.account_id!r}, "
            f"auth_headers=<redacted>, timeout={self.timeout}, "
            f"connect_timeout={self.connect_timeout}, pool_size={self.pool_size})"
        )


def _seg(value: str) -> str:
    # Every character outside the unreserved set is encoded, "/" included: an id must stay
    # one path segment whatever it holds.
    return quote(value, safe="")


_MAX_CACHED: Final = 1024


class UrlBuilder:
    """Builds event URLs with the per-run prefix computed once and workflow parts cached."""

    __slots__ = ("_event_parts", "_prefix", "_workflow_parts")

    def __init__(self, base_url: str, account_id: str | None) -> None:
        # No account id: a target such as wrangler dev, whose base URL ends where
        # "/workflows/" begins (see dispatcher.clients.targets).
        account = "" if account_id is None else f"/accounts/{_seg(account_id)}"
        self._prefix = f"{base_url.rstrip('/')}{account}/workflows/"
        self._workflow_parts: dict[str, str] = {}
        self._event_parts: dict[str, str] = {}  # a run has a few event types, cached

    def __call__(self, workflow: str, instance_id: str, event_type: str) -> str:
        part = self._workflow_parts.get(workflow)
        if part is None:
            part = self._workflow_parts[workflow] = f"{self._prefix}{_seg(workflow)}/instances/"
        tail = self._event_parts.get(event_type)
        if tail is None:
            if len(self._event_parts) >= _MAX_CACHED:
                self._event_parts.clear()  # bounded, whatever the input holds
            tail = self._event_parts[event_type] = f"/events/{_seg(event_type)}"
        return f"{part}{_seg(instance_id)}{tail}"


def is_success_envelope(raw: bytes) -> bool:
    """The confirmation rule: ``raw`` is a complete JSON object whose top-level
    ``success`` is exactly ``true``. Both clients call this, on complete bodies only.

    One ``orjson.loads`` of a small body (about a microsecond): a byte search for
    ``"success":true`` would also match a nested ``result`` or an HTML page quoting it.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return type(doc) is dict and doc.get("success") is True


class _Undecodable(Exception):
    """A body whose ``Content-Encoding`` cannot be undone: its bytes say nothing."""


# More layers than this is not an answer anyone meant (and would cost a pass each).
_MAX_CODINGS: Final = 4
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS


def _inflate(data: bytes, wbits: int, *, members: bool) -> bytes:
    """zlib's inflate of a whole body, refusing a cut, trailing bytes or more than MAX_BODY.

    ``members``: gzip allows several members one after the other (RFC 1952 2.2).
    """
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, MAX_BODY + 1 - len(out))
        except zlib.error as exc:
            raise _Undecodable(f"not valid compressed data ({exc})") from None
        if len(out) > MAX_BODY or inflater.unconsumed_tail:
            raise _Undecodable(f"over {MAX_BODY} bytes once decompressed")
        if not inflater.eof:
            raise _Undecodable("the compressed data is cut off")
        data = inflater.unused_data
        if not data or not members:
            break
    if data:
        raise _Undecodable("bytes after the end of the compressed data")
    return bytes(out)


def decode_body(raw: bytes, content_encoding: str | None) -> bytes:
    """``raw`` with its ``Content-Encoding`` undone (stdlib zlib: gzip, deflate).

    Neither client asks for compression, but a proxy or a misconfigured server may
    compress an answer anyway; its error code and message are in the decoded bytes.
    Raises ``_Undecodable`` for a coding this client does not read (``br``, ``zstd``...)
    or bytes that do not decode: such a body confirms nothing and explains nothing.
    """
    if content_encoding is None:
        return raw
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if len(codings) > _MAX_CODINGS:
        raise _Undecodable(f"{len(codings)} content codings, more than {_MAX_CODINGS}")
    for coding in reversed(codings):  # the last applied comes first off
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            raw = _inflate(raw, _GZIP_WBITS, members=True)
        elif coding == "deflate":
            # RFC 9110 deflate is a zlib stream; some servers send raw deflate, as browsers
            # and aiohttp accept.
            try:
                raw = _inflate(raw, zlib.MAX_WBITS, members=False)
            except _Undecodable:
                raw = _inflate(raw, -zlib.MAX_WBITS, members=False)
        else:
            raise _Undecodable(f"Content-Encoding {coding!r} is not one this client reads")
    return raw


def _error_from_body(raw: bytes) -> tuple[bool, int | None, str | None]:
    """(is an API envelope with ``success: false``, first error code, readable message)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # All of it (a body is at most MAX_BODY): a cut made before redaction could leave
        # the head of a secret behind.
        text = raw.decode("utf-8", "replace").strip()
        return False, None, text or None
    if type(doc) is not dict:
        return False, None, None
    refused = doc.get("success") is False
    errors = doc.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = errors[0].get("code")
        message = errors[0].get("message")
        return (
            refused,
            code if type(code) is int else None,
            str(message) if message is not None else None,
        )
    return refused, None, None


# A secret at least this long is cut out wherever it appears, inside a word too (a server
# may echo it URL-encoded, "Bearer%20<token>"): no ordinary text holds 8 characters of a
# token by chance. A shorter one (an email address; a token the settings refuse but a
# library caller passed) is cut out only where it stands alone, not inside a longer run
# of letters and digits: a token "t" must not turn "Internal" into "In<redacted>ernal".
_MIN_ANYWHERE: Final = 8
_WORD_CHAR: Final = "[A-Za-z0-9]"


class Redactor:
    """Cuts every credential of the run out of text that came from a server or an exception.

    Built once per run from the auth header values (a ``Bearer`` token is also redacted
    on its own, since a server may echo just the token). Applied before any text is
    shortened, so no prefix of a secret survives a cut either. A secret shorter than
    :data:`_MIN_ANYWHERE` is cut out only on word boundaries.
    """

    __slots__ = ("_bounded", "_secrets")

    def __init__(self, auth_headers: Mapping[str, str]) -> None:
        secrets: set[str] = set()
        for value in auth_headers.values():
            value = value.strip()
            if value:
                secrets.add(value)
            scheme, _, rest = value.partition(" ")
            if rest.strip() and scheme.lower() == "bearer":
                secrets.add(rest.strip())
        # Longest first: the whole "Bearer <token>" goes before the bare token.
        ordered = sorted(secrets, key=len, reverse=True)
        self._secrets = tuple(x for x in ordered if len(x) >= _MIN_ANYWHERE)
        short_ones = [x for x in ordered if len(x) < _MIN_ANYWHERE]
        self._bounded = (
            re.compile(
                f"(?<!{_WORD_CHAR})(?:{'|'.join(map(re.escape, short_ones))})(?!{_WORD_CHAR})"
            )
            if short_ones
            else None
        )

    def __repr__(self) -> str:
        count = len(self._secrets) + (0 if self._bounded is None else 1)
        return f"Redactor(<{count} secrets>)"

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if self._bounded is not None:
            text = self._bounded.sub(REDACTED, text)
        return text


NO_SECRETS: Final = Redactor({})


def short(text: str) -> str:
    """A readable head of server text, for an envelope's message."""
    if len(text) > _MAX_MESSAGE_CHARS:
        return text[: _MAX_MESSAGE_CHARS - 1] + "…"
    return text


def describe(exc: BaseException, redact: Redactor) -> str:
    """An exception as one line of text, credentials cut out."""
    # Redact before anything reshapes the text (a secret may hold odd whitespace).
    text = " ".join(redact(str(exc)).split())
    name = type(exc).__name__
    if not name.startswith("_"):  # our own private kinds say it all in their text
        text = f"{name}: {text}" if text else name
    return short(text)


def is_refused(exc: BaseException) -> bool:
    """``exc`` says the host answered the connection attempt with a refusal (nothing listens).

    asyncio reports a host whose every address refused as one ``OSError("Multiple
    exceptions: ...")`` without an errno when the addresses' messages differ (``::1`` and
    ``127.0.0.1``): that counts too when each of its parts is a refusal.
    """
    if isinstance(exc, ConnectionRefusedError):
        return True
    if not isinstance(exc, OSError) or exc.errno is not None:
        return False
    text = str(exc)
    if not text.startswith("Multiple exceptions: "):
        return False
    parts = text.count("[Errno ")
    return parts > 0 and text.count(f"[Errno {errno.ECONNREFUSED}]") == parts


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def nothing_listens(host: str, port: int) -> str:
    """The stop reason for a target that refused every connection of the run.

    On this machine the usual cause is a ``wrangler dev`` (or ``dispatcher emulate``) not
    started yet, elsewhere a wrong ``--base-url``.
    """
    shown = f"[{host}]" if ":" in host else host
    if _is_loopback(host):
        return f"nothing listens on {shown}:{port}; is wrangler dev running?"
    return f"nothing listens on {shown}:{port} (connection refused); check --base-url"


def refused_outcome(outcome: Outcome, host: str, port: int) -> Outcome:
    """``outcome`` (a refused connect) that also stops the run: nothing ever answered."""
    return dataclasses.replace(outcome, stop_run=nothing_listens(host, port))


def failure(
    kind: ErrorKind, sent: bool, latency_s: float, message: str, redact: Redactor
) -> Outcome:
    """An attempt that got no readable answer (``status`` None)."""
    return Outcome(
        status=None,
        ok=False,
        sent=sent,
        latency_s=latency_s,
        error_kind=kind,
        message=short(redact(message)),
    )


def _redirect_message(status: int, location: str | None) -> str:
    where = f" to {location}" if location else ""
    return (
        f"HTTP {status} redirect{where} not followed: the Workflows API never redirects "
        "(check --base-url; a proxy or captive portal may be answering)"
    )


def outcome_from_response(
    status: int,
    raw: bytes,
    headers: Mapping[str, str],
    latency_s: float,
    redact: Redactor = NO_SECRETS,
    *,
    decoded: bool = False,
) -> Outcome:
    """Map one complete HTTP answer to an :class:`Outcome` (pure; the answer rule).

    ``headers`` are looked up by lower-case name: a case-insensitive multidict (aiohttp's)
    or a plain dict of lower-case names holding each header's first value (the fast
    client's, which keeps only the few named here). ``raw`` is the body as it came off
    the wire; its ``Content-Encoding`` is undone here
    (:func:`decode_body`), unless ``decoded`` says the caller's HTTP library already did.
    ``confirmed`` needs a 2xx and :func:`is_success_envelope` of the decoded body. A 2xx
    without the API's envelope, or whose body does not decode, is ``in_doubt``; anything
    else is an error answer. Messages are redacted.
    """
    undecodable: str | None = None
    if not decoded:
        try:
            raw = decode_body(raw, headers.get("content-encoding"))
        except _Undecodable as exc:
            undecodable = f"{headers.get('content-encoding')} body: {exc}"
            raw = b""
    ratelimit = None
    rl = headers.get("ratelimit")
    rlp = headers.get("ratelimit-policy")
    if rl is not None or rlp is not None:
        ratelimit = parse_ratelimit(rl, rlp)
    ok_status = 200 <= status < 300
    if ok_status and undecodable is None and is_success_envelope(raw):
        return Outcome(status=status, ok=True, sent=True, latency_s=latency_s, ratelimit=ratelimit)
    refused, code, message = _error_from_body(raw)
    in_doubt = ok_status and not refused
    if 300 <= status < 400:
        message = _redirect_message(status, headers.get("location"))
    elif status == 101:
        message = "HTTP 101 Switching Protocols: the server left HTTP; not an API answer"
    elif in_doubt:
        kind = headers.get("content-type") or "no content type"
        what = f"{kind}: {message}" if message else f"{kind}, {len(raw)} bytes"
        if undecodable is not None:
            what = f"{kind}, {undecodable}"
        message = (
            f"HTTP {status} without the API's success envelope ({what}); not a confirmation, "
            "and whoever answered may have taken the event"
        )
    elif undecodable is not None:
        message = f"HTTP {status} with an unreadable {undecodable}"
    elif message is None:
        message = "the API answered success: false" if ok_status else f"HTTP {status}"
    return Outcome(
        status=status,
        ok=False,
        sent=True,
        latency_s=latency_s,
        error_kind=ErrorKind.HTTP,
        cf_code=code,
        message=short(" ".join(redact(message).split())),
        retry_after=(
            parse_retry_after(headers.get("retry-after")) if status in (429, 503) else None
        ),
        ratelimit=ratelimit,
        in_doubt=in_doubt,
    )
