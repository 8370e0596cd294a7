"""`dispatcher demo` as a user runs it (`make demo`): the whole instance loop, exit 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson


def count(pattern: str, text: str) -> int:
    found = re.search(pattern, text, re.MULTILINE)
    assert found is not None, f"{pattern!r} not in:\n{text}"
    return int(found.group(1).replace(",", ""))


def test_demo_creates_selects_sends_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", "demo", "--instances", "200", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = done.stderr
    assert done.returncode == 0, err
    assert "Traceback" not in err
    # 200 orders: every 10th waits for another event, every 20th (not a 10th) timed out.
    assert count(r"created: (\d+)", err) == 200
    assert count(r"records\s+([\d,]+) \(", err) == 200
    assert count(r"\(([\d,]+) confirmed", err) == 170
    assert count(r"([\d,]+) skipped", err) == 30
    assert count(r"created ([\d,]+) distinct instances, 0 more than once", err) == 200
    # The verify summary comes last: 170 consumed, the 30 skipped not verified.
    tail = err[err.index("3. verify") :]
    assert count(r"^consumed\s+(\d+)$", tail) == 170
    assert count(r"^not_verified\s+(\d+)$", tail) == 30
    assert count(r"^no_waiter\s+(\d+)$", tail) == 0
    assert err.rstrip().splitlines()[-1].startswith("dispatcher verify: 170 request(s)")
    lines = [orjson.loads(raw) for raw in (out / "results.verify.jsonl").read_bytes().splitlines()]
    assert len(lines) == 200
    consumed = {line["instance_id"] for line in lines if line["class"] == "consumed"}
    assert len(consumed) == 170
    assert not any(i.endswith("0") for i in consumed)  # those wait for another event
