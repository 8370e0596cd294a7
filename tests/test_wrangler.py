"""The wrangler-dev and relay targets against the real runtime: ``wrangler dev`` (workerd).

One wrangler dev runs two Workers, as a user deploys them: the relay of relay/ with its
own wrangler.jsonc exactly as shipped, on the port, and the test project's Worker
(tests/wrangler_project), a Workflow whose instances wait for a "go" event and finish
with its payload, which the relay's binding reaches by ``script_name``. ``dispatcher
send`` and ``dispatcher load`` run as a user runs them, in a subprocess. Needs Node 22
and wrangler from .ci/setup.d/20-node-wrangler.sh; CI installs them, so there the tests
run, and on a machine without them they are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from factories import verify_table
from wrangler_dev import WORKFLOW, WranglerDev, require_wrangler, wrangler_dev, wrangler_fixture

SECRET = "relay-test-secret-0123456789"
N = 100  # instances per target: 200 in all, plus the probes
LOAD_N = 40  # instances per load test

require_wrangler()
wd = wrangler_fixture(SECRET)


def send(
    args: list[str],
    tmp: Path,
    *,
    secret: str | None = None,
    command: tuple[str, ...] = ("send", "--progress", "off"),
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    if secret is not None:
        env["DISPATCHER_RELAY_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *command, *args],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_events(path: Path, ids: list[str], tag: str, event_type: str = "go") -> None:
    lines = (
        {
            "workflow": WORKFLOW,
            "instance_id": i,
            "event_type": event_type,
            "body": {"id": i, "tag": tag},
        }
        for i in ids
    )
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def envelopes(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_completed_with_payloads(wd: WranglerDev, ids: list[str], tag: str) -> None:
    found = wd.wait_complete(ids)
    wrong = {
        i: s
        for i, s in found.items()
        if s["status"] != "complete" or s["output"]["payload"] != {"id": i, "tag": tag}
    }
    assert not wrong, (
        f"{len(wrong)} of {len(ids)} instances wrong, e.g. {next(iter(wrong.items()))}"
    )


def test_wrangler_dev_target_delivers_every_event(wd: WranglerDev, tmp_path: Path) -> None:
    ids = [f"wd-{n}" for n in range(N)] + ["wd-missing"]
    wd.create(ids[:-1])
    write_events(tmp_path / "events.jsonl", ids, "wd")
    done = send(["--target", "wrangler-dev", "--base-url", wd.base_url, "events.jsonl"], tmp_path)
    assert done.returncode == 1, done.stderr  # one record rejected: the missing instance
    by_id = {e["instance_id"]: e for e in envelopes(tmp_path / "results.jsonl")}
    assert {by_id[i]["delivery"] for i in ids[:-1]} == {"confirmed"}
    assert by_id["wd-missing"]["delivery"] == "rejected"
    assert by_id["wd-missing"]["error"]["code"] == 10501
    assert_completed_with_payloads(wd, ids[:-1], "wd")


def test_relay_target_delivers_every_event(wd: WranglerDev, tmp_path: Path) -> None:
    ids = [f"rl-{n}" for n in range(N)] + ["rl-missing"]
    wd.create(ids[:-1])
    write_events(tmp_path / "events.jsonl", ids, "relay")
    done = send(
        ["--target", "relay", "--base-url", wd.base_url, "--batch-size", "25", "events.jsonl"],
        tmp_path,
        secret=SECRET,
    )
    assert done.returncode == 1, done.stderr
    by_id = {e["instance_id"]: e for e in envelopes(tmp_path / "results.jsonl")}
    assert {by_id[i]["delivery"] for i in ids[:-1]} == {"confirmed"}
    assert by_id["rl-missing"]["delivery"] == "rejected"
    assert by_id["rl-missing"]["status"] == 404
    assert_completed_with_payloads(wd, ids[:-1], "relay")


def _batch(ids: list[str], tag: str) -> dict[str, object]:
    return {
        "events": [
            {"key": f"{tag}:{i}", "instance_id": i, "type": "go", "payload": {"id": i, "tag": tag}}
            for i in ids
        ]
    }


def test_resending_a_batch_delivers_nothing_twice(wd: WranglerDev, tmp_path: Path) -> None:
    # Probe instances look for a second "go" after a "check" event: a duplicate that got
    # through shows in their output.
    raw_ids = [f"probe-raw-{n}" for n in range(10)]
    cli_ids = [f"probe-cli-{n}" for n in range(10)]
    control = "probe-control"
    wd.create([*raw_ids, *cli_ids, control], params={"probe": True})
    auth = {"Authorization": f"Bearer {SECRET}"}
    first = wd.post("/events", _batch(raw_ids, "dedupe"), auth)
    again = wd.post("/events", _batch(raw_ids, "dedupe"), auth)
    assert first[0] == again[0] == 200
    assert [r["deduped"] for r in first[1]["results"]] == [False] * len(raw_ids)
    assert [r["deduped"] for r in again[1]["results"]] == [True] * len(raw_ids)
    # The dispatcher sending the same records again (same keys) is answered the same way.
    write_events(tmp_path / "events.jsonl", cli_ids, "dedupe")
    relay = ["--target", "relay", "--base-url", wd.base_url]
    done = send([*relay, "events.jsonl"], tmp_path, secret=SECRET)
    assert done.returncode == 0, done.stderr
    redo = send([*relay, "--overwrite", "events.jsonl"], tmp_path, secret=SECRET)
    assert redo.returncode == 0, redo.stderr
    assert {e["delivery"] for e in envelopes(tmp_path / "results.jsonl")} == {"confirmed"}
    # The control gets a blind second copy through the REST endpoint: the probe sees it.
    for _ in range(2):
        assert wd.rest_event(control, "go", {"id": control, "tag": "dedupe"})[0] == 200
    probes = [*raw_ids, *cli_ids, control]
    for i in probes:
        assert wd.rest_event(i, "check", {})[0] == 200
    found = wd.wait_complete(probes)
    assert found[control]["output"]["duplicate"] == {"id": control, "tag": "dedupe"}
    outputs = {i: found[i]["output"] for i in [*raw_ids, *cli_ids]}
    assert outputs == {
        i: {"payload": {"id": i, "tag": "dedupe"}, "duplicate": None} for i in outputs
    }


def test_wrong_relay_secret_gets_401_and_sends_nothing(wd: WranglerDev, tmp_path: Path) -> None:
    ids = [f"auth-{n}" for n in range(5)]
    wd.create(ids)
    status, doc = wd.post("/events", _batch(ids, "wrong"), {"Authorization": "Bearer nope"})
    assert status == 401
    assert doc["success"] is False
    write_events(tmp_path / "events.jsonl", ids, "wrong")
    done = send(
        ["--target", "relay", "--base-url", wd.base_url, "events.jsonl"], tmp_path, secret="nope"
    )
    assert done.returncode == 3, done.stderr
    assert "nope" not in done.stderr + done.stdout
    # The stop says what to check for this target: the relay's secret, not an API token.
    assert "credentials rejected (HTTP 401" in done.stderr
    assert "DISPATCHER_RELAY_SECRET" in done.stderr
    # The run stops at the first 401s; whatever envelopes it wrote say rejected.
    results = envelopes(tmp_path / "results.jsonl")
    assert results
    assert {(e["status"], e["delivery"]) for e in results} == {(401, "rejected")}
    # Nothing arrived: the instances still wait, and take the right event when it comes.
    assert all(s["status"] != "complete" for s in wd.statuses(ids).values())
    for i in ids:
        assert wd.rest_event(i, "go", {"id": i, "tag": "right"})[0] == 200
    assert_completed_with_payloads(wd, ids, "right")


# --- dispatcher load --target ---------------------------------------------------------------


def load(
    args: list[str], tmp: Path, *, secret: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`dispatcher load` of LOAD_N arrivals in 1 s: one event to each of LOAD_N instances."""
    return send(
        [
            *("--workflow", WORKFLOW, "--event-type", "go"),
            *("--rate", f"{LOAD_N}/s", "--duration", "1s", "--format", "json"),
            *args,
        ],
        tmp,
        secret=secret,
        command=("load", "--quiet"),
    )


