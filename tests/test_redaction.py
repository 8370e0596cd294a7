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

from dispatcher.clients.base import Redactor

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


# --- short secrets: refused at config time, and never mangling ordinary words ---------------


def _env_without_credentials() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ({"CLOUDFLARE_API_TOKEN": "t"}, "CLOUDFLARE_API_TOKEN"),
        ({"CLOUDFLARE_API_TOKEN": "abc1234"}, "CLOUDFLARE_API_TOKEN"),
        ({"CLOUDFLARE_EMAIL": "a@b.io", "CLOUDFLARE_API_KEY": "k"}, "CLOUDFLARE_API_KEY"),
        ({"token_file": "xy"}, "--token-file"),
    ],
)
async def test_a_very_short_credential_is_refused_in_one_line(
    tmp_path: Path, setting: dict[str, str], where: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(orjson.dumps({"instance_id": "i1", "event_type": "e"}) + b"\n")
    env = _env_without_credentials() | {
        "CLOUDFLARE_ACCOUNT_ID": "acc",
        "CLOUDFLARE_BASE_URL": "http://127.0.0.1:9/client/v4",
    }
    args = ["send", str(src), "--workflow", "wf", "--results", str(tmp_path / "r.jsonl")]
    if "token_file" in setting:
        token_file = tmp_path / "token"
        token_file.write_text(setting["token_file"] + "\n")
        args += ["--token-file", str(token_file)]
    else:
        env.update(setting)
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", *args], env=env, check=False
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert where in err
    assert "too short" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_short_secret_is_cut_out_only_where_it_stands_alone() -> None:
    redact = Redactor({"Authorization": "Bearer t", "X-Auth-Email": "o@x.io"})
    assert redact("Internal error: try it later") == "Internal error: try it later"
    assert redact("got Authorization: Bearer t") == "got Authorization: <redacted>"
    assert redact("token t was refused") == "token <redacted> was refused"
    assert redact('{"key":"t"}') == '{"key":"<redacted>"}'
    assert redact("X-Auth-Email: o@x.io; foo@x.iox") == "X-Auth-Email: <redacted>; foo@x.iox"


def test_a_long_secret_is_cut_out_everywhere_even_inside_a_word() -> None:
    redact = Redactor({"Authorization": f"Bearer {SECRET}"})
    for text in (
        f"Bearer%20{SECRET}",
        f"x{SECRET}y",
        f"token={SECRET}&a=1",
        f"{SECRET}{SECRET}",
    ):
        assert SECRET not in redact(text)
        assert "<redacted>" in redact(text)
    assert redact("Internal error") == "Internal error"


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
async def test_a_one_character_token_leaves_the_servers_words_alone(client: str) -> None:
    # A library caller can still hand the transport any header; the words survive.
    from hostile_server import JSON, Case, answer, serve
    from test_hostile import CLIENTS, event

    from dispatcher.clients.base import TransportConfig
    from dispatcher.model import ErrorKind
    from dispatcher.results.envelopes import Seen

    body = b'{"success":false,"errors":[{"code":10001,"message":"Internal error, try it later"}]}'
    data = answer("500 Internal Server Error", [JSON], body)

    async def act(writer: object, request: bytes, server: object) -> None:
        writer.write(data)  # type: ignore[attr-defined]
        await writer.drain()  # type: ignore[attr-defined]

    case = Case("internal_error", act, Seen.ERROR, ErrorKind.HTTP)
    async with serve(case) as server:
        tx = CLIENTS[client](
            TransportConfig(
                base_url=server.url, account_id="acc", auth_headers={"Authorization": "Bearer t"}
            )
        )
        try:
            outcome = await tx.send(event())
        finally:
            await tx.aclose()
    assert outcome.message == "Internal error, try it later"
