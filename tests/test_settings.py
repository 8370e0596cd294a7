"""The settings values: parsers, defaults, self-checks, and secrets kept out of sight."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.run.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_RATE,
    ConfigError,
    Credentials,
    Rate,
    SendSettings,
    parse_duration,
    parse_rate,
)

TOKEN = "tok-SETTINGS-5ecret-b81c"
API_KEY = "key-SETTINGS-5ecret-7d02"


def settings(**overrides: Any) -> SendSettings:
    values: dict[str, Any] = {
        "inputs": ("events.jsonl",),
        "account_id": "acc",
        "credentials": Credentials(token=TOKEN),
    }
    values.update(overrides)
    return SendSettings(**values)


# --- parse_rate / parse_duration ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("4/s", 4, 1),
        ("4/1s", 4, 1),
        ("4", 4, 1),
        ("0.5", 0.5, 1),
        ("1200/5m", 1200, 300),
        ("100/2.5s", 100, 2.5),
        ("10/h", 10, 3600),
        ("10/2h", 10, 7200),
        ("3/m", 3, 60),
        ("5/500ms", 5, 0.5),
        (" 4 / s ", 4, 1),
        ("4/S", 4, 1),
    ],
)
def test_parse_rate(text: str, count: float, per: float) -> None:
    assert parse_rate(text) == Rate(count=count, per=per)


@pytest.mark.parametrize("text", ["unlimited", "auto", "UNLIMITED", " auto "])
def test_parse_rate_specials(text: str) -> None:
    assert parse_rate(text) == text.strip().lower()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0", "positive"),
        ("0/s", "positive"),
        ("-4/s", "positive"),
        ("4/0s", "longer than zero"),
        ("nan/s", "positive"),
        ("inf", "positive"),
        ("", "COUNT/PERIOD"),
        ("fast", "COUNT/PERIOD"),
        ("4/", "COUNT/PERIOD"),
        ("4/d", "COUNT/PERIOD"),
        ("4/s/s", "COUNT/PERIOD"),
        ("4 per second", "COUNT/PERIOD"),
    ],
)
def test_parse_rate_rejects(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        parse_rate(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("200ms", 0.2),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("0", 0.0),
        (" 10 s ", 10.0),
        ("2M", 120.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "invalid duration"),
        ("s", "invalid duration"),
        ("30x", "invalid duration"),
        ("1e3s", "invalid duration"),
        ("5m30s", "invalid duration"),
        ("-1s", "negative"),
        ("9" * 400, "too large"),
    ],
)
def test_parse_duration_rejects(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_duration(text)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (DEFAULT_RATE, "1200/5m"),
        (Rate(count=4, per=1), "4/s"),
        (Rate(count=10, per=3600), "10/h"),
        (Rate(count=100, per=2.5), "100/2.5s"),
        (Rate(count=5, per=0.5), "5/500ms"),
        (Rate(count=1.5, per=90), "1.5/90s"),
    ],
)
def test_rate_str(rate: Rate, text: str) -> None:
    assert str(rate) == text


@given(
    count=st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False),
    per=st.floats(min_value=1e-6, max_value=1e7, allow_nan=False, allow_infinity=False),
)
def test_rate_str_reads_back(count: float, per: float) -> None:
    rate = Rate(count=count, per=per)
    assert parse_rate(str(rate)) == rate


def test_rate_per_second_and_checks() -> None:
    assert DEFAULT_RATE.per_second == pytest.approx(4.0)
    with pytest.raises(ValueError, match="count must be a positive"):
        Rate(count=0, per=1)
    with pytest.raises(ValueError, match="per must be a positive"):
        Rate(count=1, per=float("inf"))


# --- ConfigError -------------------------------------------------------------------


def test_config_error_names_where_and_survives_pickling() -> None:
    error = ConfigError("--rate", "bad")
    assert str(error) == "--rate: bad"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.where, copy.message, str(copy)) == ("--rate", "bad", "--rate: bad")


# --- Credentials -------------------------------------------------------------------


def test_credentials_token_scheme() -> None:
    creds = Credentials(token=TOKEN)
    assert creds.scheme == "token"
    assert creds.headers() == {"Authorization": f"Bearer {TOKEN}"}


def test_credentials_legacy_scheme() -> None:
    creds = Credentials(email="ops@example.com", api_key=API_KEY)
    assert creds.scheme == "legacy"
    assert creds.headers() == {"X-Auth-Email": "ops@example.com", "X-Auth-Key": API_KEY}


def test_credentials_never_print_their_secrets() -> None:
    for creds in (Credentials(token=TOKEN), Credentials(email="o@x.io", api_key=API_KEY)):
        for text in (repr(creds), str(creds), f"{creds}", repr(settings(credentials=creds))):
            assert TOKEN not in text
            assert API_KEY not in text
            assert "<redacted>" in text
        # Printers that walk the fields (rich, pytest's diffs) skip them too.
        assert not any(f.repr or f.compare for f in dataclasses.fields(creds))


def test_credentials_equality_still_covers_the_secrets() -> None:
    assert Credentials(token=TOKEN) == Credentials(token=TOKEN)
    assert Credentials(token=TOKEN) != Credentials(token=TOKEN + "x")
    assert hash(Credentials(token=TOKEN)) == hash(Credentials(token=TOKEN))
    assert settings() == settings()
    assert settings() != settings(credentials=Credentials(token="tok-other-one"))


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({}, "token"),
        ({"token": TOKEN, "email": "o@x.io", "api_key": API_KEY}, "token"),
        ({"email": "o@x.io"}, "api_key"),
        ({"api_key": API_KEY}, "email"),
        ({"token": ""}, "token"),
        ({"token": f"{TOKEN} extra"}, "token"),
        ({"token": f"{TOKEN}\nX-Injected: 1"}, "token"),
        ({"email": "o@x.io", "api_key": f"{API_KEY}\t"}, "api_key"),
    ],
)
def test_credentials_need_exactly_one_clean_scheme(kwargs: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        Credentials(**kwargs)
    assert info.value.where == where
    assert TOKEN not in str(info.value)
    assert API_KEY not in str(info.value)


# --- SendSettings ------------------------------------------------------------------


def test_defaults() -> None:
    value = settings()
    assert value.base_url == DEFAULT_BASE_URL
    assert value.rate == DEFAULT_RATE
    assert (value.concurrency, value.max_attempts) == (8, 5)
    assert (value.max_retry_wait, value.timeout, value.connect_timeout) == (600.0, 30.0, 10.0)
    assert (value.results, value.quiet, value.progress) == ("results.jsonl", False, "auto")
    assert value.validate_ids is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.concurrency = 9  # type: ignore[misc]


def test_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        SendSettings(("a.jsonl",), None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8787/client/v4",
        "http://127.9.9.9",
        "http://localhost:8787",
        "http://LOCALHOST",
        "http://[::1]:8787/client/v4",
        "https://api.example.com/client/v4",
    ],
)
def test_base_url_accepted(url: str) -> None:
    assert settings(base_url=url).base_url == url


def test_base_url_loses_its_trailing_slash() -> None:
    assert settings(base_url="https://api.example.com/v4/").base_url == "https://api.example.com/v4"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://api.cloudflare.com/client/v4", "loopback"),
        ("http://10.0.0.1:8787", "loopback"),
        ("http://localhost.evil.com", "loopback"),
        ("http://128.0.0.1", "loopback"),
        ("ftp://127.0.0.1", "expected https"),
        ("api.cloudflare.com/client/v4", "expected https"),
        ("https://", "expected https"),
        ("https://h/v4?x=1", "no query"),
        ("https://h:99999", "invalid URL"),
    ],
)
def test_base_url_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        settings(base_url=url)
    assert info.value.where == "base_url"


def test_base_url_with_userinfo_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigError, match="must not hold credentials") as info:
        settings(base_url=f"https://user:{TOKEN}@api.example.com")
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"inputs": ["a.jsonl"]}, "inputs"),
        ({"inputs": ("-", "-")}, "inputs"),
        ({"inputs": ("",)}, "inputs"),
        ({"format": "xml"}, "format"),
        ({"workflow": "bad name"}, "workflow"),
        ({"workflow": "w" * 65}, "workflow"),
        ({"event_type": ""}, "event_type"),
        ({"format": "ids", "event_type": "evt"}, "workflow"),
        ({"format": "ids", "workflow": "wf"}, "event_type"),
        ({"body": b"{nope"}, "body"),
        ({"body": b"NaN"}, "body"),
        ({"body": b"1" * (1024 * 1024 + 1)}, "body"),
        ({"validate_ids": "no"}, "validate_ids"),
        ({"account_id": ""}, "account_id"),
        ({"account_id": "acc/../x"}, "account_id"),
        ({"rate": "fast"}, "rate"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1025}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_retry_wait": -1.0}, "max_retry_wait"),
        ({"timeout": 0.0}, "timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
        ({"results": ""}, "results"),
        ({"results": "events.jsonl"}, "results"),
        ({"results": "./events.jsonl"}, "results"),
        ({"quiet": 1}, "quiet"),
        ({"progress": "fancy"}, "progress"),
        ({"credentials": TOKEN}, "credentials"),
    ],
)
def test_bad_field_is_named(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(**overrides)
    assert info.value.where == where
    assert TOKEN not in str(info.value)


def test_sensible_edges_are_accepted() -> None:
    value = settings(
        inputs=("-", "a.csv"),
        format="ids",
        workflow="wf",
        event_type="approve",
        body=b'{"ok": true}',
        rate="unlimited",
        concurrency=1024,
        max_attempts=1,
        max_retry_wait=0,
        timeout=1,
        results="-",
    )
    # Whole seconds given as ints come out as floats, like parsed ones.
    assert isinstance(value.max_retry_wait, float)
    assert isinstance(value.timeout, float)