@pytest.mark.parametrize("target", ["wrangler-dev", "relay"])
def test_load_reaches_every_instance_through_the_target(
    wd: WranglerDev, tmp_path: Path, target: str
) -> None:
    prefix = f"load-{target}-"
    ids = [f"{prefix}{n}" for n in range(LOAD_N)]
    wd.create(ids)
    done = load(
        [
            *("--target", target, "--base-url", wd.base_url),
            *("--instance-prefix", prefix, "--instance-count", str(LOAD_N)),
            *("--body", '{"from": "load"}'),
            "--threshold",
            "error_rate<1%",
        ],
        tmp_path,
        secret=SECRET if target == "relay" else None,
    )
    assert done.returncode == 0, done.stderr
    doc = orjson.loads(done.stdout)
    assert doc["load"]["sent"] == LOAD_N
    assert doc["confirmed"] == LOAD_N
    envs = envelopes(tmp_path / "load-results.jsonl")
    assert sorted(e["instance_id"] for e in envs) == sorted(ids)
    assert {e["delivery"] for e in envs} == {"confirmed"}
    found = wd.wait_complete(ids)
    wrong = {
        i: s
        for i, s in found.items()
        if s["status"] != "complete" or s["output"]["payload"] != {"from": "load"}
    }
    assert not wrong, f"{len(wrong)} of {LOAD_N} instances wrong, e.g. {next(iter(wrong.items()))}"


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


