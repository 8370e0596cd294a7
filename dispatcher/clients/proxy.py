"""Which proxy a run goes through, from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``.

Both clients ask :func:`proxy_for` once per run. The rules are curl's and requests':

- an ``https://`` base URL uses ``https_proxy`` (or ``HTTPS_PROXY``), else ``all_proxy``
  (``ALL_PROXY``); the lower-case name wins when both are set;
- ``no_proxy`` (``NO_PROXY``) lists hosts, domain suffixes (``.example.com`` or
  ``example.com``), ``host:port`` or ``*`` that go direct (the stdlib's
  :func:`urllib.request.proxy_bypass_environment` decides);
- only ``http://`` proxies are supported (a bare ``host:port`` means that); the request
  goes through a ``CONNECT`` tunnel and TLS runs end to end inside it, so the proxy sees
  the host name and ciphertext, never the token;
- ``http_proxy`` / ``HTTP_PROXY`` would apply to ``http://`` base URLs, which settings
  allow only for loopback hosts (an emulator, ``wrangler dev``). Those are never proxied:
  a plain-http request through a proxy hands it the token in clear text.

The tunnel itself is opened by ``python-socks`` (HTTP CONNECT, asyncio) for the lean
client; aiohttp opens its own from the ``proxy=`` URL.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from dispatcher.model import UserError

__all__ = ["ProxyError", "ProxyRoute", "open_tunnel", "proxy_for"]


class ProxyError(UserError):
    """A proxy variable that cannot be used; names the variable, never its credentials."""


@dataclass(frozen=True, slots=True, repr=False)
class ProxyRoute:
    """An ``http://`` proxy to tunnel through. ``url`` may hold ``user:password@``."""

    url: str
    host: str
    port: int
    variable: str  # the environment variable it came from, for messages

    def __repr__(self) -> str:
        # The URL may hold a password: only where the proxy is.
        return f"ProxyRoute(http://{self.host}:{self.port} from {self.variable})"

    __str__ = __repr__


def _lookup(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for variable in (name.lower(), name.upper()):
        value = env.get(variable, "").strip()
        if value:
            return variable, value
    return None


def proxy_for(base_url: str, env: Mapping[str, str] | None = None) -> ProxyRoute | None:
    """The proxy for requests to ``base_url`` per the environment, or ``None`` (direct).

    Raises :class:`ProxyError` for a proxy URL that is not ``http://host[:port]``.
    """
    env = os.environ if env is None else env
    parts = urlsplit(base_url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        return None  # plain http is loopback only and never proxied: see the docstring
    found = _lookup(env, "https_proxy") or _lookup(env, "all_proxy")
    if found is None:
        return None
    variable, value = found
    no_proxy = _lookup(env, "no_proxy")
    if no_proxy is not None:
        target = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if bypass(target, {"no": no_proxy[1]}):
            return None
    if "://" not in value:
        value = f"http://{value}"
    try:
        proxy = urlsplit(value)
        port = proxy.port
    except ValueError:
        raise ProxyError(f"{variable}: not a valid proxy URL") from None
    if proxy.scheme.lower() != "http" or not proxy.hostname:
        raise ProxyError(
            f"{variable}: only http://host:port proxies are supported (got a {proxy.scheme}:// URL)"
        )
    return ProxyRoute(url=value, host=proxy.hostname, port=port or 80, variable=variable)


async def open_tunnel(route: ProxyRoute, host: str, port: int) -> socket.socket:
    """A connected socket through ``route``'s CONNECT tunnel to ``host:port``.

    The caller bounds the time (its connect timeout) and wraps the socket in TLS
    (``loop.create_connection(sock=..., ssl=...)``). Every failure is an :class:`OSError`
    or :class:`TimeoutError`: to the client, a proxy that refuses is a connection that
    could not be made, and nothing was sent.
    """
    # Imported here: only runs behind a proxy need it.
    from python_socks import ProxyError as SocksProxyError
    from python_socks import ProxyTimeoutError, ProxyType
    from python_socks.async_.asyncio import Proxy

    parts = urlsplit(route.url)
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    tunnel = Proxy(ProxyType.HTTP, route.host, route.port, user, password)
    try:
        return await tunnel.connect(dest_host=host, dest_port=port)
    except ProxyTimeoutError as exc:
        raise TimeoutError(f"proxy {route.host}:{route.port}: timed out") from exc
    except SocksProxyError as exc:
        # e.g. "407 Proxy Authentication Required", "403 Forbidden".
        raise ConnectionRefusedError(f"proxy {route.host}:{route.port} refused: {exc}") from exc
