"""Transport: URLs, the mapping of answers and failures to outcomes, secrets kept out."""

from __future__ import annotations

import socket

from multidict import CIMultiDict

from dispatcher.clients.aiohttp_client import HttpTransport
from dispatcher.clients.base import TransportConfig, UrlBuilder, outcome_from_response
from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.model import ErrorKind, Event

SECRET = "tok-transport-c0ffee"


def event(instance_id: str = "i1", event_type: str = "evt", body: bytes | None = b"{}") -> Event:
    return Event(
        key="k",
        source="t",
        line=1,
        workflow="wf",
        instance_id=instance_id,
        event_type=event_type,
        body=body,
    )


def test_url_segments_are_percent_encoded_one_segment_each() -> None:
    url = UrlBuilder("https://api.example/client/v4/", "acc")
    assert url("wf", "a/b c", "ev?t#1") == (
        "https://api.example/client/v4/accounts/acc/workflows/wf/instances/"
        "a%2Fb%20c/events/ev%3Ft%231"
    )


def test_answers_map_to_outcomes() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    ok = outcome_from_response(200, b'{"success":true,"result":{}}', h, 0.01)
    assert ok.ok
    assert ok.status == 200
    refused = outcome_from_response(
        200, b'{"success":false,"errors":[{"code":1234,"message":"nope"}]}', h, 0.01
    )
    assert not refused.ok
    assert refused.cf_code == 1234
    assert refused.message == "nope"
    proxy = outcome_from_response(502, b"<html>Bad gateway</html>", h, 0.01)
    assert proxy.status == 502
    assert proxy.cf_code is None
    assert "Bad gateway" in str(proxy.message)
    limited = outcome_from_response(
        429,
        b'{"success":false,"errors":[{"code":971,"message":"slow down"}]}',
        CIMultiDict(
            {
                "Retry-After": "7",
                "Ratelimit": '"default";r=0;t=7',
                "Ratelimit-Policy": '"burst";q=1200;w=300',
            }
        ),
        0.01,
    )
    assert limited.retry_after == 7.0
    assert limited.ratelimit is not None
    assert (limited.ratelimit.remaining, limited.ratelimit.quota) == (0, 1200)


async def test_connect_failure_is_not_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on that port now.
    config = TransportConfig(
        base_url=f"http://127.0.0.1:{port}/client/v4",
        account_id="acc",
        auth_headers={"Authorization": f"Bearer {SECRET}"},
        timeout=2.0,
        connect_timeout=1.0,
    )
    async with HttpTransport(config) as tx:
        outcome = await tx.send(event())
    assert outcome.status is None
    assert outcome.error_kind is ErrorKind.CONNECT
    assert outcome.sent is False
    assert SECRET not in str(outcome.message)


async def test_sends_body_and_auth_and_never_shows_the_token() -> None:
    # Lenient ids: "a/b" arrives as one percent-encoded segment and must decode whole.
    cfg = EmulatorConfig(tokens=(SECRET,), limit=None, strict_ids=False)
    async with Emulator(cfg) as emu:
        config = TransportConfig(
            base_url=emu.base_url,
            account_id="acc",
            auth_headers={"Authorization": f"Bearer {SECRET}"},
        )
        async with HttpTransport(config) as tx:
            assert SECRET not in repr(tx)
            first = await tx.send(event("a/b", body=b'{"x":1}'))
            no_body = await tx.send(event("c", body=None))
        accepted = set(emu.log.accepted)
    assert first.ok
    assert no_body.ok
    assert ("wf", "a/b", "evt") in {k[:3] for k in accepted}
    assert ("wf", "c", "evt", None) in accepted


def test_a_body_decoded_by_the_http_library_is_not_decoded_twice() -> None:
    import gzip

    from multidict import CIMultiDict

    from dispatcher.clients.base import outcome_from_response

    body = b'{"success":true,"errors":[],"messages":[],"result":{}}'
    headers = CIMultiDict({"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert outcome_from_response(200, gzip.compress(body), headers, 0.01).ok
    # The relay's aiohttp session decompresses by itself: the header stays, the bytes are plain.
    assert outcome_from_response(200, body, headers, 0.01, decoded=True).ok
    assert not outcome_from_response(200, body, headers, 0.01).ok