# --- the relay's dedupe covers the event, not the key alone (issue 23) -----------------------


def write_lines(path: Path, lines: list[tuple[str, str, str, str]]) -> None:
    """(id, instance, event type, tag) per line: explicit record keys."""
    docs = (
        {
            "id": k,
            "workflow": WORKFLOW,
            "instance_id": i,
            "event_type": t,
            "body": {"id": i, "tag": g},
        }
        for k, i, t, g in lines
    )
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))


def test_a_key_reused_for_another_event_is_rejected_and_sends_nothing(
    wd: WranglerDev, tmp_path: Path
) -> None:
    plain, fresh = "reuse-plain", "reuse-fresh"
    probes = ["reuse-type", "reuse-body", "reuse-same"]
    wd.create([plain, fresh])
    wd.create(probes, params={"probe": True})
    relay = ["--target", "relay", "--base-url", wd.base_url, "events.jsonl"]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    write_lines(
        first / "events.jsonl",
        [
            ("k-inst", plain, "go", "first"),
            ("k-type", "reuse-type", "go", "first"),
            ("k-body", "reuse-body", "go", "first"),
            ("k-same", "reuse-same", "go", "first"),
        ],
    )
    done = send(relay, first, secret=SECRET)
    assert done.returncode == 0, done.stderr
    # The same keys for another instance, another type, another body; and one unchanged.
    write_lines(
        second / "events.jsonl",
        [
            ("k-inst", fresh, "go", "first"),
            ("k-type", "reuse-type", "check", "first"),
            ("k-body", "reuse-body", "go", "second"),
            ("k-same", "reuse-same", "go", "first"),
        ],
    )
    done = send(relay, second, secret=SECRET)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    by_key = {e["key"]: e for e in envelopes(second / "results.jsonl")}
    assert by_key["k-same"]["delivery"] == "confirmed"
    for key in ("k-inst", "k-type", "k-body"):
        env = by_key[key]
        assert (env["delivery"], env["status"]) == ("rejected", 409), env
        assert "key_reused" in env["error"]["message"]
        assert "different parameters" in env["error"]["message"]
    # Nothing of the rejected ones arrived: the fresh instance still waits, and so does the
    # probe that would have gone on at a "check".
    time.sleep(2)
    waiting = wd.statuses([fresh, "reuse-type"])
    assert all(s["status"] != "complete" for s in waiting.values()), waiting
    assert wd.rest_event(fresh, "go", {"id": fresh, "tag": "rest"})[0] == 200
    assert_completed_with_payloads(wd, [fresh], "rest")
    assert_completed_with_payloads(wd, [plain], "first")
    # Each probe got its first "go" once: no second copy (not the same, not another body).
    for i in probes:
        assert wd.rest_event(i, "check", {})[0] == 200
    found = wd.wait_complete(probes)
    assert {i: found[i]["output"] for i in probes} == {
        i: {"payload": {"id": i, "tag": "first"}, "duplicate": None} for i in probes
    }


