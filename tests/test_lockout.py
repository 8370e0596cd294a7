"""A 429 asking for a longer wait than --max-retry-wait: the run stops, resume sends the rest."""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson

from dispatcher.emulator import Emulator, EmulatorConfig, Limit

TOKEN = "tok-lockout-5512"
N = 40


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


async def send(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", "send", *args], env=env, check=False
    )
    return result.returncode, result.stderr.decode()


def final_envelopes(path: Path) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for line in path.read_bytes().splitlines():
        env = orjson.loads(line)
        last[env["key"]] = env
    return last


async def spend_the_budget(emu: Emulator) -> int:
    """Another client of the same account (a second token, the dashboard) spends its budget
    until the account is locked out; returns how many requests that took."""
    url = f"{emu.base_url}/accounts/acc/workflows/wf/instances/other/events/e"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        for n in itertools.count(1):
            async with session.post(url, json={}, headers=headers) as resp:
                if resp.status == 429:
                    return n
    raise AssertionError("unreachable")


async def test_a_lockout_longer_than_max_retry_wait_stops_the_run(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": f"l{k}", "event_type": "e"}) + b"\n" for k in range(N)
        )
    )
    out = tmp_path / "out.jsonl"
    # A lockout of 60 s once the budget is spent: far over --max-retry-wait 2s.
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=Limit.parse("100/10s"), lockout=60.0)
    args = [str(src), "--workflow", "wf", "--results", str(out), "--rate", "10/s"]
    args += ["--concurrency", "4", "--max-retry-wait", "2s", "--progress", "off"]
    async with Emulator(cfg) as emu:
        async with anyio.create_task_group() as tg:
            result: list[tuple[int, str]] = []

            async def run() -> None:
                result.append(await send(args, env_for(emu)))

            tg.start_soon(run)
            while emu.log.total_accepted() < 5:  # noqa: ASYNC110 (another process's progress)
                await anyio.sleep(0.05)
            spent = await spend_the_budget(emu)
            t0 = anyio.current_time()
        took = anyio.current_time() - t0
        received = emu.log.total_requests() - spent
    code, err = result[0]
    assert code == 3, err
    # The emulator counts the lockout down in whole seconds from the budget's end.
    assert re.search(r"locked out for (5[5-9]|60) s", err), err
    assert "--max-retry-wait 2 s" in err
    finish = f"to finish  dispatcher send {src} --workflow wf --results {out}"
    assert finish in err
    assert err.rstrip().endswith("--resume"), err
    # The run stopped at the first refusal: it did not send every record once into the
    # lockout, nor pause for the 60 s once it knew it would stop.
    envs = final_envelopes(out)
    confirmed = [e for e in envs.values() if e["delivery"] == "confirmed"]
    refused = [e for e in envs.values() if e["status"] == 429]
    assert received <= len(confirmed) + 4
    assert took < 5
    assert refused
    assert all(e["error"]["kind"] == "rate_limited" for e in refused)
    assert all(e["delivery"] != "not_sent" for e in refused)

    # Once the lockout is over, a plain --resume sends the refused and the unattempted.
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, err = await send([*args, "--rate", "unlimited", "--resume"], env_for(emu))
        resent = emu.log.total_accepted()
    assert code == 0, err
    envs = final_envelopes(out)
    assert len(envs) == N
    assert all(e["delivery"] == "confirmed" for e in envs.values())
    assert resent == N - len(confirmed)  # nothing confirmed before is sent again
