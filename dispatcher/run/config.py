"""Flags, environment and config file of `dispatcher send`, merged once into a value.

Precedence, highest first: command-line flags, environment variables, the TOML file
named by ``--config``, the defaults in :mod:`dispatcher.run.settings`.

Environment variables (an empty value counts as unset, as CI systems export undefined
secrets as empty strings):

===================================  ====================================================
``CLOUDFLARE_API_TOKEN``             API token (sent as ``Authorization: Bearer``)
``CLOUDFLARE_EMAIL``                 legacy scheme: account email, with the key below
``CLOUDFLARE_API_KEY``               legacy scheme: global API key, with the email above
``CLOUDFLARE_ACCOUNT_ID``            ``--account-id``
``CLOUDFLARE_BASE_URL``              ``--base-url``
``DISPATCHER_RATE``                  ``--rate``
``DISPATCHER_CONCURRENCY``           ``--concurrency``
``DISPATCHER_HTTP_CLIENT``           ``--http-client``
``DISPATCHER_REDIS_URL``             ``--redis``
``DISPATCHER_REDIS_OUTAGE_TIMEOUT``  ``--redis-outage-timeout``
===================================  ====================================================

With ``--target relay``, ``DISPATCHER_RELAY_SECRET`` holds the relay's shared secret
(``--relay-secret-file`` beats it); there is no flag for the secret itself.

The ``CLOUDFLARE_*`` names are the official SDK's, so one environment serves both.

Credentials, first found wins: ``--token-file``, ``CLOUDFLARE_API_TOKEN``, the
``CLOUDFLARE_EMAIL`` + ``CLOUDFLARE_API_KEY`` pair, ``token_file`` in the config file.
The token wins over the legacy pair when both are set because it is the scheme
Cloudflare recommends and the narrower one. There is no ``--token`` flag: a flag's
value shows in ``ps`` and shell history. Secrets are refused in the config file too.

The config file is TOML: keys named like the flags with underscores (``max_attempts``),
either at the top level or all under a ``[send]`` table. Strings such as
``rate = "4/s"`` or ``timeout = "30s"`` go through the same parsers as the flags;
numbers are accepted for durations (seconds) and rates (per second). Relative paths in
it are relative to the working directory, like the flags'.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

from dispatcher.clients.targets import (
    DEFAULT_RELAY_BATCH,
    MAX_RELAY_BATCH,
    RELAY_SECRET_ENV,
    TARGETS,
    WRANGLER_DEV_BASE_URL,
    spec_of,
)
from dispatcher.inputs.validation import MAX_BODY_BYTES
from dispatcher.run.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ERROR_WINDOW,
    DEFAULT_GRACE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_WAIT,
    DEFAULT_PROGRESS,
    DEFAULT_RATE,
    DEFAULT_REDIS_OUTAGE_TIMEOUT,
    DEFAULT_RESULTS,
    DEFAULT_TIMEOUT,
    HTTP_CLIENTS,
    MAX_CONCURRENCY,
    ConfigError,
    Credentials,
    Rate,
    RateSetting,
    SendSettings,
    parse_duration,
    parse_fraction,
    parse_rate,
)

__all__ = ["ENV_VARS", "TOML_KEYS", "add_send_arguments", "load_send_settings"]

ENV_TOKEN: Final = "CLOUDFLARE_API_TOKEN"
ENV_EMAIL: Final = "CLOUDFLARE_EMAIL"
ENV_API_KEY: Final = "CLOUDFLARE_API_KEY"
ENV_VARS: Final = (
    ENV_TOKEN,
    ENV_EMAIL,
    ENV_API_KEY,
    "CLOUDFLARE_ACCOUNT_ID",
    "CLOUDFLARE_BASE_URL",
    "DISPATCHER_RATE",
    "DISPATCHER_CONCURRENCY",
    "DISPATCHER_HTTP_CLIENT",
    "DISPATCHER_REDIS_URL",
    "DISPATCHER_REDIS_OUTAGE_TIMEOUT",
    RELAY_SECRET_ENV,
)
"""Every environment variable `dispatcher send` reads."""

_FORMATS: Final = ("jsonl", "csv", "ids")
_PROGRESS: Final = ("auto", "bar", "lines", "off")


def _seconds_text(seconds: float) -> str:
    return f"{seconds:g}s"


# --- the flags ----------------------------------------------------------------------


class _RefusedTokenFlag(argparse.Action):
    """``--token`` exists only to refuse itself, without repeating its value."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"--token is not supported: a flag's value shows in ps and shell history; "
            f"set {ENV_TOKEN} or pass --token-file PATH"
        )


