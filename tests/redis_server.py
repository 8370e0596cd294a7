"""A real redis-server on a free port of 127.0.0.1, for the coordination tests.

``redis-server --port 0`` disables TCP instead of choosing a port, so a free one is
picked here (bind to port 0, read it, release it) and handed over. The server keeps an
append-only file in its own folder, so :meth:`RedisServer.stop` then :meth:`start`
brings the same data back, as a restarted production server would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server not installed (.ci/setup.d/10-redis.sh)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.folder), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
                *("--protected-mode", "no", "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()  # SIGTERM: a clean shutdown, the AOF is complete
            process.wait(10)

    def kill(self) -> None:
        """kill -9: what the server had not yet written to its files is gone."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(10)

    def wipe(self) -> None:
        """Forget everything on disk (a server without persistence, or a new machine)."""
        for child in self.folder.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def command(self, *args: str) -> bytes:
        """One command through redis-cli (the tests' own view of the data)."""
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, check=True
        ).stdout
