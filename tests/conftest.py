"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
