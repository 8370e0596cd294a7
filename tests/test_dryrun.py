"""`dispatcher send --dry-run`: everything checked, nothing sent, credentials never shown."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import anyio
import orjson
import pytest

from dispatcher.commands.cli import build_parser, main
from dispatcher.commands.dryrun import dry_run, format_seconds
from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.inputs.records import KeyDeriver, read_batches
from dispatcher.model import Delivery, Envelope
from dispatcher.results.sinks import encode
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings, parse_rate

TOKEN = "tok-dry-SECRET-77aa01"


def events_file(tmp_path: Path) -> Path:
    lines = [
        {"instance_id": "order-1", "event_type": "approval", "body": {"approved": True}},
        {"instance_id": "order-2", "event_type": "approval", "body": {"approved": False}},
        {"instance_id": "bad id!", "event_type": "approval"},
        {"instance_id": "order-3", "event_type": "payment", "workflow": "billing"},
        {"event_type": "approval"},
    ]
    raw = b"".join(orjson.dumps(x) + b"\n" for x in lines) + b"{not json\n"
    path = tmp_path / "events.jsonl"
    path.write_bytes(raw)
    return path


def settings(inputs: tuple[str, ...], base_url: str, **kw: object) -> SendSettings:
    values: dict[str, object] = {
        "inputs": inputs,
        "workflow": "orders",
        "account_id": "acc-1",
        "base_url": base_url,
        "credentials": Credentials(token=TOKEN),
        "rate": parse_rate("4/s"),
    }
    values.update(kw)
    return SendSettings(**values)  # type: ignore[arg-type]


async def test_dry_run_sends_nothing_and_shows_what_would_go(tmp_path: Path) -> None:
    path = events_file(tmp_path)
    async with Emulator(EmulatorConfig(limit=None)) as emu:
        out = io.StringIO()
        code = await anyio.to_thread.run_sync(dry_run, settings((str(path),), emu.base_url), out)
        await anyio.sleep(0.05)
        assert emu.log.total_requests() == 0
    text = out.getvalue()
    assert code == 1  # some lines are invalid
    assert "nothing was sent" in text
    assert "6 read: 3 to send, 3 invalid" in text
    # Counts by workflow and event type.
    assert [line.split() for line in text.splitlines() if line.startswith("  orders  ")] == [
        ["orders", "approval", "2"]
    ]
    assert any(line.split() == ["billing", "payment", "1"] for line in text.splitlines())
    # Invalid lines with file:line and why.
    assert f"{path}:3  [instance_id_pattern]" in text
    assert f"{path}:5  [missing_field]" in text
    assert f"{path}:6  [bad_json]" in text
    # The first requests as they would go out, credential redacted.
    assert (
        f"POST {emu.base_url}/accounts/acc-1/workflows/orders/instances/order-1/events/approval"
        in text
    )
    assert "Authorization: Bearer <redacted>" in text
    assert "Content-Type: application/json" in text
    assert 'body: {"approved":true}' in text
    assert text.count("\n  POST ") == 3
    assert "body: (no body)" in text  # order-3 has none
    assert TOKEN not in text
    assert "about 0.8s for 3 requests at 4/s" in text


def test_all_valid_exits_0_and_estimates_the_time(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"inst-{k}\n" for k in range(1200)))
    out = io.StringIO()
    s = settings((str(ids),), "https://api.cloudflare.com/client/v4", event_type="go")
    assert dry_run(s, out) == 0
    text = out.getvalue()
    assert "1,200 read: 1,200 to send, 0 invalid" in text
    assert "about 5m00s for 1,200 requests at 4/s" in text
    assert "warning" not in text


def test_legacy_credentials_are_redacted_and_fast_rates_warned(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\n")
    s = settings(
        (str(ids),),
        "https://api.cloudflare.com/client/v4",
        event_type="go",
        credentials=Credentials(email="ops@example.com", api_key="key-SECRET-123"),
        rate=parse_rate("50/s"),
    )
    out = io.StringIO()
    assert dry_run(s, out) == 0
    text = out.getvalue()
    assert "X-Auth-Email: <redacted>" in text
    assert "X-Auth-Key: <redacted>" in text
    assert "key-SECRET-123" not in text
    assert "ops@example.com" not in text
    assert "above Cloudflare's global limit" in text


def test_unlimited_rate_says_what_the_time_depends_on(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\n")
    s = settings((str(ids),), "http://127.0.0.1:9", event_type="go", rate="unlimited")
    out = io.StringIO()
    dry_run(s, out)
    assert "depends on the API's latency and --concurrency 8" in out.getvalue()


def test_resume_counts_what_would_be_skipped(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\nc\n")
    results = tmp_path / "results.jsonl"
    # A first run confirmed a record; its key is what a fresh read of the file derives.
    s = settings((str(ids),), "http://127.0.0.1:9", event_type="go", results=str(results))
    first = next(read_batches(str(ids), "ids", runner.read_options(s), KeyDeriver()))[0]
    now = datetime.now(UTC)
    done = Envelope(
        key=first.key, source=str(ids), line=1, workflow="orders", instance_id="a",
        event_type="go", ok=True, status=200, attempts=1, delivery=Delivery.CONFIRMED,
        error=None, started_at=now, finished_at=now, latency_ms=5.0, elapsed_ms=5.0,
    )  # fmt: skip
    results.write_bytes(encode(done))
    out = io.StringIO()
    resumed = settings(
        (str(ids),), "http://127.0.0.1:9", event_type="go", results=str(results), resume=True
    )
    assert dry_run(resumed, out) == 0
    text = out.getvalue()
    assert "3 read: 2 to send, 0 invalid, 1 skipped by --resume" in text
    assert "skipped    1 confirmed" in text


def test_format_seconds() -> None:
    assert format_seconds(0.8) == "0.8s"
    assert format_seconds(42) == "42s"
    assert format_seconds(300) == "5m00s"
    assert format_seconds(7380) == "2h03m"
    assert format_seconds(3 * 86400 + 4 * 3600) == "3d04h"


def test_send_cli_wiring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell command behaves like dry_run()."""
    assert build_parser().parse_args(["send", "x.txt", "--dry-run"]).dry_run is True
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acc")
    code = main(["send", str(ids), "--workflow", "wf", "--event-type", "e", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Authorization: Bearer <redacted>" in out
    assert TOKEN not in out


def test_files_may_come_after_the_flags_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `send a.txt --workflow wf b.txt`: both files are read (argparse alone takes b.txt for
    # an unrecognized argument once a flag has come between them).
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{name[0]}-1\n{name[0]}-2\n")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acc")
    monkeypatch.chdir(tmp_path)
    code = main(["send", "a.txt", "--workflow", "wf", "b.txt", "--event-type", "e", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 read: 4 to send, 0 invalid" in out


def test_a_preview_needs_no_credentials_and_says_what_a_real_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("a-1\nbad id!\na-2\n")
    for name in ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_EMAIL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    code = main(["send", "ids.txt", "--workflow", "wf", "--event-type", "e", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 1  # one invalid line: documented in the README's Dry run section
    assert captured.err == ""
    assert "3 read: 2 to send, 1 invalid" in captured.out
    assert "/accounts/ACCOUNT_ID/workflows/wf/instances/a-1/events/e" in captured.out
    needs = [line for line in captured.out.splitlines() if "a real run also needs" in line]
    assert len(needs) == 2
    assert "CLOUDFLARE_API_TOKEN" in needs[0]
    assert "--account-id" in needs[1]
    # A real run still refuses, naming what is missing.
    assert main(["send", "ids.txt", "--workflow", "wf", "--event-type", "e"]) == 2
    assert "credentials" in capsys.readouterr().err


def test_a_preview_with_credentials_says_nothing_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ids.txt").write_text("a-1\n")
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acc")
    monkeypatch.chdir(tmp_path)
    assert main(["send", "ids.txt", "--workflow", "wf", "--event-type", "e", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a real run also needs" not in out
    assert "/accounts/acc/" in out
