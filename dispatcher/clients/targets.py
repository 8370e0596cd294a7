"""Where events go: the Cloudflare API, a local ``wrangler dev``, or a relay Worker.

A target decides the URL layout, the auth, whether events are batched and the default
rate; everything above the transport (engine, gate, retries, envelopes, resume, reports)
is the same for all three and never asks which one it talks to.

=================  ===========================================================  ===========
target             URL                                                          auth
=================  ===========================================================  ===========
``api``            ``{base}/accounts/{account}/workflows/{wf}/instances/{id}/     API token
                   events/{type}``, one request per event
``wrangler-dev``   ``{base}/cdn-cgi/local/explorer/api/workflows/{wf}/instances/  none
                   {id}/events/{type}``, one request per event
``relay``          ``{base}/events``, batches of ``{key, instance_id, type,       relay secret
                   payload}`` (``relay/`` holds the Worker)
=================  ===========================================================  ===========
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from dispatcher.clients.base import Transport, TransportConfig, UrlBuilder
from dispatcher.clients.fast import FastTransport

__all__ = [
    "DEFAULT_RELAY_BATCH",
    "DEFAULT_RELAY_LINGER",
    "MAX_RELAY_BATCH",
    "RELAY_SECRET_ENV",
    "TARGETS",
    "WRANGLER_DEV_API_PATH",
    "WRANGLER_DEV_BASE_URL",
    "Target",
    "TargetSpec",
    "build_transport",
    "event_url",
    "spec_of",
]

Target: TypeAlias = Literal["api", "wrangler-dev", "relay"]
TARGETS: Final = ("api", "wrangler-dev", "relay")

WRANGLER_DEV_BASE_URL: Final = "http://127.0.0.1:8787"
# wrangler (>= 4.79) serves the API's event route under this path, without /accounts/{id}.
WRANGLER_DEV_API_PATH: Final = "/cdn-cgi/local/explorer/api"
RELAY_SECRET_ENV: Final = "DISPATCHER_RELAY_SECRET"
# The relay's own default and upper bound per POST /events (relay/src/index.ts MAX_BATCH).
DEFAULT_RELAY_BATCH: Final = 100
MAX_RELAY_BATCH: Final = 1000
# How long a part-filled batch waits for more events: short against a request's latency,
# long enough for a pool of workers woken together to fill it.
DEFAULT_RELAY_LINGER: Final = 0.005


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetSpec:
    """What a target needs and what it defaults to."""

    name: Target
    default_base_url: str | None  # None: the user must give --base-url
    needs_credentials: bool  # a Cloudflare API token
    needs_account_id: bool
    needs_relay_secret: bool
    # (count, per seconds); None: no rate gate by default (the REST quota does not apply)
    default_rate: tuple[float, float] | None
    default_concurrency: int | None  # None: the run's own default
    batched: bool
    auth_hint: str  # what to check when the target answers 401/403


_SPECS: Final[Mapping[str, TargetSpec]] = {
    "api": TargetSpec(
        name="api",
        default_base_url=None,  # the run's DEFAULT_BASE_URL
        needs_credentials=True,
        needs_account_id=True,
        needs_relay_secret=False,
        default_rate=(1200.0, 300.0),
        default_concurrency=None,
        batched=False,
        auth_hint="check the token and that it has the Workers Scripts Write permission",
    ),
    "wrangler-dev": TargetSpec(
        name="wrangler-dev",
        default_base_url=WRANGLER_DEV_BASE_URL,
        needs_credentials=False,
        needs_account_id=False,
        needs_relay_secret=False,
        default_rate=None,
        # One local workerd spends ~25-35 ms CPU per event (BENCHMARKS.md, Targets): a few
        # requests in flight keep it busy, more only queue there.
        default_concurrency=16,
        batched=False,
        auth_hint="wrangler dev asks for no credentials: is --base-url a wrangler dev?",
    ),
    "relay": TargetSpec(
        name="relay",
        default_base_url=None,
        needs_credentials=False,
        needs_account_id=False,
        needs_relay_secret=True,
        default_rate=None,
        # Two full batches in flight: one being answered while the next one fills.
        default_concurrency=2 * DEFAULT_RELAY_BATCH,
        batched=True,
        auth_hint=f"check that {RELAY_SECRET_ENV} (or --relay-secret-file) holds the relay "
        "Worker's RELAY_SECRET",
    ),
}


def spec_of(target: str) -> TargetSpec:
    """The spec of ``target``; :class:`KeyError` for a name not in :data:`TARGETS`."""
    return _SPECS[target]


def _url_parts(target: Target, base_url: str, account_id: str | None) -> tuple[str, str | None]:
    if target == "wrangler-dev":
        return f"{base_url.rstrip('/')}{WRANGLER_DEV_API_PATH}", None
    return base_url, account_id


def event_url(target: Target, base_url: str, account_id: str | None) -> UrlBuilder:
    """The per-event URL builder of a one-request-per-event target (dry runs show it)."""
    return UrlBuilder(*_url_parts(target, base_url, account_id))


def build_transport(
    target: Target,
    *,
    base_url: str,
    account_id: str | None,
    auth_headers: Mapping[str, str],
    timeout: float,
    connect_timeout: float,
    pool_size: int,
    http_client: Literal["fast", "aiohttp"] = "fast",
    relay_secret: str | None = None,
    batch_size: int = DEFAULT_RELAY_BATCH,
    linger: float = DEFAULT_RELAY_LINGER,
) -> Transport:
    """The run's transport for ``target``; the engine sees only :class:`Transport`."""
    if target == "relay":
        if relay_secret is None:
            raise ValueError("the relay target needs a relay secret")
        # Imported only when chosen: the relay client is aiohttp's, ~0.2 s of start-up.
        from dispatcher.clients.relay import RelayConfig, RelayTransport

        return RelayTransport(
            RelayConfig(
                base_url=base_url,
                secret=relay_secret,
                batch_size=batch_size,
                linger=linger,
                timeout=timeout,
                connect_timeout=connect_timeout,
                # Each connection carries one batch at a time.
                pool_size=max(1, -(-pool_size // batch_size) + 1),
            )
        )
    url_base, account = _url_parts(target, base_url, account_id)
    config = TransportConfig(
        base_url=url_base,
        account_id=account,
        auth_headers=dict(auth_headers) if target == "api" else {},
        timeout=timeout,
        connect_timeout=connect_timeout,
        pool_size=pool_size,
    )
    if http_client == "aiohttp":
        # Imported only when chosen: aiohttp costs a send's start-up about 0.2 s otherwise.
        from dispatcher.clients.aiohttp_client import HttpTransport

        return HttpTransport(config)
    return FastTransport(config)
