"""Every command, given a mistake, says so in one line with exit 2: never a traceback.

One place (``commands.cli.main``) turns the project's errors into that line; these run
the real entry point in-process with bad input for every command, and the broken-pipe
case in a child process, as a shell pipeline would.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from dispatcher.commands.cli import main
from dispatcher.results.sinks import ResultsPathError, check_results_path

GOOD = b'{"workflow":"wf","instance_id":"a","event_type":"e"}\n'


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "tok-secret-1")
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", "acc")
    # Nothing listens there: a case that got as far as sending would fail differently.
    monkeypatch.setenv("CLOUDFLARE_BASE_URL", "http://127.0.0.1:9/client/v4")
    (tmp_path / "good.jsonl").write_bytes(GOOD)
    (tmp_path / "ids.txt").write_bytes(b"a\nb\n")
    (tmp_path / "headless.csv").write_bytes(b"id,foo\n1,2\n")
    (tmp_path / "corrupt.jsonl").write_bytes(b'{"key": 1}\nnot json\n')
    conn = sqlite3.connect(tmp_path / "foreign.sqlite")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    (tmp_path / "notdb.sqlite").write_bytes(b"hello, not a database\n" * 10)
    (tmp_path / "earlier.jsonl").write_bytes(GOOD)
    (tmp_path / "bad.toml").write_bytes(b"rate = [\n")
    (tmp_path / "exports").mkdir()  # a folder without an extension
    (tmp_path / "exports.jsonl").mkdir()  # and one with
    return tmp_path


LOAD = ["load", "--workflow", "wf", "--event-type", "e", "--instance-prefix", "i"]
LOAD += ["--instance-count", "2", "--rate", "5/s"]

CASES: list[tuple[list[str], str]] = [
    (["send", "ids.txt", "--workflow", "wf"], "ids.txt: an id list needs --event-type"),
    (["send", "headless.csv"], "headless.csv: the CSV header has no instance_id column"),
    (["send", "good.jsonl", "headless.csv"], "headless.csv: the CSV header has no instance_id"),
    (["send", "good.jsonl", "ids.txt", "--workflow", "wf"], "ids.txt: an id list needs"),
    (["send", "good.jsonl", "missing.jsonl"], "missing.jsonl: cannot open"),
    (["send", "good.jsonl", "--results", "nodir/r.jsonl"], "folder"),
    (["send", "good.jsonl", "--results", "nodir/r.sqlite"], "does not exist"),
    (["send", "good.jsonl", "--results", "corrupt.jsonl", "--resume"], "corrupt.jsonl:1"),
    (["send", "good.jsonl", "--results", "foreign.sqlite", "--resume"], "not dispatcher results"),
    (["send", "good.jsonl", "--results", "notdb.sqlite", "--resume"], "not a database"),
    (["send", "good.jsonl", "--results", "earlier.jsonl"], "already holds results"),
    (["send", "good.jsonl", "--event-type", "x"], "--event-type applies only to id lists"),
    (["send", "good.jsonl", "--body", "1"], "--body applies only to id lists"),
    (["send", "good.jsonl", "--workf", "wf"], "did you mean --workflow"),
    (["send", "good.jsonl", "--config", "bad.toml"], "bad.toml: not valid TOML"),
    (["send", "good.jsonl", "--rate", "fast"], "--rate: invalid rate 'fast'"),
    (["report", "missing.jsonl"], "missing.jsonl"),
    (["report", "corrupt.jsonl"], "corrupt.jsonl:1"),
    (["report", "good.jsonl", "--threshold", "p99<<1"], "p99<<1"),
    (["report", "good.jsonl", "--topp", "3"], "did you mean --top"),
    # The command's own parser says it, and points to the command's --help.
    (["send", "good.jsonl", "--bogus"], "dispatcher send: error: unrecognized arguments"),
    (["send", "good.jsonl", "--concurrenc", "3"], "(see: dispatcher send --help)"),
    (["load", "--bogus"], "dispatcher load: error: unrecognized arguments: --bogus"),
    (["load", "--workflow", "wf", "--event-type", "e"], "instance"),
    (["load", "--workflow", "wf", "--event-type", "e", "--instances", "no.txt", "--rate", "1"], ""),
    (
        [*LOAD, "--results", "nodir/x.jsonl"],
        "nodir/x.jsonl: the folder",
    ),
    (
        [*LOAD, "--results", "earlier.jsonl"],
        "pass --overwrite to replace it",
    ),
    (["demo", "--instances", "0"], "--instances must be at least 1"),
    (["sen", "x"], "did you mean send?"),
    (["emulate", "--fault", "nonsense"], "nonsense"),
    (["emulate", "--port", "99999"], "'99999' is not a port"),
    (["send", "good.jsonl", "--target", "moon"], "invalid choice: 'moon'"),
    (["load", "--workflow", "wf", "--event-type", "e", "--target", "moon"], "'moon'"),
    (["send", "good.jsonl", "--results", "."], "is a folder"),
    (["send", "good.jsonl", "--token-file", "missing.txt"], "--token-file"),
    (["send", "good.jsonl", "./good.jsonl"], "./good.jsonl: given twice (as good.jsonl)"),
    (["send", "--dry-run", "good.jsonl", "good.jsonl"], "good.jsonl: given twice"),
    (["send", "exports"], "exports: is a folder"),
    (["send", "exports.jsonl"], "exports.jsonl: is a folder"),
    (["send", "exports", "--format", "ids", "--workflow", "wf", "--event-type", "e"], "a folder"),
    (["send", "--dry-run", "exports"], "exports: is a folder"),
    (["report", "exports"], "exports: is a folder"),
    ([*LOAD[:5], "--instances", "exports", "--rate", "1"], "exports"),
    # A value that starts with '-' reaches the flag's own check (argparse said "expected
    # one argument").
    ([*LOAD, "--duration", "-5s"], "--duration: invalid duration '-5s': must not be negative"),
    ([*LOAD, "--duration=-5s"], "invalid duration '-5s'"),
    ([*LOAD[:-1], "-4/s"], "invalid rate '-4/s'"),
    (["send", "good.jsonl", "--rate", "-3/s"], "--rate: invalid rate '-3/s'"),
    (["send", "good.jsonl", "--concurrency", "-3"], "--concurrency: must be"),
    (["nosuchcommand"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(a) or "-" for a, _ in CASES])
def test_a_mistake_is_one_line_and_exit_2(
    folder: Path, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    try:
        code: object = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 2, err
    # One line, argparse's usage errors included (no usage block above it).
    assert err.count("\n") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dispatcher"), err
    assert expected in last, err
    assert "tok-secret-1" not in err
    # Nothing was created or changed: no empty results file left behind.
    assert {p.name: p.stat().st_size for p in folder.iterdir()} == before


def test_an_error_inside_the_run_is_one_line_too(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Raised while the run builds its client, inside the task groups: the CLI still
    # unwraps it to its one line.
    monkeypatch.setenv("CLOUDFLARE_BASE_URL", "https://127.0.0.1:9/client/v4")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    code = main(["send", "good.jsonl", "--results", "r.jsonl"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "dispatcher send: error: HTTPS_PROXY: only http://host:port proxies are supported "
        "(got a socks5:// URL)"
    )


def test_read_only_results_are_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(GOOD)
    # As root every file is writable, so ask os.access the way a normal user's would answer.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode)
    )
    for flag in ("resume", "overwrite"):
        with pytest.raises(ResultsPathError, match="the file is read-only"):
            check_results_path(str(path), resume=flag == "resume", overwrite=flag == "overwrite")


def test_report_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    line = {
        "source": "s",
        "workflow": "wf",
        "event_type": "e",
        "ok": True,
        "status": 200,
        "attempts": 1,
        "delivery": "confirmed",
        "error": None,
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:00:01+00:00",
        "latency_ms": 5.0,
        "elapsed_ms": 5.0,
    }
    results.write_bytes(
        b"".join(
            orjson.dumps({**line, "key": f"k{i}", "line": i + 1, "instance_id": f"i{i}"}) + b"\n"
            for i in range(3000)
        )
    )
    shell = f"{sys.executable} -m dispatcher report {results} --format json --top 3000 | head -2"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in done.stderr
    assert "BrokenPipe" not in done.stderr
    assert done.stdout.splitlines() == ["{", '  "runs": [']
    assert done.returncode == 141  # what a Unix tool stopped by SIGPIPE reports
