"""`dispatcher load --target wrangler-dev|relay` against the real runtime (wrangler dev).

The same test project as tests/test_wrangler.py: a Workflow whose instances wait for a
"go" event and finish with its payload, and the relay bound to it. A load test's arrivals
go round robin over the instances, so with as many arrivals as instances each instance
gets exactly one event, and each must complete with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from wrangler_dev import WORKFLOW, WranglerDev, missing, wrangler_dev

SECRET = "load-relay-secret-0123456789"
N = 40

if (reason := missing()) is not None:
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def wd() -> Iterator[WranglerDev]:
    with wrangler_dev(SECRET) as server:
        yield server


def load(
    args: list[str], tmp: Path, *, secret: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    if secret is not None:
        env["DISPATCHER_RELAY_SECRET"] = secret
    return subprocess.run(
        [
            *(sys.executable, "-m", "dispatcher", "load", "--quiet"),
            *("--workflow", WORKFLOW, "--event-type", "go"),
            *("--rate", f"{N}/s", "--duration", "1s", "--format", "json"),
            *args,
        ],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )


def envelopes(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("target", ["wrangler-dev", "relay"])
def test_load_reaches_every_instance_through_the_target(
    wd: WranglerDev, tmp_path: Path, target: str
) -> None:
    prefix = f"load-{target}-"
    ids = [f"{prefix}{n}" for n in range(N)]
    wd.create(ids)
    done = load(
        [
            *("--target", target, "--base-url", wd.base_url),
            *("--instance-prefix", prefix, "--instance-count", str(N)),
            *("--body", '{"from": "load"}'),
            "--threshold",
            "error_rate<1%",
        ],
        tmp_path,
        secret=SECRET if target == "relay" else None,
    )
    assert done.returncode == 0, done.stderr
    doc = orjson.loads(done.stdout)
    assert doc["load"]["sent"] == N
    assert doc["confirmed"] == N
    envs = envelopes(tmp_path / "load-results.jsonl")
    assert sorted(e["instance_id"] for e in envs) == sorted(ids)
    assert {e["delivery"] for e in envs} == {"confirmed"}
    found = wd.wait_complete(ids)
    wrong = {
        i: s
        for i, s in found.items()
        if s["status"] != "complete" or s["output"]["payload"] != {"from": "load"}
    }
    assert not wrong, f"{len(wrong)} of {N} instances wrong, e.g. {next(iter(wrong.items()))}"


def test_load_through_the_relay_with_a_wrong_secret_stops_at_once(
    wd: WranglerDev, tmp_path: Path
) -> None:
    done = load(
        [
            *("--target", "relay", "--base-url", wd.base_url),
            *("--instance-prefix", "load-wrong-", "--instance-count", "3"),
        ],
        tmp_path,
        secret="not-the-secret",
    )
    assert done.returncode == 3, done.stderr
    assert "credentials rejected (HTTP 401" in done.stderr
    assert "DISPATCHER_RELAY_SECRET" in done.stderr
    assert "not-the-secret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_load_to_the_api_still_needs_credentials(tmp_path: Path) -> None:
    done = load(["--instance-prefix", "x", "--instance-count", "1"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "credentials" in done.stderr or "CLOUDFLARE_API_TOKEN" in done.stderr
