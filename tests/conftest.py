"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis_server import RedisServer

from dispatcher.emulator import Emulator, EmulatorConfig


@pytest.fixture
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    """An emulator on 127.0.0.1 with an ephemeral port.

    By default any non-empty credential passes and there is no rate limit; give another
    config with ``@pytest.mark.parametrize("emulator", [EmulatorConfig(...)], indirect=True)``.
    """
    config: EmulatorConfig = getattr(request, "param", None) or EmulatorConfig(limit=None)
    async with Emulator(config) as emu:
        yield emu


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of its own on a free port (see tests/redis_server.py)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
