"""The emulator's lifecycle: an aiohttp server on a local port, as an async context manager."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

from aiohttp import web

from dispatcher.emulator.config import EmulatorConfig
from dispatcher.emulator.handler import API_ROOT, STATS_PATH, EventService
from dispatcher.emulator.log import EmulatorLog
from dispatcher.inputs.validation import MAX_BODY_BYTES

# Requests in flight (say, sleeping on injected latency) get this long to finish at close.
SHUTDOWN_TIMEOUT: Final = 1.0


class Emulator:
    """The Cloudflare Workflows "send event" API, served on ``config.host``.

    Use as ``async with Emulator(config) as emu:`` and point a client at ``emu.base_url``.
    ``clock`` is the monotonic clock the log and the rate limiter read.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else EmulatorConfig()
        self.log = EmulatorLog(keep_requests=self.config.keep_requests)
        self._service = EventService(self.config, self.log, clock)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("emulator already started")
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._service.handle)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("emulator not started")
        return self._port

    @property
    def root_url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What a client takes as its API base URL (``.../client/v4``)."""
        return self.root_url + API_ROOT

    @property
    def stats_url(self) -> str:
        return self.root_url + STATS_PATH
