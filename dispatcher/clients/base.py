"""What every client shares: the transport protocol, its config, URLs, the answer rule.

A client makes one HTTP attempt for one event and nothing else. The URL (percent-encoded
segments) and the auth headers are built once per run; every answer is mapped to an
:class:`~dispatcher.model.Outcome` by :func:`outcome_from_response`, and every client maps
its own exceptions to our :class:`~dispatcher.model.ErrorKind` at its boundary. Clients
know nothing of retries or rates: those are the policy's and the gate's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import quote

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from dispatcher.clients.headers import parse_ratelimit, parse_retry_after
from dispatcher.model import ErrorKind, Event, Outcome

USER_AGENT: Final = "dispatcher/0.1 (+cloudflare-workflows-events)"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# Bodies of error answers can be large HTML pages from a proxy; keep only a readable head.
_MAX_MESSAGE_CHARS: Final = 300
_SUCCESS_TRUE: Final = b'"success":true'


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


class UrlBuilder:
    """Builds event URLs with the per-run prefix computed once and workflow parts cached."""

    __slots__ = ("_prefix", "_workflow_parts")

    def __init__(self, base_url: str, account_id: str | None) -> None:
        # No account id: a target such as wrangler dev, whose base URL ends where
        # "/workflows/" begins (see dispatcher.clients.targets).
        account = "" if account_id is None else f"/accounts/{_seg(account_id)}"
        self._prefix = f"{base_url.rstrip('/')}{account}/workflows/"
        self._workflow_parts: dict[str, str] = {}

    def __call__(self, workflow: str, instance_id: str, event_type: str) -> str:
        part = self._workflow_parts.get(workflow)
        if part is None:
            part = self._workflow_parts[workflow] = f"{self._prefix}{_seg(workflow)}/instances/"
        return f"{part}{_seg(instance_id)}/events/{_seg(event_type)}"


def _error_from_body(raw: bytes) -> tuple[bool | None, int | None, str | None]:
    """Read ``success`` and the first error of a Cloudflare envelope; tolerate non-JSON."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:_MAX_MESSAGE_CHARS].decode("utf-8", "replace").strip()
        return None, None, text or None
    if not isinstance(doc, dict):
        return None, None, None
    success = doc.get("success")
    errors = doc.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = errors[0].get("code")
        message = errors[0].get("message")
        return (
            success if isinstance(success, bool) else None,
            code if isinstance(code, int) else None,
            str(message)[:_MAX_MESSAGE_CHARS] if message is not None else None,
        )
    return (success if isinstance(success, bool) else None), None, None


def outcome_from_response(
    status: int, raw: bytes, headers: CIMultiDictProxy[str] | CIMultiDict[str], latency_s: float
) -> Outcome:
    """Map one HTTP answer to an :class:`Outcome` (pure; the transport's mapping rule)."""
    ratelimit = None
    rl = headers.get("Ratelimit")
    rlp = headers.get("Ratelimit-Policy")
    if rl is not None or rlp is not None:
        ratelimit = parse_ratelimit(rl, rlp)
    ok_status = 200 <= status < 300
    # The common case, checked without parsing: this endpoint's result holds no booleans.
    if ok_status and _SUCCESS_TRUE in raw:
        return Outcome(status=status, ok=True, sent=True, latency_s=latency_s, ratelimit=ratelimit)
    success, code, message = _error_from_body(raw)
    if ok_status and success is not False:
        return Outcome(status=status, ok=True, sent=True, latency_s=latency_s, ratelimit=ratelimit)
    return Outcome(
        status=status,
        ok=False,
        sent=True,
        latency_s=latency_s,
        error_kind=ErrorKind.HTTP,
        cf_code=code,
        message=message or ("the API answered success: false" if ok_status else f"HTTP {status}"),
        retry_after=parse_retry_after(headers.get("Retry-After")) if status == 429 else None,
        ratelimit=ratelimit,
    )
