"""`--metrics-port`: a Prometheus scrape during a send, load and create run returns the
documented metrics, the counters move, and nothing secret is in them."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.emulator import Emulator, EmulatorConfig, InstanceModel

TOKEN = "tok-metrics-SECRET-77b1e0"
DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented() -> dict[str, set[str]]:
    """metric name -> the commands docs/metrics.md says serve it."""
    rows: dict[str, set[str]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `(dispatcher_\w+)` \| \w+ \|[^|]*\| ([a-z, ]+) \|", line)
        if m:
            rows[m.group(1)] = {c.strip() for c in m.group(2).split(",")}
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def samples(text: str) -> dict[str, float]:
    """``name{label="v"}`` -> value of every sample of a scrape."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def names(text: str) -> set[str]:
    found = set()
    for family in text_string_to_metric_families(text):
        found.add(family.name + ("_total" if family.type == "counter" else ""))
    return found


def env_for(emu: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=emu.base_url
    )
    return env


async def run_scraping(
    cmd: list[str], env: dict[str, str], port: int, tmp_path: Path
) -> tuple[int, str, list[str]]:
    """Run ``cmd``; scrape its metrics every 0.2 s while it runs. (exit code, stderr,
    the scrapes that answered, in order)."""
    scrapes: list[str] = []
    err_path = tmp_path / "stderr.txt"
    with err_path.open("wb") as err:
        proc = await anyio.open_process(cmd, env=env, stdout=err, stderr=err)
        async with proc, aiohttp.ClientSession() as session:
            while proc.returncode is None:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        assert resp.status == 200
                        assert resp.headers["Content-Type"].startswith("text/plain")
                        scrapes.append(await resp.text())
                except aiohttp.ClientConnectionError:
                    pass  # not listening yet, or already stopped
                with anyio.move_on_after(0.2):
                    await proc.wait()
            code = await proc.wait()
    return code, err_path.read_text(), scrapes


def check_scrapes(scrapes: list[str], command: str, moving: str) -> None:
    # Two scrapes at least with the run under way, and the counter moved between them.
    live = [s for s in scrapes if samples(s).get(moving, 0) > 0]
    assert len(live) >= 2, scrapes[-1:] or "no scrape answered"
    assert samples(live[-1])[moving] > samples(live[0])[moving]
    expected = {name for name, commands in documented().items() if command in commands}
    expected.discard("dispatcher_gate_rate")  # absent while unlimited: checked apart
    assert expected <= names(live[-1]), expected - names(live[-1])
    served = {n for n in names(live[-1]) if n.startswith("dispatcher_")}
    assert served <= set(documented()), served - set(documented())  # none undocumented
    for text in scrapes:
        assert TOKEN not in text
        assert "127.0.0.1" not in text  # no URL in any label


def test_the_doc_lists_metrics() -> None:
    rows = documented()
    assert "dispatcher_records_total" in rows
    assert len(rows) >= 12


async def test_send_serves_live_metrics(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"inst-{k}\n" for k in range(120)) + "bad id!\n")
    port = free_port()
    cmd = [
        sys.executable, "-m", "dispatcher", "send", str(ids), "--workflow", "wf",
        "--event-type", "go", "--rate", "40/s", "--results", str(tmp_path / "r.jsonl"),
        "--metrics-port", str(port),
    ]  # fmt: skip
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, err, scrapes = await run_scraping(cmd, env_for(emu), port, tmp_path)
    assert code == 1, err  # the bad id failed
    assert f"metrics on http://127.0.0.1:{port}/metrics" in err
    check_scrapes(scrapes, "send", 'dispatcher_records_total{delivery="confirmed"}')
    last = samples(scrapes[-1])
    assert last['dispatcher_answers_total{status_class="2xx"}'] > 0
    assert last["dispatcher_gate_rate"] == pytest.approx(40)
    assert last["dispatcher_request_latency_seconds_count"] > 0
    assert TOKEN not in err


async def test_send_with_processes_serves_the_merged_counters(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"inst-{k}\n" for k in range(160)))
    port = free_port()
    cmd = [
        sys.executable, "-m", "dispatcher", "send", str(ids), "--workflow", "wf",
        "--event-type", "go", "--rate", "40/s", "--processes", "2",
        "--results", str(tmp_path / "r.jsonl"), "--metrics-port", str(port),
    ]  # fmt: skip
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, err, scrapes = await run_scraping(cmd, env_for(emu), port, tmp_path)
    assert code == 0, err
    check_scrapes(scrapes, "send", 'dispatcher_records_total{delivery="confirmed"}')
    assert samples(scrapes[-1])["dispatcher_attempts_total"] > 0


