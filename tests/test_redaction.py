"""A server that echoes the credentials back: they appear in nothing the user sees.

``dispatcher send`` as a subprocess (one process and ``--processes 2``, both clients) against
the hostile server's echoing 401 and 400 pages, then ``dispatcher report`` on the results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import orjson
import pytest
from hostile_server import CASES, EMAIL, KEY, SECRET, serve

ECHOES = [c for c in CASES if "echoes" in c.name]


async def cli(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", *args], env=env, check=False
    )
    return result.returncode, result.stdout.decode() + result.stderr.decode()


@pytest.mark.parametrize(
    ("case_name", "client", "processes", "legacy"),
    [
        ("unauthorized_401_echoes_request", "fast", 1, False),
        ("unauthorized_401_echoes_request", "aiohttp", 2, True),
        ("bad_request_400_json_echoes_request", "fast", 2, False),
        ("bad_request_400_json_echoes_request", "aiohttp", 1, True),
    ],
)
async def test_echoed_credentials_are_redacted_everywhere(
    tmp_path: Path, case_name: str, client: str, processes: int, legacy: bool
) -> None:
    case = next(c for c in ECHOES if c.name == case_name)
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": f"i{k}", "event_type": "e"}) + b"\n" for k in range(6)
        )
    )
    out = tmp_path / "r.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    if legacy:
        env.update(CLOUDFLARE_EMAIL=EMAIL, CLOUDFLARE_API_KEY=KEY)
    else:
        env.update(CLOUDFLARE_API_TOKEN=SECRET)
    async with serve(case) as server:
        env.update(CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=server.url)
        code, shown = await cli(
            [
                "send",
                str(src),
                "--workflow",
                "wf",
                "--results",
                str(out),
                "--http-client",
                client,
                "--processes",
                str(processes),
                "--progress",
                "lines",
            ],
            env,
        )
        echoed = b"".join(server.requests).decode("latin-1")
    assert code != 0, shown  # (1, or 3: the 401 stops the run)
    # The server did get (and echo) the credentials: the test would catch a leak.
    assert (KEY if legacy else SECRET) in echoed
    _, report = await cli(["report", str(out)], env)
    written = out.read_text()
    assert "<redacted>" in written
    for text in (shown, written, report):
        for secret in (SECRET, KEY, EMAIL):
            assert secret not in text
