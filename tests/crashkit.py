"""Shared by the crash-safety tests: run the CLI as a subprocess, read what it left.

The checks are what a user would notice after a crash and a resume: every record has
exactly one final envelope, nothing confirmed before the crash went out again, and no
record was accepted twice unless its envelope said ``unknown`` at some point.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from dispatcher.emulator import Emulator
from dispatcher.run.settings import Credentials, SendSettings

TOKEN = "tok-crash-safety-5c1e"


class FillingDisk:
    """``os.write`` for a disk that fills up under the crash journal. Each write of journal
    lines (not envelopes) asks ``cut(lines written so far, this write's lines)``: ``None``
    lets it through; a byte count makes it come up short there, and every later write to
    that file fails with ENOSPC. ``torn``: the instance ids of that write's records."""

    def __init__(self, cut: Callable[[int, list[bytes]], int | None]) -> None:
        self.real = os.write
        self.cut = cut
        self.lines = 0
        self.torn: list[str] = []
        self._full: set[int] = set()

    def __call__(self, fd: int, data: bytes) -> int:
        if fd in self._full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raw = bytes(data)
        if raw.startswith(b'{"key":"') and b'"ok":' not in raw:
            records = raw.splitlines(keepends=True)
            keep = self.cut(self.lines, records)
            if keep is not None:
                self.torn.extend(orjson.loads(r)["instance_id"] for r in records)
                self._full.add(fd)
                return self.real(fd, raw[:keep])
            self.lines += len(records)
        return self.real(fd, data)


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


def settings_for(emu: Emulator, src: Path, out: Path, **kw: object) -> SendSettings:
    """An in-process run's settings: unlimited rate, 4 workers unless ``kw`` says."""
    fields: dict[str, Any] = {"rate": "unlimited", "concurrency": 4, **kw}
    return SendSettings(
        inputs=(str(src),),
        workflow="wf",
        account_id="acc",
        base_url=emu.base_url,
        credentials=Credentials(token=TOKEN),
        results=str(out),
        progress="off",
        quiet=True,
        **fields,
    )


def write_input(path: Path, ids: list[str]) -> Path:
    path.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": i, "event_type": "evt", "body": {"id": i}}) + b"\n"
            for i in ids
        )
    )
    return path


def cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "dispatcher", "send", str(src), "--workflow", "wf"),
        *("--results", str(out), "--quiet", *extra),
    ]


async def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = await anyio.run_process(args, env=env, check=False)
    return result.returncode, result.stderr.decode()


def envelopes(out: Path) -> list[dict[str, Any]]:
    """Every envelope written, in order (JSONL: every complete line; SQLite: every row)."""
    if out.suffix == ".sqlite":
        conn = sqlite3.connect(out)
        try:
            rows = conn.execute(
                "SELECT instance_id, delivery, error_kind, error_message, key FROM envelopes"
            ).fetchall()
        finally:
            conn.close()
        return [
            {
                "instance_id": i,
                "delivery": d,
                "key": k,
                "error": None if kind is None else {"kind": kind, "message": msg},
            }
            for i, d, kind, msg, k in rows
        ]
    lines = out.read_bytes().split(b"\n")
    return [orjson.loads(line) for line in lines[:-1] if line.strip()]


def final_by_instance(out: Path) -> dict[str, dict[str, Any]]:
    final: dict[str, dict[str, Any]] = {}
    for env in envelopes(out):
        final[env["instance_id"]] = env
    return final


def crashed_unknown(out: Path) -> set[str]:
    """Instances a resume marked unknown because a crashed run had started them."""
    return {
        e["instance_id"]
        for e in envelopes(out)
        if e["delivery"] == "unknown" and "crashed" in (e["error"] or {}).get("message", "")
    }


def accepted_counts(emu: Emulator) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (_, instance, _, _), times in emu.log.accepted.items():
        counts[str(instance)] += len(times)
    return counts


def journals(folder: Path, results: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(results + ".inflight"))


async def wait_until_sending(emu: Emulator, at_least: int) -> None:
    with anyio.fail_after(20):
        while emu.log.total_requests() < at_least:  # noqa: ASYNC110 (the log has no event)
            await anyio.sleep(0.02)


def check_after_resume(
    emu: Emulator, out: Path, ids: list[str], confirmed_before: set[str]
) -> dict[str, str]:
    """The three checks of every crash test; returns each instance's final delivery."""
    final = final_by_instance(out)
    assert sorted(final) == sorted(ids), "every record has exactly one final envelope"
    counts = accepted_counts(emu)
    assert not [i for i in confirmed_before if counts[i] > 1], "confirmed ones sent again"
    # Without --resend-unknown nothing goes out twice; whatever arrived says so or is
    # marked unknown (it may have arrived): nothing lost, no false claim.
    assert [i for i, n in counts.items() if n > 1] == []
    for instance in counts:
        assert final[instance]["delivery"] in ("confirmed", "unknown"), instance
    for instance, env in final.items():
        if env["delivery"] == "confirmed":
            assert counts[instance] == 1, instance
    return {i: e["delivery"] for i, e in final.items()}


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
