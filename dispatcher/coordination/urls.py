"""``--redis`` URLs: shown without their password, and checked before anything connects.

Pure text work, no redis-py: :mod:`dispatcher.run.settings` checks the URL with it, and
redis-py is an extra.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = ["REDIS_SCHEMES", "check_redis_url", "redact", "scrub"]

REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
MASK: Final = "***"
# Query parameters whose value is a secret (redis-py reads ?password=).
_SECRET_PARAMS: Final = frozenset({"password", "pass", "pwd", "auth", "token", "secret"})
_QUERY_SECRET = re.compile(r"(?i)(^|[?&;])((?:password|pass|pwd|auth|token|secret)=)[^&;#]*")


def redact(url: str) -> str:
    """``url`` without its password, for messages, status output and printed commands.

    Covers ``redis://:pw@h``, ``rediss://user:pw@h``, ``redis://pw@h`` (a lone user name
    may be a password written without its colon: masked too) and ``?password=pw``. Never
    raises, whatever the text: a URL too broken to parse is masked before its ``@``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY_SECRET.sub(rf"\1\2{MASK}", url)
    # The authority ends at the first "/", "?" or "#"; its user info at its last "@".
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        # redis://pw@host: a lone name may be the password, written without its colon.
        authority = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    tail = _QUERY_SECRET.sub(rf"\1\2{MASK}", tail)
    return f"{scheme}://{authority}{tail}"


def secrets_of(url: str) -> list[str]:
    """The password-like parts of ``url`` (user info and secret query values)."""
    found: list[str] = []
    _, sep, rest = url.partition("://")
    if not sep:
        return found
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        found += [password] if colon else [user]
    query = urlsplit(url).query if "?" in url else ""
    for name, value in parse_qsl(query, keep_blank_values=False):
        if name.lower() in _SECRET_PARAMS:
            found.append(value)
    return [s for s in found if s]


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) with every secret of ``url`` cut out, whatever form."""
    for secret in secrets_of(url):
        for form in {secret, unquote(secret), quote(secret, safe="")}:
            if form:
                text = text.replace(form, MASK)
    return text


def check_redis_url(url: str) -> str | None:
    """What is wrong with ``url`` as a ``--redis`` URL, or ``None``; the text never quotes
    the password (callers show ``redact(url)`` beside it)."""
    if not url.startswith(REDIS_SCHEMES):
        return "must be a redis://, rediss:// or unix:// URL"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL (expected redis://host:port/db)"
    try:
        port = parts.port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme == "unix":
        if not parts.path:
            return "a unix:// URL needs the socket's path (unix:///run/redis.sock)"
    else:
        if not parts.hostname:
            return "no host (expected redis://host:port/db)"
        if port is not None and not 1 <= port <= 65535:
            return "the port must be a number from 1 to 65535"
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return f"the database must be a number (/0, /1...), got /{path}"
    db = query.get("db")
    if db is not None and not db.isdigit():
        return "?db= must be a number"
    if parts.fragment:
        return "no #fragment allowed"
    return None
