"""Crash safety and resume, on real subprocesses against the in-process emulator."""

from __future__ import annotations

import contextlib
import random
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import Process
from crashkit import TOKEN, cmd, env_for, write_input

from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.results.ledger import load_ledger, read_envelopes


async def run_cli(args: list[str], env: dict[str, str]) -> int:
    result = await anyio.run_process(args, env=env, check=False)
    return result.returncode


def all_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete line, in order (a torn last line is not a line)."""
    lines = path.read_bytes().split(b"\n")
    return [orjson.loads(line) for line in lines[:-1] if line.strip()]


def final_by_key(path: Path) -> dict[str, dict[str, Any]]:
    final: dict[str, dict[str, Any]] = {}
    for env in all_lines(path):
        final[env["key"]] = env
    return final


async def start(args: list[str], env: dict[str, str]) -> Process:
    return await anyio.open_process(args, env=env)


async def test_kill_9_then_resume_loses_nothing(tmp_path: Path) -> None:
    ids = [f"r{k}" for k in range(600)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    rng = random.Random(1234)
    # Latency keeps requests in flight at every moment, so kills land mid-request.
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="5..40ms"))
    async with Emulator(cfg) as emu:
        env = env_for(emu)
        first = True
        for _ in range(3):
            extra = ["--rate", "250/s", "--concurrency", "8"]
            args = cmd(src, out, *extra, *([] if first else ["--resume", "--resend-unknown"]))
            first = False
            proc = await start(args, env)
            await anyio.sleep(rng.uniform(1.0, 2.5))
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            await proc.wait()
        for _ in range(5):
            code = await run_cli(
                cmd(src, out, "--rate", "unlimited", "--resume", "--resend-unknown"), env
            )
            if code == 0:
                break
        assert code == 0
        accepted: dict[str, int] = defaultdict(int)
        for (_, instance, _, _), times in emu.log.accepted.items():
            accepted[instance] += len(times)
    final = final_by_key(out)
    assert sorted(e["instance_id"] for e in final.values()) == sorted(ids)
    assert all(e["delivery"] == "confirmed" for e in final.values())
    assert set(accepted) == set(ids)
    said_unknown = {e["instance_id"] for e in all_lines(out) if e["delivery"] == "unknown"}
    twice = {i for i, n in accepted.items() if n > 1}
    assert twice <= said_unknown
    assert not (tmp_path / "out.jsonl.inflight").exists()
    # The ledger reads the file the same way.
    ledger = load_ledger(str(out))
    assert len(ledger) == 600
    assert all(state.ok for state in ledger.values())


async def wait_until_sending(out: Path, proc: Process) -> None:
    """Wait until the run has a request on the wire (its journal names it just before it
    leaves): the run's signal handlers are in place by then.

    A fixed sleep raced the interpreter's start-up on a loaded machine: a SIGINT that came
    before the handlers were installed killed the process (exit -2) instead of stopping it.
    """
    journal = out.parent / f"{out.name}.inflight"
    with anyio.fail_after(30):
        while not (journal.exists() and journal.stat().st_size > 0):
            assert proc.returncode is None, "the run ended before it sent anything"
            await anyio.sleep(0.05)


async def test_ctrl_c_drains_in_flight_then_resume_finishes(tmp_path: Path) -> None:
    ids = [f"c{k}" for k in range(200)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="300ms"))
    async with Emulator(cfg) as emu:
        env = env_for(emu)
        proc = await start(cmd(src, out, "--rate", "40/s", "--concurrency", "8"), env)
        await wait_until_sending(out, proc)
        await anyio.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):  # a guard against a hang: the drain is of 300 ms requests
            code = await proc.wait()
        assert code == 130
        first = final_by_key(out)
        accepted_after_first = {k[1] for k in emu.log.accepted}
        assert 0 < len(first) < 200
        # Requests in flight at Ctrl-C finished and were written: every record the
        # emulator accepted has a confirmed envelope, and nothing else was confirmed.
        assert {e["instance_id"] for e in first.values() if e["ok"]} == accepted_after_first
        assert all(e["delivery"] == "confirmed" for e in first.values())
        assert not (tmp_path / "out.jsonl.inflight").exists()

        code = await run_cli(cmd(src, out, "--rate", "unlimited", "--resume"), env)
        assert code == 0
        counts = {k[1]: len(v) for k, v in emu.log.accepted.items()}
    final = final_by_key(out)
    assert len(final) == 200
    assert all(e["ok"] for e in final.values())
    assert counts == dict.fromkeys(ids, 1)  # nothing sent twice


async def test_second_ctrl_c_stops_at_once_with_unknown_for_in_flight(tmp_path: Path) -> None:
    ids = [f"h{k}" for k in range(50)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    # Answers come after 120 s, and neither the request timeout nor the first Ctrl-C's
    # grace ends the wait for them sooner: a run that ends within the 60 s below did not
    # wait (with answers after 20 s and an 8 s limit, a loaded machine could miss the 8 s).
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="120s"))
    async with Emulator(cfg) as emu:
        args = cmd(src, out, "--rate", "unlimited", "--concurrency", "4")
        proc = await start([*args, "--timeout", "300s", "--grace", "300s"], env_for(emu))
        await wait_until_sending(out, proc)
        await anyio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        await anyio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            code = await proc.wait()
    assert code == 130
    envs = all_lines(out)
    assert len(envs) == 4
    for env in envs:
        assert env["delivery"] == "unknown"
        assert env["error"]["kind"] == "stopped"
    assert not (tmp_path / "out.jsonl.inflight").exists()


async def test_max_failures_stops_early(tmp_path: Path) -> None:
    ids = [f"f{k}" for k in range(200)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, known_instances=frozenset(ids[:10]))
    async with Emulator(cfg) as emu:
        code = await run_cli(
            cmd(src, out, "--rate", "unlimited", "--concurrency", "2", "--max-failures", "5"),
            env_for(emu),
        )
    assert code == 3
    envs = all_lines(out)
    failed = [e for e in envs if not e["ok"]]
    assert 5 <= len(failed) <= 5 + 2
    assert len(envs) < 200


async def test_max_error_rate_stops_early(tmp_path: Path) -> None:
    ids = [f"e{k}" for k in range(300)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    # The first 50 are fine; from then on every other instance is unknown: 50% errors.
    known = frozenset(ids[:50]) | frozenset(ids[50::2])
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, known_instances=known)
    async with Emulator(cfg) as emu:
        code = await run_cli(
            cmd(
                src,
                out,
                *("--rate", "unlimited", "--concurrency", "1"),
                *("--max-error-rate", "30%", "--error-window", "20"),
            ),
            env_for(emu),
        )
    assert code == 3
    envs = all_lines(out)
    assert 50 < len(envs) < 300


@pytest.mark.parametrize("results", ["out.jsonl", "out.sqlite"])
async def test_resume_after_reorder_skips_the_same_records(tmp_path: Path, results: str) -> None:
    ids = [f"o{k}" for k in range(60)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / results
    known = frozenset(ids[::3])
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, known_instances=known)
    async with Emulator(cfg) as emu:
        env = env_for(emu)
        assert await run_cli(cmd(src, out, "--rate", "unlimited"), env) == 1
        before = sum(emu.log.status_counts.values())
        shuffled = ids[:]
        random.Random(5).shuffle(shuffled)
        write_input(src, shuffled)
        # Confirmed ones are skipped; failed ones too, without --retry-failed.
        assert await run_cli(cmd(src, out, "--rate", "unlimited", "--resume"), env) == 1
        assert sum(emu.log.status_counts.values()) == before
        # --retry-failed sends exactly the failed ones again.
        assert await run_cli(cmd(src, out, "--rate", "unlimited", "--retry-failed"), env) == 1
        again = [str(r.instance_id) for r in emu.log.requests][before:]
    assert sorted(again) == sorted(i for i in ids if i not in known)
    final = list(read_envelopes(str(out)))
    assert len(final) == 60
    assert {e.instance_id for e in final if e.ok} == set(known)
