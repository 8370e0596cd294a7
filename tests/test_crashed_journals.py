"""Crashed runs' journals settled on resume: one ``unknown`` envelope per record in doubt,
however many journals name it (a run that crashed while settling an earlier one's)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dispatcher.model import Envelope, Event
from dispatcher.results.journal import Journal
from dispatcher.run import runner


def _event(i: int) -> Event:
    return Event(
        key=f"k{i}", source="in.jsonl", line=i, workflow="wf", instance_id=f"i{i}",
        event_type="go", body=None,
    )  # fmt: skip


class _Collect:
    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def write(self, env: Envelope) -> None:
        self.envelopes.append(env)


def test_a_record_named_by_two_crashed_journals_gets_one_unknown_envelope(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"")
    for path, events in ((f"{out}.inflight", [0, 1]), (f"{out}.inflight.1", [1, 2])):
        journal = Journal(path, results=str(out))
        for i in events:
            journal.mark(_event(i))
        journal.close(delete=False)  # a crash: the journal stays
    sink = _Collect()
    settings: Any = SimpleNamespace(results=str(out))
    count, unreadable = runner.settle_crashed_run(settings, sink, {})  # type: ignore[arg-type]
    keys = sorted(env.key for env in sink.envelopes)
    assert keys == ["k0", "k1", "k2"]
    assert count == 3
    assert unreadable == 0
    assert {env.delivery.value for env in sink.envelopes} == {"unknown"}
