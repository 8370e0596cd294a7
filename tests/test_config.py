"""Loading `dispatcher send` settings: flags > env > --config file > defaults."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatcher.run.config import ENV_VARS, TOML_KEYS, add_send_arguments, load_send_settings
from dispatcher.run.settings import (
    DEFAULT_RATE,
    ConfigError,
    Credentials,
    Rate,
    SendSettings,
)

# Distinctive, so that a leak anywhere shows up in a plain substring check.
TOKEN = "tok-CONFIG-5ecret-a94e17"
FILE_TOKEN = "tok-FILE-5ecret-3c2d88"
API_KEY = "key-CONFIG-5ecret-f00d"
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "dispatcher.toml"
BASE_ENV = {"CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_ACCOUNT_ID": "acc"}

Load = Callable[..., SendSettings]


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="dispatcher send")
    add_send_arguments(result)
    return result


@pytest.fixture
def toml(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "dispatcher.toml"
        path.write_text(text)
        return str(path)

    return write


def load(*argv: str, env: dict[str, str] | None = None) -> SendSettings:
    args = parser().parse_args(["events.jsonl", *argv])
    return load_send_settings(args, BASE_ENV if env is None else env)


def error(*argv: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(*argv, env=env)
    assert TOKEN not in str(info.value)
    assert FILE_TOKEN not in str(info.value)
    assert API_KEY not in str(info.value)
    return info.value


# --- the flags -----------------------------------------------------------------------


def test_flags_default_to_none_so_absence_is_visible() -> None:
    args = parser().parse_args(["a.jsonl"])
    given = {k: v for k, v in vars(args).items() if k != "inputs" and v is not None}
    assert given == {}


@pytest.mark.parametrize("argv", [["--token", TOKEN], [f"--token={TOKEN}"], ["--token"]])
def test_no_token_flag(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Not even as an abbreviation of --token-file, which argparse would otherwise allow.
    with pytest.raises(SystemExit):
        parser().parse_args(["a.jsonl", *argv])
    err = capsys.readouterr().err
    assert "--token is not supported" in err
    assert "CLOUDFLARE_API_TOKEN" in err
    assert TOKEN not in err


def test_help_shows_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("default: 1200/5m", "default: 8", "default: 5", "default: 30s", "results.jsonl"):
        assert text in out
    for name in ENV_VARS:
        assert name in out


def test_defaults_when_nothing_is_given() -> None:
    value = load()
    assert value == SendSettings(
        inputs=("events.jsonl",), account_id="acc", credentials=Credentials(token=TOKEN)
    )


# --- precedence ---------------------------------------------------------------------


def test_flag_beats_env_beats_toml_beats_default(toml: Callable[[str], str]) -> None:
    path = toml(
        'rate = "10/s"\nconcurrency = 3\nbase_url = "https://toml.example"\n'
        'account_id = "from-toml"\ntimeout = "5s"\nresults = "toml.jsonl"\n'
    )
    env = BASE_ENV | {
        "DISPATCHER_RATE": "20/s",
        "DISPATCHER_CONCURRENCY": "4",
        "CLOUDFLARE_BASE_URL": "https://env.example",
    }
    flags = ("--config", path, "--rate", "30/s", "--account-id", "from-flag")
    value = load(*flags, env=env)
    assert value.rate == Rate(count=30, per=1)  # flag over env and TOML
    assert value.account_id == "from-flag"  # flag over env and TOML
    assert value.concurrency == 4  # env over TOML
    assert value.base_url == "https://env.example"  # env over TOML
    assert value.timeout == 5.0  # TOML over default
    assert value.results == "toml.jsonl"  # TOML over default
    assert value.max_attempts == 5  # default

    only_toml = load("--config", path, env={"CLOUDFLARE_API_TOKEN": TOKEN})
    assert (only_toml.rate, only_toml.concurrency) == (Rate(count=10, per=1), 3)
    assert (only_toml.account_id, only_toml.base_url) == ("from-toml", "https://toml.example")


def test_flags_can_switch_off_what_the_file_switched_on(toml: Callable[[str], str]) -> None:
    path = toml("quiet = true\nvalidate_ids = false\n")
    assert (load("--config", path).quiet, load("--config", path).validate_ids) == (True, False)
    value = load("--config", path, "--no-quiet", "--validate-ids")
    assert (value.quiet, value.validate_ids) == (False, True)


def test_every_flag_reaches_its_field(tmp_path: Path) -> None:
    body_file = tmp_path / "body.json"
    body_file.write_text('{"a": [1, 2]}\n')
    value = load(
        "--format=ids",
        "--workflow=wf",
        "--event-type=approve",
        f"--body-file={body_file}",
        "--no-validate-ids",
        "--account-id=acc2",
        "--base-url=http://127.0.0.1:8787/",
        "--rate=unlimited",
        "--concurrency=64",
        "--max-attempts=2",
        "--max-retry-wait=90s",
        "--timeout=2.5s",
        "--connect-timeout=500ms",
        "--results=-",
        "-q",
        "--progress=lines",
    )
    assert value == SendSettings(
        inputs=("events.jsonl",),
        format="ids",
        workflow="wf",
        event_type="approve",
        body=b'{"a":[1,2]}',
        validate_ids=False,
        account_id="acc2",
        base_url="http://127.0.0.1:8787",
        credentials=Credentials(token=TOKEN),
        rate="unlimited",
        concurrency=64,
        max_attempts=2,
        max_retry_wait=90.0,
        timeout=2.5,
        connect_timeout=0.5,
        results="-",
        quiet=True,
        progress="lines",
    )


def test_library_callers_may_pass_typed_values() -> None:
    args = argparse.Namespace(inputs=["a.jsonl"], concurrency=16, timeout=3, rate=2)
    value = load_send_settings(args, BASE_ENV)
    assert (value.concurrency, value.timeout, value.rate) == (16, 3.0, Rate(count=2, per=1))


def test_empty_env_values_count_as_unset() -> None:
    env = BASE_ENV | {"DISPATCHER_RATE": "", "CLOUDFLARE_BASE_URL": "  "}
    value = load(env=env)
    assert value.rate == DEFAULT_RATE


# --- credentials --------------------------------------------------------------------


def test_token_wins_over_the_legacy_pair() -> None:
    env = BASE_ENV | {"CLOUDFLARE_EMAIL": "o@x.io", "CLOUDFLARE_API_KEY": API_KEY}
    assert load(env=env).credentials == Credentials(token=TOKEN)


def test_legacy_pair_from_env() -> None:
    env = {"CLOUDFLARE_ACCOUNT_ID": "acc", "CLOUDFLARE_EMAIL": "o@x.io"}
    env["CLOUDFLARE_API_KEY"] = API_KEY
    creds = load(env=env).credentials
    assert creds == Credentials(email="o@x.io", api_key=API_KEY)


def test_token_file_beats_env_and_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {FILE_TOKEN}\n")
    assert load("--token-file", str(path)).credentials == Credentials(token=FILE_TOKEN)


def test_env_beats_token_file_in_toml(tmp_path: Path, toml: Callable[[str], str]) -> None:
    path = tmp_path / "token"
    path.write_text(FILE_TOKEN)
    config = toml(f'token_file = "{path}"\n')
    assert load("--config", config).credentials == Credentials(token=TOKEN)
    only_file = load("--config", config, env={"CLOUDFLARE_ACCOUNT_ID": "acc"})
    assert only_file.credentials == Credentials(token=FILE_TOKEN)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "is empty"),
        (" \n\t\n", "is empty"),
        (f"{FILE_TOKEN}\nsecond line", "without spaces"),
        (f"{FILE_TOKEN} {FILE_TOKEN}", "without spaces"),
    ],
)
def test_bad_token_file(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    found = error("--token-file", str(path))
    assert found.where == "--token-file"
    assert says in found.message


def test_missing_token_file() -> None:
    found = error("--token-file", "/nonexistent/token")
    assert found.where == "--token-file"
    assert "cannot read" in found.message


def test_bad_token_in_env_names_the_variable() -> None:
    found = error(env=BASE_ENV | {"CLOUDFLARE_API_TOKEN": f"{TOKEN} {TOKEN}"})
    assert found.where == "CLOUDFLARE_API_TOKEN"


def test_no_credentials_explains_where_they_come_from() -> None:
    found = error(env={"CLOUDFLARE_ACCOUNT_ID": "acc"})
    for name in ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_EMAIL", "CLOUDFLARE_API_KEY", "--token-file"):
        assert name in str(found)


def test_half_a_legacy_pair_names_the_missing_half() -> None:
    found = error(env={"CLOUDFLARE_ACCOUNT_ID": "acc", "CLOUDFLARE_EMAIL": "o@x.io"})
    assert found.where == "CLOUDFLARE_API_KEY"
    found = error(env={"CLOUDFLARE_ACCOUNT_ID": "acc", "CLOUDFLARE_API_KEY": API_KEY})
    assert found.where == "CLOUDFLARE_EMAIL"


def test_missing_account_id() -> None:
    found = error(env={"CLOUDFLARE_API_TOKEN": TOKEN})
    assert found.where == "--account-id"
    assert "CLOUDFLARE_ACCOUNT_ID" in found.message


# --- every bad value names its source -------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "where"),
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "fast"], "--rate"),
        (["--concurrency", "many"], "--concurrency"),
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "5000"], "--concurrency"),
        (["--max-attempts", "0"], "--max-attempts"),
        (["--max-attempts", "1.5"], "--max-attempts"),
        (["--max-retry-wait=-1s"], "--max-retry-wait"),
        (["--timeout", "0"], "--timeout"),
        (["--timeout", "soon"], "--timeout"),
        (["--connect-timeout", "10x"], "--connect-timeout"),
        (["--base-url", "http://api.example.com"], "--base-url"),
        (["--account-id", "a b"], "--account-id"),
        (["--workflow", "no spaces"], "--workflow"),
        (["--event-type", "e" * 101], "--event-type"),
        (["--format", "ids", "--event-type", "e"], "--workflow"),
        (["--format", "ids", "--workflow", "w"], "--event-type"),
        (["--results", "events.jsonl"], "--results"),
        (["--results", ""], "--results"),
        (["--body", "{not json"], "--body"),
        (["--body", ""], "--body"),
    ],
)
def test_bad_flag_is_named(argv: list[str], where: str) -> None:
    assert error(*argv).where == where


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DISPATCHER_RATE", "-1/s"),
        ("DISPATCHER_CONCURRENCY", "eight"),
        ("DISPATCHER_CONCURRENCY", "0"),
        ("CLOUDFLARE_BASE_URL", "http://example.com"),
        ("CLOUDFLARE_ACCOUNT_ID", "a/b"),
    ],
)
def test_bad_env_var_is_named(name: str, value: str) -> None:
    assert error(env=BASE_ENV | {name: value}).where == name


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('rate = "0/s"', "rate", "positive"),
        ("rate = true", "rate", "got a boolean"),
        ("rate = 0", "rate", "positive"),
        ('concurrency = "8"', "concurrency", "expected an integer, got a string"),
        ("concurrency = 8.0", "concurrency", "expected an integer, got a float"),
        ("concurrency = 2000", "concurrency", "between 1 and 1024"),
        ("max_attempts = false", "max_attempts", "expected an integer, got a boolean"),
        ('timeout = "fast"', "timeout", "invalid duration"),
        ("timeout = [30]", "timeout", "got an array"),
        ("max_retry_wait = -5", "max_retry_wait", "zero or more"),
        ("workflow = 42", "workflow", "expected a string, got an integer"),
        ('workflow = "a b"', "workflow", "must be 1..64"),
        ('quiet = "yes"', "quiet", "expected true or false, got a string"),
        ("validate_ids = 0", "validate_ids", "expected true or false"),
        ('format = "xml"', "format", "expected one of jsonl, csv, ids"),
        ('progress = "fancy"', "progress", "expected one of auto, bar, lines, off"),
        ('base_url = "http://example.com"', "base_url", "loopback"),
        ("body = '{'", "body", "not valid JSON"),
        ("body = { a = 1 }", "body", "expected a string, got a table"),
        ('results = ""', "results", "must not be empty"),
    ],
)
def test_bad_toml_value_names_file_and_key(
    toml: Callable[[str], str], line: str, key: str, says: str
) -> None:
    path = toml(line + "\n")
    found = error("--config", path)
    assert found.where == f"{path}: {key}"
    assert says in found.message


def test_toml_key_under_send_is_named_with_its_table(toml: Callable[[str], str]) -> None:
    path = toml('[send]\nrate = "fast"\n')
    assert error("--config", path).where == f"{path}: send.rate"


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("concurency", "concurrency"),
        ("max-attempts", "max_attempts"),
        ("retry_wait", "max_retry_wait"),
        ("base-url", "base_url"),
        ("worklfow", "workflow"),
        ("token_files", "token_file"),
    ],
)
def test_unknown_toml_key_suggests_the_closest(
    toml: Callable[[str], str], key: str, suggestion: str
) -> None:
    path = toml(f'"{key}" = 1\n')
    found = error("--config", path)
    assert found.where == f"{path}: {key}"
    assert f"unknown key {key!r}; did you mean {suggestion!r}?" == found.message


def test_unknown_toml_key_without_a_match_lists_the_keys(toml: Callable[[str], str]) -> None:
    found = error("--config", toml("zzz = 1\n"))
    assert "unknown key 'zzz'" in found.message
    assert "concurrency" in found.message


@pytest.mark.parametrize(
    "key", ["token", "api_token", "api_key", "email", "cloudflare_api_token", "auth-key"]
)
def test_secrets_are_refused_in_toml(toml: Callable[[str], str], key: str) -> None:
    path = toml(f'"{key}" = "{TOKEN}"\n')
    found = error("--config", path)
    assert found.where == f"{path}: {key}"
    assert "CLOUDFLARE_API_TOKEN" in found.message
    assert "--token-file" in found.message


def test_toml_outside_send_table_is_refused(toml: Callable[[str], str]) -> None:
    path = toml('rate = "4/s"\n[send]\nconcurrency = 2\n')
    assert error("--config", path).where == f"{path}: rate"
    assert error("--config", toml("send = 3\n")).message == "expected a table, got an integer"


def test_unreadable_or_broken_toml(toml: Callable[[str], str]) -> None:
    assert error("--config", "/nonexistent/dispatcher.toml").where == "--config"
    path = toml(f"rate = {TOKEN}\n")
    found = error("--config", path)
    assert found.where == path
    assert "not valid TOML" in found.message


def test_toml_numbers_and_strings_both_parse(toml: Callable[[str], str]) -> None:
    path = toml('rate = 2.5\ntimeout = 12\nconnect_timeout = "1.5s"\nmax_retry_wait = 0\n')
    value = load("--config", path)
    assert value.rate == Rate(count=2.5, per=1)
    assert (value.timeout, value.connect_timeout, value.max_retry_wait) == (12.0, 1.5, 0.0)


# --- the body -------------------------------------------------------------------------


def test_body_flags_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["a.jsonl", "--body", "{}", "--body-file", "b.json"])
    assert "--body-file: not allowed with argument --body" in capsys.readouterr().err
    # A hand-built namespace gets the same answer from the loader.
    args = argparse.Namespace(inputs=["a.jsonl"], body="{}", body_file="b.json")
    with pytest.raises(ConfigError) as info:
        load_send_settings(args, BASE_ENV)
    assert str(info.value) == "--body-file: cannot be used together with --body"


def test_body_and_body_file_in_one_toml_conflict(toml: Callable[[str], str]) -> None:
    path = toml("body = '{}'\nbody_file = 'b.json'\n")
    assert error("--config", path).where == f"{path}: body_file"


def test_body_is_checked_compacted_and_takes_precedence(
    tmp_path: Path, toml: Callable[[str], str]
) -> None:
    assert load("--body", ' { "x" : [1, "two"] } ').body == b'{"x":[1,"two"]}'
    assert load("--body", '"just a string"').body == b'"just a string"'
    path = toml('body = \'{"from": "toml"}\'\n')
    assert load("--config", path).body == b'{"from":"toml"}'
    # A flag's body file beats the file's body: both are one setting.
    body_file = tmp_path / "b.json"
    body_file.write_text("[1]")
    assert load("--config", path, "--body-file", str(body_file)).body == b"[1]"


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"", "not valid JSON"), (b"{", "not valid JSON"), (b"NaN", "not valid JSON")],
)
def test_bad_body_file_names_the_flag(tmp_path: Path, content: bytes, says: str) -> None:
    body_file = tmp_path / "b.json"
    body_file.write_bytes(content)
    found = error("--body-file", str(body_file))
    assert found.where == "--body-file"
    assert says in found.message


def test_oversized_and_missing_body_file(tmp_path: Path) -> None:
    body_file = tmp_path / "big.json"
    body_file.write_bytes(b'"' + b"x" * (1024 * 1024) + b'"')
    assert "limit" in error("--body-file", str(body_file)).message
    assert error("--body-file", str(tmp_path / "none.json")).where == "--body-file"


# --- the secret never shows -------------------------------------------------------------


def test_token_appears_in_no_repr_or_error(tmp_path: Path, toml: Callable[[str], str]) -> None:
    value = load()
    assert value.credentials is not None
    assert value.credentials.headers() == {"Authorization": f"Bearer {TOKEN}"}
    for text in (repr(value), str(value), repr(value.credentials), str(value.credentials)):
        assert TOKEN not in text
    token_file = tmp_path / "token"
    token_file.write_text(FILE_TOKEN)
    from_file = load("--token-file", str(token_file))
    assert FILE_TOKEN not in repr(from_file)
    # The error() helper checks every message for the tokens; a broad sample of failures:
    error("--rate", "0")
    error("--config", toml(f'token = "{TOKEN}"\n'))
    error("--config", toml(f"rate = {TOKEN}\n"))
    error("--token-file", TOKEN)  # the token pasted where its path belongs
    error("--base-url", f"https://me:{TOKEN}@api.example.com")
    error("--token-file", str(token_file), "--rate", "0")
    error(env={"CLOUDFLARE_API_TOKEN": TOKEN, "CLOUDFLARE_ACCOUNT_ID": "acc/x"})


# --- the example config ----------------------------------------------------------------


def test_example_config_loads_to_the_defaults() -> None:
    assert load("--config", str(EXAMPLE)) == load()


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    mentioned = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.MULTILINE))
    assert mentioned == TOML_KEYS


def test_each_commented_example_is_valid(tmp_path: Path) -> None:
    """Uncommenting any one example line still gives a config that loads."""
    lines = EXAMPLE.read_text().splitlines()
    examples = [i for i, line in enumerate(lines) if re.match(r"# [a-z_]+ = ", line)]
    assert len(examples) >= 7
    token_file = tmp_path / "token"
    token_file.write_text(FILE_TOKEN)
    (tmp_path / "payload.json").write_text("{}")
    for index in examples:
        edited = [*lines]
        edited[index] = lines[index].removeprefix("# ")
        key = edited[index].split(" = ")[0]
        if key == "token_file":
            edited[index] = f'token_file = "{token_file}"'
        if key == "body_file":
            edited[index] = f'body_file = "{tmp_path / "payload.json"}"'
        if key == "format":
            continue  # needs workflow and event_type too: loaded together below
        path = tmp_path / "example.toml"
        path.write_text("\n".join(edited))
        load("--config", str(path))
    # All at once too, but for the two that need a real file (and exclude each other),
    # and overwrite, which contradicts resume.
    skip = ("# body_file", "# token_file", "# overwrite")
    everything = [
        line.removeprefix("# ") if i in examples and not line.startswith(skip) else line
        for i, line in enumerate(lines)
    ]
    path = tmp_path / "all.toml"
    path.write_text("\n".join(everything))
    value = load("--config", str(path))
    assert (value.format, value.workflow, value.event_type) == ("ids", "order-workflow", "approval")
