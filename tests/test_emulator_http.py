"""The emulator as a client sees it over HTTP on 127.0.0.1 (aiohttp client)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from dispatcher.emulator import Emulator, EmulatorConfig, Faults, Limit
from dispatcher.inputs.validation import MAX_BODY_BYTES

TOKEN = "emulator-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENT_PATH = "/accounts/acc/workflows/wf/instances/{instance}/events/{event_type}"


def event_url(emu: Emulator, instance: str = "i-1", event_type: str = "approved") -> str:
    return emu.base_url + EVENT_PATH.format(instance=instance, event_type=event_type)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    json: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    if json is not None:
        data = orjson.dumps(json)  # compact, so tests can hash exactly what was sent
    async with session.post(
        URL(url, encoded=True), headers=AUTH if headers is None else headers, data=data
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def envelope_error(body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    assert doc["success"] is False
    assert doc["result"] is None
    assert doc["messages"] == []
    assert len(doc["errors"]) == 1
    error: dict[str, Any] = doc["errors"][0]
    return error


# -- success ---------------------------------------------------------------------------


async def test_success_envelope_and_log(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    before = time.monotonic()
    status, headers, body = await post(session, event_url(emulator), json={"amount": 3})
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    doc = orjson.loads(body)
    assert doc["success"] is True
    assert doc["errors"] == []
    assert doc["messages"] == []
    assert doc["result"]["instanceId"] == "i-1"
    assert doc["result"]["timestamp"].endswith("Z")

    sha = hashlib.sha256(orjson.dumps({"amount": 3})).hexdigest()
    key = ("wf", "i-1", "approved", sha)
    assert list(emulator.log.accepted) == [key]
    (entry,) = emulator.log.requests
    assert entry.status == 200
    assert (entry.workflow, entry.instance_id, entry.event_type, entry.body_sha256) == key
    assert before <= entry.t <= emulator.log.accepted[key][0] <= time.monotonic()
    assert emulator.log.status_counts == {200: 1}


async def test_no_body_is_logged_without_a_hash(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    assert (await post(session, event_url(emulator)))[0] == 200
    assert (await post(session, event_url(emulator), data=b""))[0] == 200
    key = ("wf", "i-1", "approved", None)
    assert list(emulator.log.accepted) == [key]
    assert len(emulator.log.accepted[key]) == 2
    assert emulator.log.duplicates() == {key: 2}
    assert emulator.log.total_accepted() == 2


async def test_path_segments_are_percent_decoded(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    status, _, body = await post(session, event_url(emulator, "i%2D%31", "order%20paid%2Fok"))
    assert status == 200, body
    assert orjson.loads(body)["result"]["instanceId"] == "i-1"
    assert ("wf", "i-1", "order paid/ok", None) in emulator.log.accepted


@pytest.mark.parametrize("emulator", [EmulatorConfig(limit=None, strict_ids=False)], indirect=True)
async def test_lenient_ids_let_system_ids_through(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    assert (await post(session, event_url(emulator, "cron%3A2024-01-01T00%3A00")))[0] == 200
    assert (await post(session, event_url(emulator, "x" * 101)))[0] == 400


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url_path", "rule"),
    [
        ("/accounts/a/workflows/" + "w" * 65 + "/instances/i/events/e", "workflow must be 1..64"),
        ("/accounts/a/workflows/-wf/instances/i/events/e", "workflow '-wf' must match"),
        (
            "/accounts/a/workflows/wf/instances/" + "i" * 101 + "/events/e",
            "instance_id must be 1..100",
        ),
        ("/accounts/a/workflows/wf/instances/a%2Fb/events/e", "instance_id 'a/b' must match"),
        ("/accounts/a/workflows/wf/instances/i/events/" + "e" * 101, "event_type must be 1..100"),
        ("/accounts/a/workflows/wf/instances/%FF/events/e", "percent-encoded UTF-8"),
    ],
)
async def test_path_rules_answer_400(
    emulator: Emulator, session: aiohttp.ClientSession, url_path: str, rule: str
) -> None:
    status, headers, body = await post(session, emulator.base_url + url_path)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    error = envelope_error(body)
    assert error["code"] == 7003
    assert rule in error["message"]
    assert emulator.log.accepted == {}


async def test_body_must_be_json(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    status, _, body = await post(session, event_url(emulator), data=b"{not json")
    assert status == 400
    assert envelope_error(body)["code"] == 6007
    assert emulator.log.accepted == {}


async def test_body_of_exactly_one_mib_passes(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    body = b'"' + b"a" * (MAX_BODY_BYTES - 2) + b'"'
    assert len(body) == MAX_BODY_BYTES
    status, _, _ = await post(session, event_url(emulator), data=body)
    assert status == 200


async def test_body_over_one_mib_answers_413(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    body = b'"' + b"a" * MAX_BODY_BYTES + b'"'
    status, _, answer = await post(session, event_url(emulator), data=body)
    assert status == 413
    error = envelope_error(answer)
    assert "over the API's limit" in error["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the size shows while reading
        for _ in range(5):
            yield b" " * (300 * 1024)

    async with session.post(event_url(emulator), headers=AUTH, data=chunks()) as resp:
        assert resp.status == 413
        assert envelope_error(await resp.read())["code"] == 10413
    assert emulator.log.accepted == {}


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, known_instances=frozenset({"known-1"}))], indirect=True
)
async def test_known_instances(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    assert (await post(session, event_url(emulator, "known-1")))[0] == 200
    status, _, body = await post(session, event_url(emulator, "stranger"))
    assert status == 404
    assert envelope_error(body)["code"] == 10400
    assert [e.code for e in emulator.log.requests] == [None, 10400]


async def test_unknown_routes_and_methods(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    for path in ("/accounts/acc/workflows/wf", "/user/tokens/verify", "/nope"):
        status, headers, body = await post(session, emulator.base_url + path)
        assert status == 404
        assert headers["Content-Type"] == "application/json"
        assert envelope_error(body)["code"] == 7000
    async with session.get(emulator.root_url + "/") as resp:
        assert resp.status == 404
    async with session.get(event_url(emulator), headers=AUTH) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert envelope_error(await resp.read())["code"] == 7001
    async with session.delete(event_url(emulator), headers=AUTH) as resp:
        assert resp.status == 405
    assert emulator.log.accepted == {}


# -- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "emulator",
    [
        EmulatorConfig(
            tokens=(TOKEN,), legacy_keys=(("ops@example.com", "legacy-key-42"),), limit=None
        )
    ],
    indirect=True,
)
@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (AUTH, 200, None),
        ({"X-Auth-Email": "ops@example.com", "X-Auth-Key": "legacy-key-42"}, 200, None),
        ({}, 400, 9106),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 400, 6003),
        ({"Authorization": "Bearer "}, 400, 6003),
        ({"Authorization": "Bearer wrong-token"}, 401, 10000),
        ({"X-Auth-Email": "ops@example.com"}, 400, 6003),
        ({"X-Auth-Key": "legacy-key-42"}, 400, 6003),
        ({"X-Auth-Email": "ops@example.com", "X-Auth-Key": "wrong-key"}, 403, 9103),
    ],
)
async def test_authentication(
    emulator: Emulator,
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    status: int,
    code: int | None,
) -> None:
    got, _, body = await post(session, event_url(emulator), headers=headers, json={"k": 1})
    assert got == status
    if code is None:
        assert orjson.loads(body)["success"] is True
    else:
        assert envelope_error(body)["code"] == code
        assert emulator.log.accepted == {}


async def test_without_configured_credentials_any_non_empty_one_passes(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    assert (await post(session, event_url(emulator), headers={"Authorization": "Bearer x"}))[
        0
    ] == 200
    pair = {"X-Auth-Email": "e", "X-Auth-Key": "k"}
    assert (await post(session, event_url(emulator), headers=pair))[0] == 200
    assert (await post(session, event_url(emulator), headers={"Authorization": "Bearer"}))[0] == 400
    assert (await post(session, event_url(emulator), headers={}))[0] == 400


@pytest.mark.parametrize(
    "emulator",
    [EmulatorConfig(tokens=(TOKEN,), legacy_keys=(("ops@example.com", "legacy-key-42"),))],
    indirect=True,
)
async def test_credentials_are_never_echoed_or_logged(
    emulator: Emulator, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [TOKEN, "wrong-secret-token", "legacy-key-42", "wrong-secret-key"]
    attempts = [
        AUTH,
        {"Authorization": "Bearer wrong-secret-token"},
        {"Authorization": "Token wrong-secret-token"},
        {"X-Auth-Email": "ops@example.com", "X-Auth-Key": "legacy-key-42"},
        {"X-Auth-Email": "ops@example.com", "X-Auth-Key": "wrong-secret-key"},
        {"X-Auth-Key": "wrong-secret-key"},
    ]
    seen: list[str] = []
    for headers in attempts:
        for url in (event_url(emulator), emulator.base_url + "/nope"):
            _, answer_headers, body = await post(session, url, headers=headers)
            seen.append(body.decode())
            seen.append(repr(answer_headers))
    async with session.get(emulator.stats_url) as resp:
        seen.append(await resp.text())
    seen += [
        repr(emulator.log.requests),
        repr(emulator.log.accepted),
        repr(emulator.log.snapshot()),
    ]
    seen += [caplog.text, repr(emulator.config.faults)]
    everything = "\n".join(seen)
    for secret in secrets:
        assert secret not in everything


# -- rate limiting ---------------------------------------------------------------------


def ratelimit(headers: dict[str, str]) -> tuple[int, int]:
    parts = dict(p.split("=") for p in headers["Ratelimit"].split(";")[1:])
    assert headers["Ratelimit"].startswith('"default";')
    return int(parts["r"]), int(parts["t"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_budget_then_lockout_then_back(session: aiohttp.ClientSession) -> None:
    # On a fake clock: on the real one a loaded machine could take longer than the 0.3 s
    # lockout between the 429 and the requests that must still be refused by it.
    clock = FakeClock()
    config = EmulatorConfig(limit=Limit.parse("5/2s"), lockout=0.3)
    async with Emulator(config, clock=clock) as emulator:
        url = event_url(emulator)
        answers = []
        for _ in range(5):
            answers.append(await post(session, url))
            clock.now += 0.1
        assert [status for status, _, _ in answers] == [200] * 5
        assert [ratelimit(h)[0] for _, h, _ in answers] == [4, 3, 2, 1, 0]
        assert all(h["Ratelimit-Policy"] == '"burst";q=5;w=2' for _, h, _ in answers)
        assert all("Retry-After" not in h for _, h, _ in answers)

        status, headers, body = await post(session, url)
        assert status == 429
        assert headers["Retry-After"] == "1"  # 0.3 s rounded up to whole seconds
        assert ratelimit(headers) == (0, 1)
        assert envelope_error(body)["code"] == 971
        # Every request of that credential is refused during the lockout, whatever the route.
        clock.now += 0.29
        assert (await post(session, emulator.base_url + "/nope"))[0] == 429
        # Another credential has its own budget.
        other = {"Authorization": "Bearer someone-else"}
        assert (await post(session, url, headers=other))[0] == 200

        clock.now += 0.02  # the lockout is over, 0.81 s into the 2 s window
        status, headers, _ = await post(session, url)
        assert status == 200
        assert ratelimit(headers)[0] == 4  # a fresh window
        assert emulator.log.status_counts == {200: 7, 429: 2}
        assert emulator.log.total_accepted() == 7


async def test_lockout_longer_than_the_window_on_a_fake_clock(
    session: aiohttp.ClientSession,
) -> None:
    clock = FakeClock()
    config = EmulatorConfig(limit=Limit.parse("2/10s"), lockout=30.0)
    async with Emulator(config, clock=clock) as emu:
        url = event_url(emu)
        assert [(await post(session, url))[0] for _ in range(2)] == [200, 200]
        clock.now += 1.0
        status, headers, _ = await post(session, url)
        assert status == 429
        assert headers["Retry-After"] == "30"
        clock.now += 15.0  # the window is over, the lockout is not
        status, headers, _ = await post(session, url)
        assert status == 429
        assert headers["Retry-After"] == "15"
        assert ratelimit(headers) == (0, 15)
        clock.now += 14.5
        assert (await post(session, url))[1]["Retry-After"] == "1"  # 0.5 s, rounded up
        clock.now += 0.5
        status, headers, _ = await post(session, url)
        assert status == 200
        assert ratelimit(headers) == (1, 10)
        # The log reads the same clock.
        assert [e.t for e in emu.log.requests] == [1000.0, 1000.0, 1001.0, 1016.0, 1030.5, 1031.0]


@pytest.mark.parametrize(
    "emulator",
    [EmulatorConfig(limit=Limit.parse("100/5m"), faults=Faults(http_500=1.0, first=1))],
    indirect=True,
)
async def test_rate_headers_are_on_every_response(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    answers = [
        await post(session, event_url(emulator)),  # injected 500
        await post(session, event_url(emulator)),  # 200
        await post(session, event_url(emulator, "-bad")),  # 400
        await post(session, emulator.base_url + "/nope"),  # 404
        await post(session, event_url(emulator), headers={"Authorization": "Basic x"}),  # 400
        await post(session, event_url(emulator), headers={}),  # 400
    ]
    assert [status for status, _, _ in answers] == [500, 200, 400, 404, 400, 400]
    for _, headers, _ in answers:
        assert headers["Ratelimit-Policy"] == '"burst";q=100;w=300'
        remaining, reset = ratelimit(headers)
        assert 0 < remaining < 100
        assert 0 < reset <= 300
    # Unauthenticated requests are counted on the client address, not the credential's budget.
    assert ratelimit(answers[3][1])[0] == 96
    assert ratelimit(answers[5][1])[0] == 98


async def test_no_rate_headers_when_the_limit_is_off(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    _, headers, _ = await post(session, event_url(emulator))
    assert "Ratelimit" not in headers
    assert "Ratelimit-Policy" not in headers


# -- injected faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, faults=Faults(http_500=1.0))], indirect=True
)
async def test_fault_500(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    status, headers, body = await post(session, event_url(emulator), json={"a": 1})
    assert status == 500
    assert headers["Content-Type"] == "application/json"
    assert envelope_error(body)["code"] == 10001
    assert emulator.log.accepted == {}
    assert emulator.log.snapshot()["faults"] == {"500": 1}


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, faults=Faults(http_503=1.0))], indirect=True
)
async def test_fault_503(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    status, _, body = await post(session, event_url(emulator))
    assert status == 503
    assert envelope_error(body)["code"] == 10001
    assert emulator.log.accepted == {}


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, faults=Faults(http_502=1.0))], indirect=True
)
async def test_fault_502_is_html_without_envelope(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    status, headers, body = await post(session, event_url(emulator))
    assert status == 502
    assert headers["Content-Type"].startswith("text/html")
    assert body.startswith(b"<html>")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    assert emulator.log.accepted == {}


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, faults=Faults(drop=1.0))], indirect=True
)
async def test_fault_drop_closes_without_an_answer(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, event_url(emulator), json={"a": 1})
    assert emulator.log.accepted == {}
    assert emulator.log.status_counts == {"dropped": 1}
    (entry,) = emulator.log.requests
    assert entry.status is None
    assert entry.body_sha256 == hashlib.sha256(b'{"a":1}').hexdigest()
    assert emulator.log.snapshot()["dropped"] == 1


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, faults=Faults(latency=(0.08, 0.08)))], indirect=True
)
async def test_fixed_latency(emulator: Emulator, session: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    assert (await post(session, event_url(emulator)))[0] == 200
    assert time.monotonic() - started >= 0.08


@pytest.mark.parametrize(
    "emulator",
    [EmulatorConfig(limit=None, faults=Faults(http_500=0.5, http_503=0.5, first=2))],
    indirect=True,
)
async def test_faults_first_k_attempts_then_success(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    for k in range(5):
        statuses = [
            (await post(session, event_url(emulator, f"i{k}"), json=k))[0] for _ in range(3)
        ]
        assert statuses[0] in {500, 503}
        assert statuses[1] in {500, 503}
        assert statuses[2] == 200
    assert emulator.log.total_accepted() == 5
    assert not emulator.log.duplicates()


async def _statuses_for(config: EmulatorConfig, instances: list[str]) -> dict[str, int | None]:
    async with Emulator(config) as emu, aiohttp.ClientSession() as session:

        async def one(instance: str) -> tuple[str, int | None]:
            try:
                return instance, (await post(session, event_url(emu, instance), json=1))[0]
            except aiohttp.ServerDisconnectedError:
                return instance, None

        return dict(await asyncio.gather(*(one(i) for i in instances)))


async def test_faults_are_reproducible_from_the_seed() -> None:
    faults = Faults(http_500=0.2, http_502=0.1, http_503=0.1, drop=0.1)
    instances = [f"i{k}" for k in range(40)]
    first = await _statuses_for(EmulatorConfig(limit=None, faults=faults, seed=11), instances)
    # Concurrent and in the opposite order: the same attempts get the same faults.
    again = await _statuses_for(EmulatorConfig(limit=None, faults=faults, seed=11), instances[::-1])
    other = await _statuses_for(EmulatorConfig(limit=None, faults=faults, seed=12), instances)
    assert first == again
    assert first != other
    assert {200, None} <= set(first.values())


# -- stats -----------------------------------------------------------------------------


async def test_stats_endpoint_serves_the_snapshot_without_auth(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    await post(session, event_url(emulator), json=1)
    await post(session, event_url(emulator), json=1)
    await post(session, event_url(emulator), headers={})
    async with session.get(emulator.stats_url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        stats = orjson.loads(await resp.read())
    assert stats == {**emulator.log.snapshot(), "uptime_s": stats["uptime_s"]}
    assert stats["requests"] == 3
    assert stats["status_counts"] == {"200": 2, "400": 1}
    assert stats["accepted"] == {
        "total": 2,
        "unique": 1,
        "duplicate_events": 1,
        "duplicate_deliveries": 1,
    }
    # Reading the stats is not API traffic: not logged, not rate-limited.
    assert emulator.log.total_requests() == 3
    async with session.post(emulator.stats_url) as resp:
        assert resp.status == 405


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(limit=None, keep_requests=False)], indirect=True
)
async def test_per_request_list_can_be_off(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    await post(session, event_url(emulator))
    assert emulator.log.requests == []
    assert emulator.log.status_counts == {200: 1}
    assert emulator.log.total_accepted() == 1


async def test_lifecycle() -> None:
    emu = Emulator(EmulatorConfig(limit=None))
    with pytest.raises(RuntimeError, match="not started"):
        _ = emu.base_url
    await emu.start()
    try:
        assert emu.base_url == f"http://127.0.0.1:{emu.port}/client/v4"
        assert emu.port > 0
        with pytest.raises(RuntimeError, match="already started"):
            await emu.start()
    finally:
        await emu.close()
    await emu.close()  # closing twice is harmless