def add_send_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatcher send` to ``parser``.

    Every flag defaults to ``None`` so that :func:`load_send_settings` can tell "not
    given" from a value and let the environment or the config file fill it in; the
    help text shows the default that applies in the end. Values stay text here and are
    parsed by :func:`load_send_settings`, so every bad value gets the same kind of error.
    """
    if parser.epilog is None:
        parser.epilog = (
            "Precedence: flags, then environment, then --config file, then defaults. "
            f"Environment: {', '.join(ENV_VARS)}. Credentials come from "
            f"--token-file, {ENV_TOKEN}, or {ENV_EMAIL} + {ENV_API_KEY} (the token wins)."
        )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="JSONL, CSV or id-list file to send; - reads stdin (none with --instances-of)",
    )
    listing = parser.add_argument_group("instances as the input (docs/instances.md)")
    listing.add_argument(
        "--instances-of",
        default=None,
        metavar="WORKFLOW",
        help="send --event-type to the instances of WORKFLOW, read page by page from the "
        "list endpoint (each page a request from the same --rate budget); no INPUT",
    )
    listing.add_argument(
        "--status",
        dest="instance_status",
        default=None,
        metavar="STATUS",
        help="with --instances-of: only instances the list endpoint gives with this status "
        "(an instance parked in waitForEvent lists as running)",
    )
    listing.add_argument(
        "--waiting-for",
        default=None,
        metavar="TYPE",
        help="with --instances-of: read each instance's steps (one request each) and send "
        "only to those with an unfinished waitForEvent of TYPE; the others get a skipped "
        "envelope with the reason",
    )

    source = parser.add_argument_group("input")
    source.add_argument(
        "--format",
        choices=_FORMATS,
        default=None,
        help="input format (default: from each file's extension)",
    )
    source.add_argument(
        "--workflow",
        default=None,
        metavar="NAME",
        help="workflow to send to; required for id lists (default: none)",
    )
    source.add_argument(
        "--event-type",
        default=None,
        metavar="TYPE",
        help="event type sent to every id of an id list (default: none)",
    )
    body = source.add_mutually_exclusive_group()
    body.add_argument(
        "--body",
        default=None,
        metavar="JSON",
        help="event payload for id lists, as JSON text (default: no body)",
    )
    body.add_argument(
        "--body-file",
        default=None,
        metavar="PATH",
        help="read the id lists' event payload (JSON) from PATH",
    )
    source.add_argument(
        "--validate-ids",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check instance ids against the API's name pattern; --no-validate-ids lets "
        "system-generated (cron) ids through (default: check)",
    )

    source.add_argument(
        "--allow-extra-fields",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let JSONL fields and CSV columns other than id, instance_id, event_type, "
        "workflow and body through, ignored (default: such a line is invalid, such a CSV "
        "header an error, so that a misspelt 'bdy' cannot send events without a body)",
    )

    target = parser.add_argument_group("target")
    target.add_argument(
        "--target",
        choices=TARGETS,
        default=None,
        help="where events go: api, Cloudflare's REST API; wrangler-dev, a local `wrangler "
        f"dev` (base URL {WRANGLER_DEV_BASE_URL}, no credentials, no rate limit); relay, "
        "the relay Worker of relay/ (needs --base-url and the relay secret, no rate limit) "
        "(default: api)",
    )
    target.add_argument(
        "--relay-secret-file",
        default=None,
        metavar="PATH",
        help=f"read the relay's shared secret from PATH (beats {RELAY_SECRET_ENV}; there is "
        "no flag for the secret itself)",
    )
    target.add_argument(
        "--batch-size",
        default=None,
        metavar="N",
        help=f"events per request to the relay, 1..{MAX_RELAY_BATCH}; the relay's MAX_BATCH "
        f"must allow it (default: {DEFAULT_RELAY_BATCH})",
    )
    target.add_argument(
        "--account-id",
        default=None,
        metavar="ID",
        help="Cloudflare account id (env CLOUDFLARE_ACCOUNT_ID; required)",
    )
    target.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="API base URL; http only for loopback hosts "
        f"(env CLOUDFLARE_BASE_URL; default: {DEFAULT_BASE_URL})",
    )
    # Without it argparse would take "--token X" as an abbreviation of --token-file and
    # then report that no file named after the token exists.
    target.add_argument("--token", nargs="?", action=_RefusedTokenFlag, help=argparse.SUPPRESS)
    target.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"read the API token from PATH (beats {ENV_TOKEN}; there is no --token "
        "flag because flags show in ps)",
    )

    pace = parser.add_argument_group("rate and retries")
    pace.add_argument(
        "--rate",
        default=None,
        metavar="RATE",
        help="request budget: 4/s, 1200/5m, 100/2.5s, 4 (per second), unlimited or auto "
        f"(env DISPATCHER_RATE; default: {DEFAULT_RATE}, the API's global limit)",
    )
    pace.add_argument(
        "--concurrency",
        default=None,
        metavar="N",
        help=f"requests in flight at most, 1..{MAX_CONCURRENCY} "
        f"(env DISPATCHER_CONCURRENCY; default: {DEFAULT_CONCURRENCY})",
    )
    pace.add_argument(
        "--processes",
        default=None,
        metavar="N",
        help="worker processes sharing the input and dividing the rate between them; more "
        "than 1 helps only when one process keeps a core busy and more cores are free "
        "(default: 1)",
    )
    pace.add_argument(
        "--http-client",
        choices=HTTP_CLIENTS,
        default=None,
        help="fast: dispatcher's own lean HTTP/1.1 client (4-5x less CPU per request); "
        "aiohttp: the general-purpose one (env DISPATCHER_HTTP_CLIENT; default: fast)",
    )
    pace.add_argument(
        "--max-attempts",
        default=None,
        metavar="N",
        help=f"attempts per event, first one included (default: {DEFAULT_MAX_ATTEMPTS})",
    )
    pace.add_argument(
        "--max-retry-wait",
        default=None,
        metavar="DURATION",
        help="longest Retry-After to wait out before giving up on an event "
        f"(default: {_seconds_text(DEFAULT_MAX_RETRY_WAIT)})",
    )
    pace.add_argument(
        "--timeout",
        default=None,
        metavar="DURATION",
        help=f"per request, connect to last byte (default: {_seconds_text(DEFAULT_TIMEOUT)})",
    )
    pace.add_argument(
        "--connect-timeout",
        default=None,
        metavar="DURATION",
        help=f"to open a connection (default: {_seconds_text(DEFAULT_CONNECT_TIMEOUT)})",
    )

    shared = parser.add_argument_group("several processes or hosts (Redis)")
    shared.add_argument(
        "--redis",
        dest="redis_url",
        default=None,
        metavar="URL",
        help="redis://host:port/db holding the account's rate budget, shared by every run "
        "that names the same account (env DISPATCHER_REDIS_URL); nothing is sent while it "
        "cannot be reached",
    )
    shared.add_argument(
        "--redis-outage-timeout",
        default=None,
        metavar="DURATION",
        help="how long to wait for an unreachable Redis (sending nothing new) before the run "
        "ends with exit 3 and prints the command that finishes it "
        "(env DISPATCHER_REDIS_OUTAGE_TIMEOUT; "
        f"default: {_seconds_text(DEFAULT_REDIS_OUTAGE_TIMEOUT)})",
    )
    shared.add_argument(
        "--job",
        default=None,
        metavar="NAME",
        help="share this input's work with every process started with the same --redis and "
        "--job NAME; each writes its own --results (env DISPATCHER_JOB)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--results",
        default=None,
        metavar="PATH",
        help=f"where envelopes go; - for stdout (default: {DEFAULT_RESULTS})",
    )
    output.add_argument(
        "-q",
        "--quiet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print nothing but errors (default: off)",
    )
    output.add_argument(
        "--progress",
        choices=_PROGRESS,
        default=None,
        help=f"progress display; auto: a bar on a terminal, lines otherwise "
        f"(default: {DEFAULT_PROGRESS})",
    )
    resume = parser.add_argument_group("resume and stopping")
    resume.add_argument(
        "--overwrite",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replace an existing results file (default: refuse to touch it)",
    )
    resume.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read the existing results and send only what they do not settle: "
        "records already confirmed are skipped (default: off)",
    )
    resume.add_argument(
        "--retry-failed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --resume, also re-send records whose envelope is an error with delivery "
        "rejected or not_sent; invalid lines stay invalid (implies --resume)",
    )
    resume.add_argument(
        "--resend-unknown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --resume, also re-send records whose delivery is unknown: they may have "
        "arrived, so this may send them twice (implies --resume)",
    )
    resume.add_argument(
        "--grace",
        default=None,
        metavar="DURATION",
        help="after Ctrl-C or SIGTERM, how long requests in flight may take to finish "
        f"(default: {_seconds_text(DEFAULT_GRACE)})",
    )
    resume.add_argument(
        "--max-failures",
        default=None,
        metavar="N",
        help="stop (exit 3) once N sent records have failed (default: never)",
    )
    resume.add_argument(
        "--max-error-rate",
        default=None,
        metavar="P",
        help="stop (exit 3) once more than P (5%% or 0.05) of the last --error-window "
        "sent records failed (default: never)",
    )
    resume.add_argument(
        "--error-window",
        default=None,
        metavar="N",
        help=f"records over which --max-error-rate is taken (default: {DEFAULT_ERROR_WINDOW})",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML file with defaults for these flags (default: none)",
    )