def test_a_batch_size_over_the_relays_max_batch_stops_and_resume_finishes(
    wd: WranglerDev, tmp_path: Path
) -> None:
    # The relay's MAX_BATCH is 100 (relay/wrangler.jsonc); --batch-size 150 cannot work.
    ids = [f"big-{n}" for n in range(300)]
    wd.create(ids)
    write_events(tmp_path / "events.jsonl", ids, "big")
    relay = ["--target", "relay", "--base-url", wd.base_url]
    done = send([*relay, "--batch-size", "150", "events.jsonl"], tmp_path, secret=SECRET)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert "--batch-size" in done.stderr
    assert "MAX_BATCH" in done.stderr
    results = envelopes(tmp_path / "results.jsonl")
    # A batch the relay refused sent nothing: stopped, for --resume. (A batch that left
    # with fewer events than MAX_BATCH before the stop went through: confirmed.)
    fates = {(e["delivery"], (e["error"] or {}).get("kind")) for e in results}
    assert ("rejected", "stopped") in fates
    assert fates <= {("rejected", "stopped"), ("confirmed", None)}
    # Resumed with a batch size the relay takes, each is delivered once.
    done = send(
        [*relay, "--batch-size", "100", "--resume", "events.jsonl"], tmp_path, secret=SECRET
    )
    assert done.returncode == 0, done.stderr
    final = {e["key"]: e for e in envelopes(tmp_path / "results.jsonl")}
    assert len(final) == len(ids)
    assert {e["delivery"] for e in final.values()} == {"confirmed"}
    assert_completed_with_payloads(wd, ids, "big")


# --- dispatcher create through the relay and wrangler dev (issue 24) --------------------------


def create(
    args: list[str], tmp: Path, *, secret: str | None = None
) -> subprocess.CompletedProcess[str]:
    return send(
        ["--workflow", WORKFLOW, "--results", "created.jsonl", *args],
        tmp,
        secret=secret,
        command=("create",),
    )


def created(tmp: Path, name: str = "created.jsonl") -> dict[str, dict[str, Any]]:
    """Each instance's last envelope of a create results file."""
    return {e["instance_id"]: e for e in envelopes(tmp / name) if e["outcome"] != "pending"}


