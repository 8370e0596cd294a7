"""The Cloudflare v4 response envelope and the emulator's fixed answers, encoded once.

Codes marked "observed" are what api.cloudflare.com is seen answering (public issue
threads, SDK docs); the others are the emulator's choice where Cloudflare publishes none.
"""

from __future__ import annotations

import time
from typing import Final, NamedTuple

import orjson

JSON_TYPE: Final = "application/json"
HTML_TYPE: Final = "text/html"


class ApiError(NamedTuple):
    """An error answer ready to send: status, Cloudflare code, encoded envelope."""

    status: int
    code: int
    body: bytes


def error_body(code: int, message: str, chain: tuple[tuple[int, str], ...] = ()) -> bytes:
    error: dict[str, object] = {"code": code, "message": message}
    if chain:
        error["error_chain"] = [{"code": c, "message": m} for c, m in chain]
    return orjson.dumps({"success": False, "errors": [error], "messages": [], "result": None})


def api_error(
    status: int, code: int, message: str, chain: tuple[tuple[int, str], ...] = ()
) -> ApiError:
    return ApiError(status, code, error_body(code, message, chain))


# Authentication (observed).
MISSING_AUTH: Final = api_error(
    400, 9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers"
)
_BAD_HEADERS = "Invalid request headers"
BAD_AUTHORIZATION: Final = api_error(
    400, 6003, _BAD_HEADERS, ((6111, "Invalid format for Authorization header"),)
)
BAD_AUTH_EMAIL: Final = api_error(
    400, 6003, _BAD_HEADERS, ((6102, "Invalid format for X-Auth-Email header"),)
)
BAD_AUTH_KEY: Final = api_error(
    400, 6003, _BAD_HEADERS, ((6103, "Invalid format for X-Auth-Key header"),)
)
UNKNOWN_TOKEN: Final = api_error(401, 10000, "Authentication error")
UNKNOWN_KEY: Final = api_error(403, 9103, "Unknown X-Auth-Key or X-Auth-Email")

# Routing (7000/7003 observed; 7001 the emulator's choice).
NO_ROUTE: Final = api_error(404, 7000, "No route for that URI")
METHOD_NOT_ALLOWED: Final = api_error(405, 7001, "Method not allowed for this route")
BAD_PATH_CODE: Final = 7003

# Rate limiting (observed).
RATE_LIMITED: Final = api_error(429, 971, "Please wait and consider throttling your request speed")

# The event itself (10001 and 10400 as Cloudflare's API reference lists them; 6007
# observed; 10413 chosen).
INSTANCE_NOT_FOUND: Final = api_error(404, 10400, "Instance not found")
MALFORMED_JSON: Final = api_error(400, 6007, "Malformed JSON in request body")
BODY_TOO_LARGE_CODE: Final = 10413

# Injected faults.
INTERNAL_ERROR: Final = api_error(500, 10001, "Internal server error")
UNAVAILABLE: Final = api_error(503, 10001, "Service temporarily unavailable, try again")
BAD_GATEWAY_HTML: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

_SUCCESS_HEAD: Final = b'{"success":true,"errors":[],"messages":[],"result":{"instanceId":'
_SUCCESS_TAIL: Final = b"}}"


class Timestamps:
    """ISO 8601 UTC timestamps with milliseconds; formats the seconds part once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        wall = time.time()
        second = int(wall)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((wall - second) * 1000):03d}Z"


def success_body(instance_id: str, timestamp: str) -> bytes:
    """``result`` shaped as the SDK's ``EventCreateResponse`` parses it."""
    return b"".join(
        (
            _SUCCESS_HEAD,
            orjson.dumps(instance_id),
            b',"timestamp":"',
            timestamp.encode(),
            b'"',
            _SUCCESS_TAIL,
        )
    )