# --- raw values and their conversion -------------------------------------------------


class _Raw(NamedTuple):
    """One value as a source gave it, before parsing."""

    value: object
    where: str  # how to name it in an error: "--rate", "DISPATCHER_RATE", "f.toml: rate"
    typed: bool  # from TOML: its type was chosen by the user and must fit the key


_Layer = dict[str, _Raw]


def _type_name(value: object) -> str:
    # TOML's names for its types, which is what a config-file author reads.
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _wrong_type(raw: _Raw, expected: str) -> ConfigError:
    return ConfigError(raw.where, f"expected {expected}, got {_type_name(raw.value)}")


def _to_str(raw: _Raw) -> str:
    if not isinstance(raw.value, str):
        raise _wrong_type(raw, "a string")
    if not raw.value:
        raise ConfigError(raw.where, "must not be empty")
    return raw.value


def _to_bool(raw: _Raw) -> bool:
    if not isinstance(raw.value, bool):
        raise _wrong_type(raw, "true or false")
    return raw.value


def _to_int(raw: _Raw) -> int:
    value = raw.value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # A TOML string is the user's choice of type; only text sources are parsed.
    if isinstance(value, str) and not raw.typed:
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(raw.where, f"expected an integer, got {value!r}") from None
    raise _wrong_type(raw, "an integer")