async def test_load_serves_live_metrics(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable, "-m", "dispatcher", "load", "--workflow", "wf", "--event-type", "evt",
        "--instance-prefix", "i-", "--instance-count", "5", "--rate", "30/s",
        "--duration", "4s", "--results", str(tmp_path / "load.jsonl"),
        "--metrics-port", str(port), "--quiet",
    ]  # fmt: skip
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        code, err, scrapes = await run_scraping(cmd, env_for(emu), port, tmp_path)
    assert code == 0, err
    check_scrapes(scrapes, "load", "dispatcher_arrivals_total")
    # The profile's rate while it runs (0 once its duration is over, as the drain goes on).
    rates = [samples(s).get("dispatcher_gate_rate") for s in scrapes]
    assert 30 in rates, rates


async def test_create_serves_live_metrics(tmp_path: Path) -> None:
    port = free_port()
    async with Emulator(
        EmulatorConfig(limit=None, instances=InstanceModel(event_type="go"))
    ) as emu:
        cmd = [
            sys.executable, "-m", "dispatcher", "create", "--workflow", "wf",
            "--account-id", "acc", "--base-url", emu.base_url, "--count", "300",
            "--id-prefix", "m-", "--creation-rate", "50/s", "--rate", "1000/s",
            "--results", str(tmp_path / "c.jsonl"), "--metrics-port", str(port),
        ]  # fmt: skip
        code, err, scrapes = await run_scraping(cmd, env_for(emu), port, tmp_path)
    assert code == 0, err
    check_scrapes(scrapes, "create", 'dispatcher_instances_total{outcome="created"}')
    assert samples(scrapes[-1])["dispatcher_gate_rate"] == pytest.approx(1000)


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("command", ["send", "load", "create"])
async def test_a_port_in_use_exits_2_in_one_line(
    command: str, port_in_use: int, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    args = {
        "send": ["send", "-", "--workflow", "wf", "--rate", "unlimited", "--results", str(out)],
        "load": [
            "load", "--workflow", "wf", "--event-type", "e", "--instance-prefix", "i",
            "--instance-count", "2", "--rate", "5/s", "--duration", "1s", "--results", str(out),
        ],
        "create": ["create", "--workflow", "wf", "--account-id", "acc", "--count", "3",
                   "--results", str(out)],
    }[command]  # fmt: skip
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        result = await anyio.run_process(
            [sys.executable, "-m", "dispatcher", *args, "--metrics-port", str(port_in_use)],
            input=b'{"instance_id": "a", "event_type": "e"}\n',
            env=env_for(emu) | {"CLOUDFLARE_BASE_URL": emu.base_url},
            check=False,
        )
        received = len(emu.log.accepted)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.strip().count("\n") == 0, err
    assert f"--metrics-port {port_in_use}: cannot listen on 127.0.0.1:{port_in_use}" in err
    assert received == 0  # nothing was sent
    assert TOKEN not in err


@pytest.mark.parametrize("port", ["70000", "0", "http"])
async def test_a_port_out_of_range_exits_2_in_one_line(port: str, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "dispatcher", "send", "-", "--workflow", "wf",
        "--results", str(tmp_path / "r.jsonl"), "--metrics-port", port,
    ]  # fmt: skip
    result = await anyio.run_process(
        cmd,
        input=b"",
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.strip().count("\n") == 0, err
    assert "--metrics-port" in err


async def test_without_the_extra_one_line_and_exit_2(tmp_path: Path) -> None:
    # A prometheus_client that cannot be imported, as where the extra is not installed.
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "prometheus_client.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'prometheus_client'\", "
        "name='prometheus_client')\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update(CLOUDFLARE_API_TOKEN=TOKEN, CLOUDFLARE_ACCOUNT_ID="acc")
    cmd = [
        sys.executable, "-m", "dispatcher", "send", "-", "--workflow", "wf",
        "--results", str(tmp_path / "r.jsonl"), "--metrics-port", str(free_port()),
    ]  # fmt: skip
    result = await anyio.run_process(
        cmd,
        input=b'{"instance_id": "a", "event_type": "e"}\n',
        env=env,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.strip().count("\n") == 0, err
    assert "the 'metrics' extra" in err
    assert not (tmp_path / "r.jsonl").exists() or (tmp_path / "r.jsonl").stat().st_size == 0
