"""Credential checks as the real API makes them, without ever keeping a credential around.

A passing credential is reduced to an opaque identity (a label or a hash) that keys its
rate-limit budget; the raw token or key never leaves this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256
from typing import Final

from dispatcher.emulator import envelope
from dispatcher.emulator.envelope import ApiError

_SEEN_MAX: Final = 1024


def _fingerprint(kind: str, secret: str) -> str:
    return f"{kind}:{sha256(secret.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


class Authenticator:
    """``check(headers)`` -> ``(identity, None)`` or ``(None, error to answer)``.

    An ``Authorization`` header wins over the legacy pair when both are sent.
    """

    __slots__ = ("_keys", "_seen", "_tokens")

    def __init__(self, tokens: tuple[str, ...], legacy_keys: tuple[tuple[str, str], ...]) -> None:
        # With nothing configured any non-empty credential passes (None = "no list").
        self._tokens: dict[str, str] | None = (
            {token: _fingerprint("token", token) for token in tokens} if tokens else None
        )
        self._keys: dict[tuple[str, str], str] | None = (
            {pair: _fingerprint("key", "\0".join(pair)) for pair in legacy_keys}
            if legacy_keys
            else None
        )
        # Open mode: a client sends the same token all run long, so hash it once.
        self._seen: dict[str, str] = {}

    def check(self, headers: Mapping[str, str]) -> tuple[str | None, ApiError | None]:
        authorization = headers.get("Authorization")
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None, envelope.BAD_AUTHORIZATION
            if self._tokens is None:
                identity = self._seen.get(token)
                if identity is None:
                    if len(self._seen) >= _SEEN_MAX:
                        self._seen.clear()
                    identity = self._seen[token] = _fingerprint("token", token)
                return identity, None
            identity = self._tokens.get(token)
            return (identity, None) if identity is not None else (None, envelope.UNKNOWN_TOKEN)
        email = headers.get("X-Auth-Email")
        key = headers.get("X-Auth-Key")
        if email is None and key is None:
            return None, envelope.MISSING_AUTH
        email = (email or "").strip()
        key = (key or "").strip()
        if not email:
            return None, envelope.BAD_AUTH_EMAIL
        if not key:
            return None, envelope.BAD_AUTH_KEY
        if self._keys is None:
            return _fingerprint("key", f"{email}\0{key}"), None
        identity = self._keys.get((email, key))
        return (identity, None) if identity is not None else (None, envelope.UNKNOWN_KEY)
