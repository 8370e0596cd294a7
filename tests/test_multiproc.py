"""--processes: the work split over worker processes, merged into one results file."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path

import anyio
import orjson

from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.run.multiproc import worker_settings
from dispatcher.run.runner import in_shard
from dispatcher.run.settings import Credentials, Rate, SendSettings

TOKEN = "tok-multiproc-51d0"


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


def write_input(path: Path, n: int) -> Path:
    lines = [orjson.dumps({"instance_id": f"m{k}", "event_type": "e", "body": k}) for k in range(n)]
    path.write_bytes(b"\n".join([*lines, b"{broken"]) + b"\n")
    return path


def test_worker_share_divides_the_rate_and_leaves_thresholds_to_the_parent() -> None:
    settings = SendSettings(
        inputs=("a.jsonl",),
        account_id="acc",
        credentials=Credentials(token=TOKEN),
        rate=Rate(count=1200, per=300.0),
        processes=3,
        max_failures=10,
    )
    share = worker_settings(settings)
    assert share.rate == Rate(count=400, per=300.0)
    assert share.processes == 1
    assert share.max_failures is None


def test_shards_cover_every_key_once() -> None:
    keys = [f"key-{k}" for k in range(1000)]
    owners = Counter(sum(in_shard(key, (i, 3)) for i in range(3)) for key in keys)
    assert owners == {1: 1000}


async def test_two_processes_send_everything_once_into_one_file(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 400)
    out = tmp_path / "out.jsonl"
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse(["500=10%"], first=1))
    async with Emulator(cfg) as emu:
        result = await anyio.run_process(
            [
                sys.executable,
                *("-m", "dispatcher", "send", str(src), "--workflow", "wf"),
                *("--rate", "unlimited", "--processes", "2", "--results", str(out)),
            ],
            env=env_for(emu),
            check=False,
        )
        accepted = {k[1]: len(v) for k, v in emu.log.accepted.items()}
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr  # the broken line
    envs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(envs) == 401
    assert len({e["key"] for e in envs}) == 401
    assert Counter(e["delivery"] for e in envs) == {"confirmed": 400, "not_sent": 1}
    assert accepted == {f"m{k}": 1 for k in range(400)}
    assert "400 confirmed" in stderr
    assert "retries" in stderr
    assert TOKEN not in stderr
    assert not any(name.startswith("out.jsonl.inflight") for name in os.listdir(tmp_path))


async def test_ctrl_c_reaches_every_worker(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="200ms"))
    async with Emulator(cfg) as emu:
        proc = await anyio.open_process(
            [
                sys.executable,
                *("-m", "dispatcher", "send", str(src), "--workflow", "wf", "--quiet"),
                *("--rate", "40/s", "--processes", "2", "--results", str(out)),
            ],
            env=env_for(emu),
        )
        with anyio.fail_after(20):  # let both workers get going, however slow they start
            while len(emu.log.accepted) < 20:  # noqa: ASYNC110 (the log has no event to wait on)
                await anyio.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            code = await proc.wait()
        accepted = {k[1] for k in emu.log.accepted}
    assert code == 130
    envs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert 0 < len(envs) < 301
    # Whatever the emulator accepted has its confirmed envelope: nothing in flight was lost.
    assert {e["instance_id"] for e in envs if e["ok"]} == accepted
    assert not any(name.startswith("out.jsonl.inflight") for name in os.listdir(tmp_path))


async def test_a_rejected_token_stops_every_worker_and_says_how_to_finish(tmp_path: Path) -> None:
    # One worker's 401 stops the other (a SIGINT from the parent, which may come while
    # that worker is still importing): exit 3, the stop's reason, no traceback anywhere,
    # and the command printed at the end finishes the job once the token is right.
    src = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        args = [
            *("-m", "dispatcher", "send", str(src), "--workflow", "wf", "--progress", "off"),
            *("--rate", "100/s", "--processes", "2", "--results", str(out)),
        ]
        bad = {**env_for(emu), "CLOUDFLARE_API_TOKEN": "not-the-token"}
        stopped = await anyio.run_process([sys.executable, *args], env=bad, check=False)
        err = stopped.stderr.decode()
        assert stopped.returncode == 3, err
        assert "Traceback" not in err
        assert "credentials rejected (HTTP 401" in err
        finish = next(line for line in err.splitlines() if "to finish" in line)
        assert finish.rstrip().endswith("--resume --retry-failed")
        done = await anyio.run_process(
            [sys.executable, *args, "--resume", "--retry-failed"], env=env_for(emu), check=False
        )
        accepted = {k[1]: len(v) for k, v in emu.log.accepted.items()}
    assert done.returncode == 1, done.stderr.decode()  # the broken line
    assert accepted == {f"m{k}": 1 for k in range(200)}


async def test_a_stop_while_a_worker_winds_down_is_ignored_not_a_traceback() -> None:
    # When the watch ends, asyncio puts back Python's default handlers: a SIGINT from the
    # parent in the worker's teardown was a KeyboardInterrupt inside anyio's cancel scopes
    # (seen in CI, a traceback on stderr). The worker's watch ignores stops as it ends.
    from dispatcher.run.signals import ignore_stops, watch_signals
    from dispatcher.sending.engine import Engine

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = Engine.__new__(Engine)  # never used: no signal comes while it watches
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals, engine, anyio.CancelScope(), 1.0, False, ignore_stops)
            await anyio.sleep(0.05)
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, before[signal.SIGINT])
            tg.cancel_scope.cancel()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt here
        await anyio.sleep(0.01)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
