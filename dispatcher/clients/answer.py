"""One answer of a GET or POST that the instance commands make: status, envelope, Retry-After.

``verify``'s reads, ``create``'s batches and read-backs, and the listing of
``send --instances-of`` all read an answer the same way before their own retry policy
looks at it: the whole body, taken as an envelope only when it is a JSON object, and the
``Retry-After`` header as seconds (delta-seconds or an HTTP date).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from dispatcher.clients.headers import parse_retry_after

__all__ = ["Answer", "read_answer"]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    doc: dict[str, Any] | None  # the envelope: the body when it is a JSON object
    retry_after: float | None  # seconds, from the Retry-After header


async def read_answer(resp: aiohttp.ClientResponse) -> Answer:
    """Read ``resp`` whole (a cut body raises the client's own error, as before)."""
    raw = await resp.read()
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    return Answer(
        status=resp.status,
        doc=parsed if isinstance(parsed, dict) else None,
        retry_after=parse_retry_after(resp.headers.get("Retry-After")),
    )