def relay_status(wd: WranglerDev, ids: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for n in range(0, len(ids), 100):
        status, doc = wd.post(
            "/status", {"ids": ids[n : n + 100]}, {"Authorization": f"Bearer {SECRET}"}
        )
        assert status == 200, doc
        found.update((r["id"], r) for r in doc["results"])
    return found


def test_create_through_the_relay_makes_each_instance_once(wd: WranglerDev, tmp_path: Path) -> None:
    relay = ["--target", "relay", "--relay-url", wd.base_url]
    args = [*relay, "--count", "200", "--id-prefix", "cr-", "--creation-rate", "1000/s"]
    done = create(args, tmp_path, secret=SECRET)
    assert done.returncode == 0, done.stderr
    first = created(tmp_path)
    ids = sorted(first)
    assert len(ids) == 200
    assert {e["outcome"] for e in first.values()} == {"created"}
    assert "2 request(s)" in done.stderr  # two POST /create of 100
    # A rerun (--resume) creates nothing new; a fresh results file finds all 200 taken.
    again = create([*args, "--resume"], tmp_path, secret=SECRET)
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stderr
    assert "0 request(s)" in again.stderr
    fresh = create([*args, "--overwrite"], tmp_path, secret=SECRET)
    assert fresh.returncode == 0, fresh.stderr
    assert {e["outcome"] for e in created(tmp_path).values()} == {"exists"}
    # The relay's /status reads all 200 back; the explorer agrees they exist.
    found = relay_status(wd, ids)
    assert set(found) == set(ids)
    assert {r["status"] for r in found.values()} <= {"queued", "running", "waiting"}
    assert "missing" not in {s["status"] for s in wd.statuses(ids).values()}
    # Each is a live instance waiting for its "go": a few take one and complete with it,
    # as /status shows (its output).
    taken = ids[:10]
    write_events(tmp_path / "events.jsonl", taken, "created")
    sent = send(["--target", "relay", "--base-url", wd.base_url, "events.jsonl"], tmp_path,
                secret=SECRET)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert_completed_with_payloads(wd, taken, "created")
    outputs = {i: r.get("output") for i, r in relay_status(wd, taken).items()}
    assert outputs == {i: {"payload": {"id": i, "tag": "created"}} for i in taken}


def test_relay_status_and_create_answer_per_item(wd: WranglerDev) -> None:
    auth = {"Authorization": f"Bearer {SECRET}"}
    wd.create(["st-here"])
    status, doc = wd.post(
        "/create",
        {
            "instances": [
                {"instance_id": "st-new", "params": {"probe": False}},
                {"instance_id": "st-here"},
                {"instance_id": "st-new"},
                {"instance_id": "bad id"},
            ]
        },
        auth,
    )
    assert status == 200, doc
    assert [(r["instance_id"], r["outcome"]) for r in doc["results"]] == [
        ("st-new", "created"),
        ("st-here", "exists"),
        ("st-new", "invalid"),
        ("bad id", "invalid"),
    ]
    assert doc["results"][1]["code"] == 10405
    assert doc["results"][2]["code"] == 10415
    found = relay_status(wd, ["st-new", "st-here", "st-nowhere"])
    assert found["st-new"]["status"] in {"queued", "running", "waiting"}
    assert found["st-nowhere"]["code"] == "not_found"
    # The same secret and limits as /events.
    assert wd.post("/status", {"ids": ["st-new"]}, {"Authorization": "Bearer no"})[0] == 401
    over = wd.post("/create", {"instances": [{"instance_id": f"o{n}"} for n in range(101)]}, auth)
    assert over[0] == 413
    assert over[1]["limits"]["max_batch"] == 100
    assert relay_status(wd, ["o0"])["o0"]["code"] == "not_found"  # nothing of it was made


@pytest.mark.parametrize("target", ["relay", "wrangler-dev"])
def test_create_resume_reads_pending_ids_back_and_creates_only_the_missing(
    wd: WranglerDev, tmp_path: Path, target: str
) -> None:
    # A run killed with a batch in flight: its ids are pending, some made, some not.
    prefix = f"lost-{target}-"
    ids = [f"{prefix}{n}" for n in range(1, 7)]
    wd.create(ids[:3])
    lines = [{"instance_id": i, "workflow": WORKFLOW, "outcome": "pending"} for i in ids]
    (tmp_path / "created.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    where = (
        ["--target", "relay", "--relay-url", wd.base_url]
        if target == "relay"
        else ["--target", "wrangler-dev", "--base-url", wd.base_url]
    )
    done = create(
        [*where, "--count", "6", "--id-prefix", prefix, "--resume"],
        tmp_path,
        secret=SECRET if target == "relay" else None,
    )
    assert done.returncode == 0, done.stderr
    final = created(tmp_path)
    assert {i: e["outcome"] for i, e in final.items()} == dict.fromkeys(ids, "created")
    # The three that existed were read back, not created again (which would say exists).
    assert [final[i].get("reason") for i in ids[:3]] == ["read back after a lost answer"] * 3
    assert [final[i].get("reason") for i in ids[3:]] == [None] * 3
    assert "missing" not in {s["status"] for s in wd.statuses(ids).values()}


def test_create_through_wrangler_dev_one_by_one(wd: WranglerDev, tmp_path: Path) -> None:
    src = tmp_path / "few.csv"
    src.write_text('instance_id,params\nwdc-1,"{""probe"": false}"\nwdc-2,\nwdc-3,\n')
    where = ["--target", "wrangler-dev", "--base-url", wd.base_url]
    done = create([*where, str(src)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert {i: e["outcome"] for i, e in created(tmp_path).items()} == {
        "wdc-1": "created",
        "wdc-2": "created",
        "wdc-3": "created",
    }
    assert "3 request(s)" in done.stderr  # no batch route: one POST each
    again = create([*where, "--overwrite", str(src)], tmp_path)
    assert again.returncode == 0, again.stderr
    assert {e["outcome"] for e in created(tmp_path).values()} == {"exists"}
    found = wd.statuses(["wdc-1", "wdc-2", "wdc-3"])
    assert "missing" not in {s["status"] for s in found.values()}
    assert found["wdc-1"]["params"] == {"probe": False}


def test_create_through_the_relay_with_a_wrong_secret_stops_at_once(
    wd: WranglerDev, tmp_path: Path
) -> None:
    args = ["--target", "relay", "--relay-url", wd.base_url, "--count", "3", "--id-prefix", "ws-"]
    done = create(args, tmp_path, secret="not-the-secret")
    assert done.returncode == 3, done.stderr
    assert "credentials rejected (HTTP 401" in done.stderr
    assert "DISPATCHER_RELAY_SECRET" in done.stderr
    assert "not-the-secret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert relay_status(wd, ["ws-1"])["ws-1"]["code"] == "not_found"
    # No secret at all: exit 2, one line naming where to put it.
    missing_secret = create(args, tmp_path)
    assert missing_secret.returncode == 2
    assert "DISPATCHER_RELAY_SECRET" in missing_secret.stderr
    assert len(missing_secret.stderr.strip().splitlines()) == 1


def test_loop_create_select_send_verify_then_a_wrong_type(tmp_path: Path) -> None:
    """Issue 24's loop on a wrangler dev of its own (the module's one holds other tests'
    instances, which a listing would select too): 200 created through the relay, the
    waiting ones selected by dispatcher's own listing through wrangler dev, sent, verified
    all consumed; then a wrong type to 20 new ones, verified not consumed, exit 1."""
    with wrangler_dev(SECRET) as fresh:
        relay = ["--target", "relay", "--relay-url", fresh.base_url, "--creation-rate", "1000/s"]
        done = create([*relay, "--count", "200", "--id-prefix", "loop-"], tmp_path, secret=SECRET)
        assert done.returncode == 0, done.stderr
        ids = sorted(created(tmp_path))
        assert len(ids) == 200
        assert {e["outcome"] for e in created(tmp_path).values()} == {"created"}
        fresh.wait_waiting(ids)  # each one is parked in its wait for "go"
        where = ["--target", "wrangler-dev", "--base-url", fresh.base_url]
        sent = send(
            [*where, "--instances-of", WORKFLOW, "--waiting-for", "go", "--event-type", "go",
             "--body", '{"tag": "loop"}', "--results", "loop.jsonl"],
            tmp_path,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        confirmed = {e["instance_id"] for e in envelopes(tmp_path / "loop.jsonl")
                     if e["delivery"] == "confirmed"}  # fmt: skip
        assert confirmed == set(ids)
        checked = send(["loop.jsonl", *where, "--wait-up-to", "60s"], tmp_path,
                       command=("verify",))  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert verify_table(checked.stdout)["consumed"] == 200
        lines = envelopes(tmp_path / "loop.verify.jsonl")
        assert {line["instance_id"] for line in lines} == set(ids)
        assert {line["class"] for line in lines} == {"consumed"}

        # A wrong event type to 20 new instances: confirmed by the API, used by nobody.
        other = tmp_path / "wrong"
        other.mkdir()
        done = create([*relay, "--count", "20", "--id-prefix", "wrong-"], other, secret=SECRET)
        assert done.returncode == 0, done.stderr
        wrong_ids = sorted(created(other))
        assert len(wrong_ids) == 20
        fresh.wait_waiting(wrong_ids)
        write_events(other / "events.jsonl", wrong_ids, "wrong", event_type="stop")
        sent = send([*where, "events.jsonl", "--results", "wrong.jsonl"], other)
        assert sent.returncode == 0, sent.stderr
        checked = send(["wrong.jsonl", *where], other, command=("verify",))
        assert checked.returncode == 1, checked.stdout + checked.stderr
        lines = envelopes(other / "wrong.verify.jsonl")
        assert {line["instance_id"] for line in lines} == set(wrong_ids)
        assert {line["class"] for line in lines} <= {"no_waiter", "waiting"}
        assert verify_table(checked.stdout).get("consumed", 0) == 0
