"""`dispatcher send` as a user runs it: a real subprocess against the in-process emulator."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson

from dispatcher.emulator import Emulator, EmulatorConfig

TOKEN = "tok-cli-SECRET-8f3a61d2"


def env_for(emu: Emulator, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN,
        CLOUDFLARE_ACCOUNT_ID="acc",
        CLOUDFLARE_BASE_URL=emu.base_url,
    )
    env.update(extra)
    return env


async def send(
    args: list[str], env: dict[str, str], *, stdin: bytes | None = None
) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", "send", *args],
        input=stdin,
        env=env,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_stdin_input(tmp_path: Path) -> None:
    lines = b"".join(
        orjson.dumps({"instance_id": f"s{k}", "event_type": "evt", "body": k}) + b"\n"
        for k in range(30)
    )
    out = tmp_path / "r.jsonl"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, _, err = await send(
            ["-", "--workflow", "wf", "--rate", "unlimited", "--results", str(out)],
            env_for(emu),
            stdin=lines,
        )
        accepted = len(emu.log.accepted)
    assert code == 0, err
    envs = results(out)
    assert len(envs) == 30
    assert {e["source"] for e in envs} == {"<stdin>"}
    assert sorted(e["line"] for e in envs) == list(range(1, 31))
    assert accepted == 30
    assert "30 confirmed" in err


async def test_fan_out_from_id_list(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"inst-{k}\n" for k in range(40)))
    out = tmp_path / "r.jsonl"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, _, err = await send(
            [
                str(ids),
                "--workflow",
                "wf",
                "--event-type",
                "approval",
                "--body",
                '{"approved": true}',
                "--rate",
                "unlimited",
                "--results",
                str(out),
            ],
            env_for(emu),
        )
        keys = set(emu.log.accepted)
    assert code == 0, err
    envs = results(out)
    assert len(envs) == 40
    assert {k[1] for k in keys} == {f"inst-{k}" for k in range(40)}
    assert {k[2] for k in keys} == {"approval"}
    assert len({k[3] for k in keys}) == 1  # the same body for every instance


async def test_token_never_shown(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"instance_id": "a", "event_type": "evt"}\n{"broken\n'
        b'{"instance_id": "missing", "event_type": "evt"}\n'
    )
    out = tmp_path / "r.jsonl"
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, known_instances=frozenset({"a"}))
    async with Emulator(cfg) as emu:
        code, stdout, err = await send(
            [str(src), "--workflow", "wf", "--results", str(out), "--progress", "lines"],
            env_for(emu),
        )
        snapshot = orjson.dumps(emu.log.snapshot()).decode()
    assert code == 1
    assert len(results(out)) == 3
    for text in (stdout, err, out.read_text(), snapshot):
        assert TOKEN not in text


async def test_bad_credentials_exit_3(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": f"x{k}", "event_type": "e"}) + b"\n" for k in range(200)
        )
    )
    out = tmp_path / "r.jsonl"
    async with Emulator(EmulatorConfig(tokens=("another-token",), limit=None)) as emu:
        code, _, err = await send(
            [str(src), "--workflow", "wf", "--rate", "unlimited", "--results", str(out)],
            env_for(emu),
        )
    assert code == 3
    assert "credentials rejected" in err
    assert len(results(out)) < 200
    assert TOKEN not in err


async def test_usage_errors_name_the_flag(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"instance_id": "a", "event_type": "evt"}\n')
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, _, err = await send([str(src), "--rate", "fast"], env_for(emu))
        assert code == 2
        assert "--rate" in err
        env = env_for(emu)
        del env["CLOUDFLARE_API_TOKEN"]
        code, _, err = await send([str(src), "--workflow", "wf"], env)
        assert code == 2
        assert "CLOUDFLARE_API_TOKEN" in err
        code, _, err = await send([str(tmp_path / "nope.jsonl"), "--workflow", "wf"], env_for(emu))
        assert code == 2
        assert "nope.jsonl" in err
        assert sum(emu.log.status_counts.values()) == 0


async def test_existing_results_are_not_clobbered(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"instance_id": "a", "event_type": "evt"}\n')
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": "earlier run"}\n')
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, _, err = await send(
            [str(src), "--workflow", "wf", "--results", str(out)], env_for(emu)
        )
        assert code == 2
        assert "--overwrite" in err
        assert out.read_text() == '{"key": "earlier run"}\n'
        code, _, err = await send(
            [str(src), "--workflow", "wf", "--results", str(out), "--overwrite"], env_for(emu)
        )
    assert code == 0, err
    assert [e["instance_id"] for e in results(out)] == ["a"]