def _to_seconds(raw: _Raw) -> float:
    value = raw.value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(raw.where, str(exc)) from None
    raise _wrong_type(raw, "a duration such as '30s' or a number of seconds")


def _to_rate(raw: _Raw) -> RateSetting:
    value = raw.value
    try:
        if isinstance(value, str):
            return parse_rate(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return Rate(count=float(value), per=1.0)
    except ValueError as exc:
        raise ConfigError(raw.where, str(exc)) from None
    raise _wrong_type(raw, "a rate such as '4/s' or '1200/5m', or requests per second")


def _to_fraction(raw: _Raw) -> float:
    value = raw.value
    try:
        if isinstance(value, str):
            return parse_fraction(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return parse_fraction(str(value))
    except ValueError as exc:
        raise ConfigError(raw.where, str(exc)) from None
    raise _wrong_type(raw, "a percentage such as '5%' or a fraction")


def _to_choice(choices: tuple[str, ...]) -> Callable[[_Raw], str]:
    def convert(raw: _Raw) -> str:
        if not isinstance(raw.value, str):
            raise _wrong_type(raw, f"one of {', '.join(choices)}")
        if raw.value not in choices:
            raise ConfigError(raw.where, f"expected one of {', '.join(choices)}, got {raw.value!r}")
        return raw.value

    return convert


@dataclass(frozen=True, slots=True, kw_only=True)
class _Key:
    """A plain setting: one SendSettings field, one flag, maybe one env var."""

    name: str  # the SendSettings field, the argparse dest and the TOML key
    flag: str
    convert: Callable[[_Raw], object]
    env: str | None = None


_KEYS: Final = (
    _Key(name="format", flag="--format", convert=_to_choice(_FORMATS)),
    _Key(name="workflow", flag="--workflow", convert=_to_str),
    _Key(name="event_type", flag="--event-type", convert=_to_str),
    _Key(name="validate_ids", flag="--no-validate-ids", convert=_to_bool),
    _Key(name="allow_extra_fields", flag="--allow-extra-fields", convert=_to_bool),
    _Key(name="target", flag="--target", convert=_to_choice(TARGETS)),
    _Key(name="batch_size", flag="--batch-size", convert=_to_int),
    _Key(name="account_id", flag="--account-id", convert=_to_str, env="CLOUDFLARE_ACCOUNT_ID"),
    _Key(name="base_url", flag="--base-url", convert=_to_str, env="CLOUDFLARE_BASE_URL"),
    _Key(name="rate", flag="--rate", convert=_to_rate, env="DISPATCHER_RATE"),
    _Key(name="concurrency", flag="--concurrency", convert=_to_int, env="DISPATCHER_CONCURRENCY"),
    _Key(name="max_attempts", flag="--max-attempts", convert=_to_int),
    _Key(name="max_retry_wait", flag="--max-retry-wait", convert=_to_seconds),
    _Key(name="timeout", flag="--timeout", convert=_to_seconds),
    _Key(name="connect_timeout", flag="--connect-timeout", convert=_to_seconds),
    _Key(name="results", flag="--results", convert=_to_str),
    _Key(name="quiet", flag="--quiet", convert=_to_bool),
    _Key(name="progress", flag="--progress", convert=_to_choice(_PROGRESS)),
    _Key(name="overwrite", flag="--overwrite", convert=_to_bool),
    _Key(name="resume", flag="--resume", convert=_to_bool),
    _Key(name="retry_failed", flag="--retry-failed", convert=_to_bool),
    _Key(name="resend_unknown", flag="--resend-unknown", convert=_to_bool),
    _Key(name="grace", flag="--grace", convert=_to_seconds),
    _Key(name="max_failures", flag="--max-failures", convert=_to_int),
    _Key(name="max_error_rate", flag="--max-error-rate", convert=_to_fraction),
    _Key(name="error_window", flag="--error-window", convert=_to_int),
    _Key(name="processes", flag="--processes", convert=_to_int),
    _Key(name="redis_url", flag="--redis", convert=_to_str, env="DISPATCHER_REDIS_URL"),
    _Key(
        name="redis_outage_timeout",
        flag="--redis-outage-timeout",
        convert=_to_seconds,
        env="DISPATCHER_REDIS_OUTAGE_TIMEOUT",
    ),
    _Key(name="job", flag="--job", convert=_to_str, env="DISPATCHER_JOB"),
    _Key(name="instances_of", flag="--instances-of", convert=_to_str),
    _Key(name="instance_status", flag="--status", convert=_to_str),
    _Key(name="waiting_for", flag="--waiting-for", convert=_to_str),
    _Key(
        name="http_client",
        flag="--http-client",
        convert=_to_choice(HTTP_CLIENTS),
        env="DISPATCHER_HTTP_CLIENT",
    ),
)
# Settings read by hand below: two spellings of one value, or a path to a secret.
_BODY_KEYS: Final = {"body": "--body", "body_file": "--body-file"}
_TOKEN_FILE_FLAG: Final = "--token-file"
_RELAY_SECRET_FILE_FLAG: Final = "--relay-secret-file"
TOML_KEYS: Final = frozenset(
    {key.name for key in _KEYS} | set(_BODY_KEYS) | {"token_file", "relay_secret_file"}
)
"""Every key a config file may hold."""

# Keys that would put a credential in a file that gets committed and shared.
_SECRET_KEYS: Final = frozenset(
    {"token", "api_token", "api_key", "key", "email", "password", "secret", "auth_key"}
)
_SECRET_HINT: Final = (
    f"credentials do not belong in a config file; set {ENV_TOKEN} (or {ENV_EMAIL} and "
    f"{ENV_API_KEY}), or point --token-file or token_file at a file holding the token"
)


def _is_secret_key(key: str) -> bool:
    lowered = key.lower().replace("-", "_")
    # A near miss of a real key ("token_files") is a typo to correct, not a secret.
    if lowered in TOML_KEYS or difflib.get_close_matches(lowered, TOML_KEYS, n=1, cutoff=0.8):
        return False
    return lowered in _SECRET_KEYS or any(
        word in lowered for word in ("token", "secret", "password", "api_key")
    )


# --- the sources --------------------------------------------------------------------


def _flag_layer(args: argparse.Namespace) -> _Layer:
    layer: _Layer = {}
    for key in _KEYS:
        value = getattr(args, key.name, None)
        if value is not None:
            # --validate-ids and --no-validate-ids share a dest; name the one used.
            flag = "--validate-ids" if key.name == "validate_ids" and value else key.flag
            layer[key.name] = _Raw(value, flag, typed=False)
    for name, flag in _BODY_KEYS.items():
        value = getattr(args, name, None)
        if value is not None:
            layer[name] = _Raw(value, flag, typed=False)
    token_file = getattr(args, "token_file", None)
    if token_file is not None:
        layer["token_file"] = _Raw(token_file, _TOKEN_FILE_FLAG, typed=False)
    relay_secret_file = getattr(args, "relay_secret_file", None)
    if relay_secret_file is not None:
        layer["relay_secret_file"] = _Raw(relay_secret_file, _RELAY_SECRET_FILE_FLAG, typed=False)
    return layer


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _env_layer(env: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for key in _KEYS:
        if key.env is not None and (value := _env_value(env, key.env)) is not None:
            layer[key.name] = _Raw(value, key.env, typed=False)
    return layer


def _unknown_key(where: str, key: str) -> ConfigError:
    normalized = key.lower().replace("-", "_")
    if normalized in TOML_KEYS:
        match: str | None = normalized
    else:
        matches = difflib.get_close_matches(key, sorted(TOML_KEYS), n=1, cutoff=0.6)
        match = matches[0] if matches else None
    hint = f"did you mean {match!r}?" if match else f"known keys: {', '.join(sorted(TOML_KEYS))}"
    return ConfigError(where, f"unknown key {key!r}; {hint}")


def _toml_layer(path: str) -> _Layer:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message gives line and column only, never the text around them.
        raise ConfigError(path, f"not valid TOML: {exc}") from None

    table: dict[str, Any] = document
    prefix = ""
    if "send" in document:
        if not isinstance(document["send"], dict):
            raise ConfigError(
                f"{path}: send", f"expected a table, got {_type_name(document['send'])}"
            )
        for key in document:
            if key != "send":
                raise ConfigError(
                    f"{path}: {key}",
                    "key outside [send]; with a [send] table every setting goes in it",
                )
        table, prefix = document["send"], "send."

    layer: _Layer = {}
    for key, value in table.items():
        where = f"{path}: {prefix}{key}"
        if _is_secret_key(key):
            raise ConfigError(where, _SECRET_HINT)
        if key not in TOML_KEYS:
            raise _unknown_key(where, key)
        layer[key] = _Raw(value, where, typed=True)
    return layer


# --- the values read by hand --------------------------------------------------------


def _read_body(layers: list[_Layer]) -> tuple[bytes, str] | None:
    """The body from the first layer that has one, as compact JSON, and its source."""
    for layer in layers:
        text, file = layer.get("body"), layer.get("body_file")
        if text is not None and file is not None:
            raise ConfigError(file.where, f"cannot be used together with {text.where}")
        if text is not None:
            raw, where = _to_str(text).encode(), text.where
        elif file is not None:
            path, where = _to_str(file), file.where
            try:
                with open(path, "rb") as handle:
                    # One byte over the limit is enough to know it is too big.
                    raw = handle.read(MAX_BODY_BYTES + 1)
            except OSError as exc:
                raise ConfigError(where, f"cannot read {path!r}: {exc.strerror}") from None
        else:
            continue
        if len(raw) > MAX_BODY_BYTES:
            raise ConfigError(where, f"the body is over the API's limit of {MAX_BODY_BYTES} bytes")
        try:
            # Re-encoded compactly, once, as the record readers do for per-line bodies.
            return orjson.dumps(orjson.loads(raw)), where
        except orjson.JSONDecodeError as exc:
            raise ConfigError(where, f"not valid JSON: {exc}") from None
    return None


def _read_token_file(raw: _Raw) -> str:
    path = _to_str(raw)
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    # The path is not quoted back: a token pasted where its path belongs would leak.
    except OSError as exc:
        raise ConfigError(raw.where, f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(raw.where, "the file is not UTF-8 text") from None
    if not token:
        raise ConfigError(raw.where, "the file is empty")
    return token


def _relay_secret(layers: list[_Layer], env: Mapping[str, str]) -> str:
    """The relay's secret: --relay-secret-file, DISPATCHER_RELAY_SECRET, relay_secret_file."""
    flags, _, toml = layers
    if (file := flags.get("relay_secret_file")) is not None:
        return _read_token_file(file)
    if (secret := _env_value(env, RELAY_SECRET_ENV)) is not None:
        return secret
    if (file := toml.get("relay_secret_file")) is not None:
        return _read_token_file(file)
    raise ConfigError(
        "--target relay",
        f"needs the relay's secret; set {RELAY_SECRET_ENV} or pass --relay-secret-file PATH",
    )


def _target_defaults(values: dict[str, Any]) -> None:
    """Fill in what the target decides when no source gave it: base URL, rate, workers."""
    spec = spec_of(values.get("target", "api"))
    if "base_url" not in values:
        if spec.name == "relay":
            raise ConfigError(
                "--base-url",
                "required with --target relay: the relay Worker's URL, such as "
                "https://dispatcher-relay.<subdomain>.workers.dev",
            )
        if spec.default_base_url is not None:
            values["base_url"] = spec.default_base_url
    if "rate" not in values and spec.default_rate is None:
        values["rate"] = "unlimited"
    if "concurrency" not in values and spec.default_concurrency is not None:
        values["concurrency"] = spec.default_concurrency


def _credentials(flags: _Layer, env: Mapping[str, str], toml: _Layer) -> Credentials:
    """The first credentials found, in the order the module docstring gives."""
    token = _env_value(env, ENV_TOKEN)
    email = _env_value(env, ENV_EMAIL)
    api_key = _env_value(env, ENV_API_KEY)
    rename: dict[str, str]
    if (file := flags.get("token_file")) is not None:
        values, rename = {"token": _read_token_file(file)}, {"token": file.where}
    elif token is not None:
        values, rename = {"token": token}, {"token": ENV_TOKEN}
    elif email is not None and api_key is not None:
        values = {"email": email, "api_key": api_key}
        rename = {"email": ENV_EMAIL, "api_key": ENV_API_KEY}
    elif (file := toml.get("token_file")) is not None:
        values, rename = {"token": _read_token_file(file)}, {"token": file.where}
    elif email is not None or api_key is not None:
        missing, present = (ENV_API_KEY, ENV_EMAIL) if email else (ENV_EMAIL, ENV_API_KEY)
        raise ConfigError(missing, f"not set, but {present} is; the legacy scheme needs both")
    else:
        raise ConfigError(
            "credentials",
            f"none found; set {ENV_TOKEN} (or {ENV_EMAIL} and {ENV_API_KEY}), "
            "or pass --token-file PATH",
        )
    try:
        return Credentials(**values)
    except ConfigError as exc:
        raise ConfigError(rename.get(exc.where, exc.where), exc.message) from None


# --- the merge ----------------------------------------------------------------------


# What a --dry-run shows in place of what it does not need (its URLs and headers are a
# preview; the token is redacted in them whatever it is).
PREVIEW_ACCOUNT_ID: Final = "ACCOUNT_ID"
_PREVIEW_TOKEN: Final = "dry-run-placeholder-token"


def load_send_settings(
    args: argparse.Namespace, env: Mapping[str, str], *, needs: list[str] | None = None
) -> SendSettings:
    """Merge flags (``args``, from :func:`add_send_arguments`), ``env`` and the
    ``--config`` file over the defaults, check everything once, and return the value.

    Raises :class:`~dispatcher.run.settings.ConfigError` naming the flag, environment
    variable or ``file: key`` of the first bad or missing value. ``env`` is passed in
    (usually ``os.environ``) so that tests and library callers control it.

    With ``needs`` (a list, for ``--dry-run``), missing credentials and a missing account
    id are not errors: a placeholder stands in, and ``needs`` gets one line for each, saying
    what a real run would still need. A value given but wrong is an error all the same.
    """
    config_path = getattr(args, "config", None)
    flags = _flag_layer(args)
    toml = _toml_layer(config_path) if config_path is not None else {}
    layers = [flags, _env_layer(env), toml]

    values: dict[str, Any] = {}
    # Where each field came from; a field not given is named by its flag, which is what
    # the user would add to fix it.
    where = {key.name: key.flag for key in _KEYS}
    where |= {"inputs": "INPUT", "body": "--body", "credentials": "credentials"}
    for key in _KEYS:
        raw = next((layer[key.name] for layer in layers if key.name in layer), None)
        if raw is not None:
            values[key.name] = key.convert(raw)
            where[key.name] = raw.where

    if where["redis_url"] == "DISPATCHER_REDIS_URL":
        # Say which flag it stands for: a bad URL from the environment is --redis's.
        where["redis_url"] = "--redis (DISPATCHER_REDIS_URL)"
    if (body := _read_body(layers)) is not None:
        values["body"], where["body"] = body

    inputs = getattr(args, "inputs", None)
    values["inputs"] = tuple(inputs) if isinstance(inputs, list | tuple) else inputs
    _target_defaults(values)
    target = values.get("target", "api")
    if target == "relay":
        values["relay_secret"] = _relay_secret(layers, env)
        where["relay_secret"] = "relay secret"
    if target != "api":
        # No Cloudflare token is read, so none can be sent to a relay or a local server.
        values.pop("account_id", None)
        return _settings(values, where)
    try:
        values["credentials"] = _credentials(flags, env, toml)
    except ConfigError as exc:
        if needs is None or exc.where != "credentials":
            raise
        needs.append(f"a token: {exc.message}")
        values["credentials"] = Credentials(token=_PREVIEW_TOKEN)
    if "account_id" not in values and needs is not None:
        needs.append("an account id: pass --account-id or set CLOUDFLARE_ACCOUNT_ID")
        values["account_id"] = PREVIEW_ACCOUNT_ID
    if "account_id" not in values:
        raise ConfigError(
            "--account-id",
            "required; pass --account-id, set CLOUDFLARE_ACCOUNT_ID, "
            "or set account_id in the config file",
        )
    return _settings(values, where)


def _settings(values: dict[str, Any], where: dict[str, str]) -> SendSettings:
    try:
        return SendSettings(**values)
    except ConfigError as exc:
        # SendSettings names its fields; the user needs the flag, variable or key.
        raise ConfigError(where.get(exc.where, exc.where), exc.message) from None
