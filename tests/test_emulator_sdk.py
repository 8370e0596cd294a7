"""The official `cloudflare` SDK against the emulator: proof that it speaks the real dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime

import cloudflare
import httpx
import pytest
from cloudflare import AsyncCloudflare
from cloudflare.types.workflows.instances.event_create_response import EventCreateResponse

from dispatcher.emulator import Emulator, EmulatorConfig, Faults, Limit

TOKEN = "sdk-test-token-abcdef"
EMAIL, KEY = "ops@example.com", "legacy-key-0123"

ClientFactory = Callable[..., AsyncCloudflare]


@pytest.fixture
async def make_client(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ClientFactory]:
    # The SDK falls back on these; a developer's real credentials must not leak in.
    for name in (
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_API_KEY",
        "CLOUDFLARE_EMAIL",
        "CLOUDFLARE_API_USER_SERVICE_KEY",
        "CLOUDFLARE_BASE_URL",
        "CLOUDFLARE_CUSTOM_HEADERS",
    ):
        monkeypatch.delenv(name, raising=False)
    clients: list[AsyncCloudflare] = []

    def make(**credentials: str) -> AsyncCloudflare:
        client = AsyncCloudflare(
            **credentials,  # type: ignore[arg-type]
            base_url=emulator.base_url,
            max_retries=0,
            http_client=httpx.AsyncClient(trust_env=False),  # 127.0.0.1 only, never a proxy
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def send(client: AsyncCloudflare, instance_id: str = "i-1") -> EventCreateResponse:
    return await client.workflows.instances.events.create(
        "approved",
        account_id="acc",
        workflow_name="wf",
        instance_id=instance_id,
        body={"amount": 3},
    )


@pytest.mark.parametrize("emulator", [EmulatorConfig(tokens=(TOKEN,), limit=None)], indirect=True)
async def test_sdk_gets_its_typed_result(emulator: Emulator, make_client: ClientFactory) -> None:
    result = await send(make_client(api_token=TOKEN))
    assert isinstance(result, EventCreateResponse)
    assert result.instance_id == "i-1"
    assert isinstance(result.timestamp, datetime)
    assert emulator.log.total_accepted() == 1
    ((workflow, instance_id, event_type, sha),) = emulator.log.accepted
    assert (workflow, instance_id, event_type) == ("wf", "i-1", "approved")
    assert sha is not None


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(legacy_keys=((EMAIL, KEY),), limit=None)], indirect=True
)
async def test_sdk_with_the_legacy_key_pair(emulator: Emulator, make_client: ClientFactory) -> None:
    assert (await send(make_client(api_email=EMAIL, api_key=KEY))).instance_id == "i-1"
    with pytest.raises(cloudflare.PermissionDeniedError):
        await send(make_client(api_email=EMAIL, api_key="not-the-key"))


@pytest.mark.parametrize(
    "emulator",
    [EmulatorConfig(tokens=(TOKEN,), limit=None, known_instances=frozenset({"i-1"}))],
    indirect=True,
)
async def test_sdk_not_found_for_an_unknown_instance(
    emulator: Emulator, make_client: ClientFactory
) -> None:
    with pytest.raises(cloudflare.NotFoundError) as caught:
        await send(make_client(api_token=TOKEN), "i-2")
    assert caught.value.status_code == 404
    assert "10400" in str(caught.value)


@pytest.mark.parametrize("emulator", [EmulatorConfig(tokens=(TOKEN,), limit=None)], indirect=True)
async def test_sdk_bad_token(emulator: Emulator, make_client: ClientFactory) -> None:
    with pytest.raises((cloudflare.AuthenticationError, cloudflare.PermissionDeniedError)):
        await send(make_client(api_token="not-the-token"))
    assert emulator.log.accepted == {}


@pytest.mark.parametrize(
    "emulator", [EmulatorConfig(tokens=(TOKEN,), limit=Limit(quota=2, window=60.0))], indirect=True
)
async def test_sdk_rate_limited(emulator: Emulator, make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN)
    await send(client)
    await send(client)
    with pytest.raises(cloudflare.RateLimitError) as caught:
        await send(client)
    assert caught.value.response.headers["Retry-After"] == "60"
    assert caught.value.response.headers["Ratelimit"] == '"default";r=0;t=60'


@pytest.mark.parametrize(
    "emulator",
    [EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults(http_500=1.0, first=1))],
    indirect=True,
)
async def test_sdk_sees_an_injected_500_then_succeeds(
    emulator: Emulator, make_client: ClientFactory
) -> None:
    client = make_client(api_token=TOKEN)
    with pytest.raises(cloudflare.InternalServerError):
        await send(client)
    assert (await send(client)).instance_id == "i-1"
    assert emulator.log.total_accepted() == 1
