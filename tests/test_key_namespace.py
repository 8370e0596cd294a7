"""Derived keys never collide with explicit ids, nor with each other.

The example of issue 23: ids ``k``, ``k``, ``k#2``. The second line (a repeated id) is
invalid and is keyed ``k#2``, which was also the third line's key: one envelope stood for
two records, and after a resume ``report`` showed 100% confirmed while a record was never
sent. Now an explicit id in the derived namespace is refused (``id_reserved``), so no
input can make two records share a key.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import anyio
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.inputs.keys import KeyDeriver, is_derived
from dispatcher.inputs.records import ReadOptions, read_batches
from dispatcher.model import Event, Invalid, Record

TOKEN = "tok-key-namespace-7d1e"
OPTIONS = ReadOptions(workflow="wf")
HEX20 = "0123456789abcdef0123"

# Ids picked to hit every form a derived key takes, and plain ones around them.
ids = st.one_of(
    st.none(),
    st.sampled_from(
        ["k", "k#1", "k#2", "k#3", "k#01", "a#b", "#1", "x", HEX20, f"raw-{HEX20}", f"{HEX20}#1"]
    ),
    st.text(alphabet="k#12ab-", min_size=1, max_size=6),
    st.integers(min_value=0, max_value=30),
)
lines = st.lists(
    st.tuples(
        ids,
        st.sampled_from(["valid", "missing_field", "bad_json", "bad_instance"]),
        st.sampled_from(["i1", "i2"]),
    ),
    max_size=30,
)


def _line(explicit: object, kind: str, instance: str) -> bytes:
    if kind == "bad_json":
        return b'{"instance_id": "i1", "event_type": \n'
    obj: dict[str, object] = {"instance_id": instance, "event_type": "e"}
    if explicit is not None:
        obj["id"] = explicit
    if kind == "missing_field":
        del obj["event_type"]
    if kind == "bad_instance":
        obj["instance_id"] = "not/valid"
    return orjson.dumps(obj) + b"\n"


def read(data: bytes) -> list[Record]:
    batches = read_batches("-", "jsonl", OPTIONS, KeyDeriver(), stdin=io.BytesIO(data))
    return [record for batch in batches for record in batch]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_no_two_records_of_a_run_share_a_key(spec: list[tuple[object, str, str]]) -> None:
    records = read(b"".join(_line(*piece) for piece in spec))
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys), keys
    for record in records:
        if isinstance(record, Event) and not is_derived(record.key):
            continue  # an explicit id, verbatim
        # Everything else is in the derived namespace, which no explicit id may enter.
        assert is_derived(record.key) or isinstance(record, Invalid), record


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_derived_keys_copied_into_ids_cannot_take_another_records_key(
    spec: list[tuple[object, str, str]],
) -> None:
    # A user who builds an input from a results file, each record's key as its id.
    first = read(b"".join(_line(*piece) for piece in spec))
    copied = b"".join(
        orjson.dumps({"id": r.key, "instance_id": "i1", "event_type": "e"}) + b"\n" for r in first
    )
    records = read(b"".join(_line(*piece) for piece in spec) + copied)
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys)


def test_the_example_gets_three_keys_and_says_why() -> None:
    data = b"".join(_line(i, "valid", f"i{n}") for n, i in enumerate(["k", "k", "k#2"]))
    first, second, third = read(data)
    assert isinstance(first, Event)
    assert first.key == "k"
    assert isinstance(second, Invalid)
    assert second.rule == "duplicate_id"
    assert isinstance(third, Invalid)
    assert third.rule == "id_reserved"
    assert "'k#2'" in third.message
    assert len({first.key, second.key, third.key}) == 3


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "dispatcher", *args], env=env, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_send_resume_report_of_the_example_count_every_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(_line(i, "valid", f"i{n}") for n, i in enumerate(["k", "k", "k#2"])))
    out = tmp_path / "r.jsonl"
    async with Emulator(EmulatorConfig(tokens=(TOKEN,), limit=None)) as emu:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
        env.update(
            CLOUDFLARE_API_TOKEN=TOKEN,
            CLOUDFLARE_ACCOUNT_ID="acc",
            CLOUDFLARE_BASE_URL=emu.base_url,
        )
        base = ("send", str(src), "--workflow", "wf", "--results", str(out), "--progress", "off")
        code, _, err = await _cli(*base, env=env)
        assert code == 1, err  # two lines are invalid
        assert emu.log.total_requests() == 1
        code, _, err = await _cli(*base, "--resume", env=env)
        assert code == 1, err
        assert "Traceback" not in err
        assert emu.log.total_requests() == 1  # nothing sent again, nothing new
        code, report, err = await _cli("report", str(out), env=env)
        assert "Traceback" not in err
    finals: dict[str, dict[str, object]] = {}
    for raw in out.read_bytes().splitlines():
        env_ = orjson.loads(raw)
        finals[env_["key"]] = env_
    assert len(finals) == 3
    by_line = {e["line"]: e for e in finals.values()}
    assert by_line[1]["delivery"] == "confirmed"
    assert by_line[2]["delivery"] == "not_sent"
    assert by_line[3]["delivery"] == "not_sent"
    assert "records    3: 1 confirmed (33.3%), 2 not" in report
    assert "in.jsonl:2: [duplicate_id]" in report
    assert "in.jsonl:3: [id_reserved] id 'k#2'" in report
