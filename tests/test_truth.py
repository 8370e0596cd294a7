"""The truth table: docs/results.md shows the code's table, and every example row holds.

Also the pieces that feed it: the success check, redaction, a 503's Retry-After.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict

from dispatcher.clients.base import Redactor, is_success_envelope, outcome_from_response
from dispatcher.model import Delivery, ErrorKind, Event, Invalid, Outcome
from dispatcher.results import envelopes
from dispatcher.results.envelopes import (
    TRUTH_TABLE,
    History,
    Rule,
    Seen,
    for_history,
    render_table,
    rule_for,
    seen_of,
)
from dispatcher.results.sinks import encode
from dispatcher.sending.policy import Retry, RetryPolicy

DOC = Path(__file__).resolve().parent.parent / "docs" / "results.md"

EVENT = Event(
    key="k", source="t", line=1, workflow="wf", instance_id="i", event_type="e", body=None
)

# One real outcome per kind of attempt, as the clients report them.
OUTCOMES: dict[Seen, Outcome] = {
    Seen.SUCCESS: Outcome(status=200, ok=True, sent=True, latency_s=0.01),
    Seen.IN_DOUBT: Outcome(
        status=200,
        ok=False,
        sent=True,
        latency_s=0.01,
        error_kind=ErrorKind.HTTP,
        message="HTML",
        in_doubt=True,
    ),
    Seen.NO_ANSWER: Outcome(
        status=None, ok=False, sent=True, latency_s=1.0, error_kind=ErrorKind.TIMEOUT
    ),
    Seen.ERROR: Outcome(
        status=503, ok=False, sent=True, latency_s=0.01, error_kind=ErrorKind.HTTP, message="x"
    ),
    Seen.NOT_CONNECTED: Outcome(
        status=None, ok=False, sent=False, latency_s=0.0, error_kind=ErrorKind.CONNECT
    ),
}


def test_docs_show_the_codes_table() -> None:
    text = DOC.read_text()
    found = re.search(r"<!-- truth-table:[^>]*-->\n(.*?)\n<!-- /truth-table -->", text, re.S)
    assert found is not None, "docs/results.md lost its truth-table markers"
    assert found[1] == render_table()


EXAMPLES = [
    (rule, attempts, stopped) for rule in TRUTH_TABLE for attempts, stopped in rule.examples
]


@pytest.mark.parametrize(
    ("rule", "attempts", "stopped"),
    EXAMPLES,
    ids=[f"{'+'.join(a) or 'none'}{'+stop' if s else ''}" for _, a, s in EXAMPLES],
)
def test_every_example_gets_its_rows_envelope(
    rule: Rule, attempts: tuple[Seen, ...], stopped: bool
) -> None:
    assert rule_for(frozenset(attempts), stopped) is rule
    history = History()
    for seen in attempts:
        outcome = OUTCOMES[seen]
        assert seen_of(outcome) is seen
        history.add(outcome)
    env = for_history(
        EVENT,
        history,
        finished_at=datetime.now(UTC),
        elapsed_s=0.0,
        stopped="stopped (test)" if stopped else None,
    )
    if not attempts:
        assert env is None  # left for a later run
        return
    assert env is not None
    assert env.ok is rule.ok
    if rule.delivery is not None:
        assert env.delivery is rule.delivery
    else:
        expected = Delivery.REJECTED if Seen.ERROR in attempts else Delivery.NOT_SENT
        assert env.delivery is expected
    if stopped:
        assert env.error is not None
        assert env.error.kind is ErrorKind.STOPPED
    elif not env.ok:
        assert env.error is not None
        assert env.error.kind is OUTCOMES[attempts[-1]].error_kind
    assert env.attempts == len(attempts) == sum(env.statuses.values())
    # The results line is orjson's encoding of the envelope itself, field for field.
    assert encode(env) == orjson.dumps(env, option=orjson.OPT_APPEND_NEWLINE)
    # Once any attempt may have arrived, never not_sent; an error after doubt stays unknown.
    if {Seen.NO_ANSWER, Seen.IN_DOUBT} & set(attempts) and Seen.SUCCESS not in attempts:
        assert env.delivery is Delivery.UNKNOWN


def test_a_cut_off_request_counts_as_a_stopped_attempt() -> None:
    history = History()
    history.add(OUTCOMES[Seen.ERROR])
    env = for_history(
        EVENT,
        history,
        finished_at=datetime.now(UTC),
        elapsed_s=0.0,
        stopped="stopped (test) while a request was in flight",
        in_flight=True,
    )
    assert env is not None
    assert (env.delivery, env.attempts, env.status) == (Delivery.UNKNOWN, 2, None)
    assert env.statuses == {"503": 1, "stopped": 1}


@pytest.mark.parametrize(
    ("body", "confirmed"),
    [
        (b'{"success":true,"errors":[],"messages":[],"result":{}}', True),
        (b' { "success" : true } ', True),
        (b'{"success":false,"result":{"success":true}}', False),
        (b'{"success":"true"}', False),
        (b'{"success":1}', False),
        (b"[]", False),
        (b"", False),
        (b'<html>"success":true</html>', False),
        (b'{"success":true', False),
        (b'{"success":true}{"success":false}', False),
    ],
)
def test_only_a_whole_object_with_success_true_confirms(body: bytes, confirmed: bool) -> None:
    assert is_success_envelope(body) is confirmed
    outcome = outcome_from_response(200, body, CIMultiDict(), 0.0)
    assert outcome.ok is confirmed


def test_redaction_runs_before_the_message_is_cut() -> None:
    token = "T" * 40
    redact = Redactor({"Authorization": f"Bearer {token}"})
    body = (b"x" * 290) + f"Authorization: Bearer {token}".encode()
    outcome = outcome_from_response(400, body, CIMultiDict(), 0.0, redact)
    assert outcome.message is not None
    assert "TTTT" not in outcome.message
    assert token not in repr(redact)


def test_a_503_retry_after_sets_the_records_earliest_retry() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_retry_wait=20)
    headers = CIMultiDict({"Retry-After": "12"})
    outcome = outcome_from_response(503, b"busy", headers, 0.0)
    decision = policy.decide(outcome, 1, 0, lambda: 0.0)
    assert decision == Retry(delay=12.0, pause_all=False)
    headers = CIMultiDict({"Retry-After": "3600"})
    decision = policy.decide(outcome_from_response(503, b"", headers, 0.0), 1, 0, lambda: 0.0)
    assert decision == Retry(delay=20.0, pause_all=False)


def test_no_part_of_a_secret_survives_whitespace_and_cuts() -> None:
    token = "S3cr3t-" + "x" * 30
    redact = Redactor({"Authorization": f"Bearer {token}"})
    body = (b" \n" * 700) + f"echo: Bearer {token} end".encode()
    outcome = outcome_from_response(401, body, CIMultiDict(), 0.0, redact)
    assert outcome.message is not None
    assert "S3cr3t" not in outcome.message
    assert outcome.message == "echo: <redacted> end"


def test_every_kind_of_results_line_is_the_envelopes_own_encoding() -> None:
    """Invalid, skipped and crashed records' envelopes, a Cloudflare code, a cut-off
    request, odd text: the line written is what orjson makes of the envelope."""
    now = datetime.now(UTC)
    odd = Event(
        key='k"\\\u2028é', source="dir/ïn.jsonl", line=10**12, workflow="wf-ü",
        instance_id="i\n", event_type="e", body=None,
    )  # fmt: skip
    history = History()
    history.leaving(now, 1.0)
    history.add(
        Outcome(status=404, ok=False, sent=True, latency_s=0.1234567, error_kind=ErrorKind.HTTP,
                cf_code=10400, message="instance not found \"x\"")
    )  # fmt: skip
    history.add(OUTCOMES[Seen.NO_ANSWER])
    envs = [
        for_history(odd, history, finished_at=now, elapsed_s=1.5),
        for_history(odd, history, finished_at=now, elapsed_s=0.0, stopped="stop", in_flight=True),
        envelopes.for_invalid(Invalid(key="k", source="s", line=3, rule="not_waiting",
                                      message="m"), now),
        envelopes.for_invalid(Invalid(key="k", source="s", line=4, rule="bad_json",
                                      message="m", instance_id="i"), now),
        envelopes.for_crashed(EVENT, now),
    ]  # fmt: skip
    for env in envs:
        assert env is not None
        assert encode(env) == orjson.dumps(env, option=orjson.OPT_APPEND_NEWLINE)
