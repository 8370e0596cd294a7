"""The settings of `dispatcher send` as frozen values, their defaults and their parsers.

Pure values: nothing here reads flags, the environment or files (that is
:mod:`dispatcher.run.config`). Every value checks itself once, when built, and raises
:class:`ConfigError` naming the field; the loader renames the field to the flag, the
environment variable or the config-file key the value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal, TypeAlias
from urllib.parse import urlsplit

import orjson

from dispatcher.clients.targets import DEFAULT_RELAY_BATCH, MAX_RELAY_BATCH, TARGETS, Target
from dispatcher.coordination.urls import check_redis_url, redact
from dispatcher.inputs.validation import (
    MAX_BODY_BYTES,
    MAX_EVENT_TYPE_LEN,
    MAX_WORKFLOW_LEN,
    NAME_PATTERN,
    RuleViolation,
    check_path,
)
from dispatcher.model import UserError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_ERROR_WINDOW",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_RETRY_WAIT",
    "DEFAULT_PROGRESS",
    "DEFAULT_RATE",
    "DEFAULT_REDIS_OUTAGE_TIMEOUT",
    "DEFAULT_RESULTS",
    "DEFAULT_TIMEOUT",
    "MAX_CONCURRENCY",
    "ConfigError",
    "Credentials",
    "Format",
    "Progress",
    "Rate",
    "RateSetting",
    "SendSettings",
    "parse_duration",
    "parse_fraction",
    "parse_rate",
]


class ConfigError(UserError, ValueError):
    """A setting is missing or wrong.

    ``where`` names it the way the user wrote it: ``--rate``, ``CLOUDFLARE_BASE_URL`` or
    ``dispatcher.toml: rate``; ``str(error)`` is ``"{where}: {message}"``. Messages never
    quote a credential.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        # The default reduce replays ``self.args`` (one string) into a two-argument
        # __init__, so without this the error cannot cross a process boundary.
        return (type(self), (self.where, self.message))


# --- rates and durations -------------------------------------------------------------

_UNIT_SECONDS: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# No exponent on purpose: "1e3s" is more likely a typo than a wish.
_DURATION = re.compile(r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>ms|s|m|h)?")
_RATE_HELP: Final = (
    "expected COUNT/PERIOD such as '4/s', '1200/5m', '100/2.5s', or 'unlimited'/'auto'"
)


def _format_number(value: float) -> str:
    # repr() is the shortest text that reads back as the same float; Decimal spells it
    # without an exponent, which parse_duration does not accept.
    text = format(Decimal(repr(float(value))), "f")
    return text.removesuffix(".0") if "." in text else text


def _format_period(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds == size:
            return unit
        if seconds > size and (seconds / size).is_integer():
            return f"{_format_number(seconds / size)}{unit}"
    if seconds < 1.0 and (seconds * 1000.0).is_integer():
        return f"{_format_number(seconds * 1000.0)}ms"
    return f"{_format_number(seconds)}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """At most ``count`` requests per ``per`` seconds, spread evenly (no burst)."""

    count: float
    per: float

    def __post_init__(self) -> None:
        for name in ("count", "per"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"rate {name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"rate {name} must be a positive finite number, got {value!r}"
                    + ("; use 'unlimited' for no limit" if name == "count" else "")
                )
            # Floats throughout, so that Rate(count=4, per=1) prints like a parsed rate.
            object.__setattr__(self, name, float(value))

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        # The inverse of parse_rate: parse_rate(str(rate)) == rate.
        return f"{_format_number(self.count)}/{_format_period(self.per)}"


RateSetting: TypeAlias = Rate | Literal["unlimited", "auto"]
"""``"unlimited"``: no rate gate at all (emulator, load tests). ``"auto"``: the rate gate
picks and adapts the rate from the server's ``Ratelimit`` headers."""


def parse_fraction(text: str) -> float:
    """``5%`` or ``0.05`` → 0.05; must be above 0 and at most 1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"expected a percentage such as 5% or a fraction, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"must be above 0% and at most 100%, got {text!r}")
    return value


def parse_duration(text: str) -> float:
    """Seconds from ``"30"``, ``"30s"``, ``"200ms"``, ``"5m"``, ``"1h"``, ``"1.5s"``.

    A bare number is seconds. Zero is allowed here; each setting decides whether it
    makes sense for it.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: expected a number of seconds or a number with "
            "a unit ms, s, m or h, such as '30s', '200ms', '5m'"
        )
    number = float(match["number"])
    # Divide for milliseconds: 955 / 1000 is the double nearest 0.955, 955 * 0.001 is not,
    # and a rate's text must read back as the same rate.
    unit = match["unit"] or "s"
    seconds = number / 1000.0 if unit == "ms" else number * _UNIT_SECONDS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {text!r}: too large")
    if seconds < 0:
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    return seconds


def parse_rate(text: str) -> RateSetting:
    """A rate from ``"4/s"``, ``"4/1s"``, ``"1200/5m"``, ``"100/2.5s"``, ``"10/h"``,
    ``"4"`` (per second), ``"unlimited"`` or ``"auto"``.

    Raises :class:`ValueError` with a message fit to show after the flag's name.
    """
    cleaned = text.strip().lower()
    if cleaned in ("unlimited", "auto"):
        return "unlimited" if cleaned == "unlimited" else "auto"
    count_text, slash, period_text = cleaned.partition("/")
    try:
        count = float(count_text)
    except ValueError:
        raise ValueError(f"invalid rate {text!r}: {_RATE_HELP}") from None
    if not slash:
        period = 1.0
    else:
        period_text = period_text.strip()
        # "4/s" means "4 per 1 s": a bare unit is a period of one of it.
        if period_text in _UNIT_SECONDS:
            period_text = "1" + period_text
        try:
            period = parse_duration(period_text)
        except ValueError:
            raise ValueError(f"invalid rate {text!r}: {_RATE_HELP}") from None
    if not math.isfinite(count) or count <= 0:
        raise ValueError(
            f"invalid rate {text!r}: the count must be a positive number; "
            "use 'unlimited' for no limit"
        )
    if period <= 0:
        raise ValueError(f"invalid rate {text!r}: the period must be longer than zero")
    return Rate(count=count, per=period)


# --- defaults (httpx `_config.py` style: one named constant each) ---------------------

DEFAULT_BASE_URL: Final = "https://api.cloudflare.com/client/v4"
# The documented global limit: 1200 requests per 5 minutes per user, summed over every
# token and the dashboard. Going over locks the whole account out for 5 minutes.
DEFAULT_RATE: Final = Rate(count=1200, per=300.0)
# At the default 4 requests/s and ~0.3 s of latency only one or two requests are in
# flight at a time, so 8 workers are already plenty; more only pay off with a higher
# rate (an emulator, an unlimited run) where latency, not the budget, is the bound.
DEFAULT_CONCURRENCY: Final = 8
MAX_CONCURRENCY: Final = 1024
DEFAULT_MAX_ATTEMPTS: Final = 5
# Long enough to sit out the 5-minute lockout that follows a 429, twice over.
DEFAULT_MAX_RETRY_WAIT: Final = 600.0
DEFAULT_TIMEOUT: Final = 30.0  # the whole request, connect to last byte
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_RESULTS: Final = "results.jsonl"
DEFAULT_PROGRESS: Final = "auto"
DEFAULT_GRACE: Final = 30.0  # seconds requests in flight get to finish after Ctrl-C
DEFAULT_ERROR_WINDOW: Final = 100  # records over which --max-error-rate is taken
# How long a --redis run waits for Redis to come back before it ends (exit 3, resumable).
DEFAULT_REDIS_OUTAGE_TIMEOUT: Final = 60.0
MAX_PROCESSES: Final = 64
HttpClient = Literal["fast", "aiohttp"]
HTTP_CLIENTS: Final = ("fast", "aiohttp")

Format: TypeAlias = Literal["jsonl", "csv", "ids"]
Progress: TypeAlias = Literal["auto", "bar", "lines", "off"]
_FORMATS: Final = ("jsonl", "csv", "ids")
_PROGRESS: Final = ("auto", "bar", "lines", "off")


# --- credentials ----------------------------------------------------------------------

# Header values go on the wire verbatim: a stray newline would split the header, a
# space is a copy-paste accident. Visible ASCII only.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_REDACTED: Final = "<redacted>"
# The shortest token or API key accepted (see Credentials): a Cloudflare API token is 40
# characters, a global API key 37; anything this short is a typo or a placeholder.
MIN_SECRET_CHARS: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True, repr=False, eq=False)
class Credentials:
    """How requests authenticate: an API token, or the legacy email + global API key.

    Exactly one scheme. The secrets never appear in ``repr()``/``str()``, in
    :func:`dataclasses.fields`-driven printers (rich, pytest's assertion diffs: the
    fields are ``repr=False, compare=False``) or in any error message.
    """

    token: str | None = dataclasses.field(default=None, repr=False, compare=False)
    email: str | None = dataclasses.field(default=None, repr=False, compare=False)
    api_key: str | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        legacy = self.email is not None or self.api_key is not None
        if self.token is not None and legacy:
            raise ConfigError("token", "give either a token or email + api_key, not both")
        if self.token is None and not legacy:
            raise ConfigError("token", "no credentials: give a token or email + api_key")
        if legacy:
            for name in ("email", "api_key"):
                if getattr(self, name) is None:
                    raise ConfigError(name, "the legacy scheme needs both email and api_key")
        for name in ("token", "email", "api_key"):
            value = getattr(self, name)
            if value is None:
                continue
            # Say what is wrong without quoting the value: it may be a secret.
            if not isinstance(value, str):
                raise ConfigError(name, f"must be a string, got {type(value).__name__}")
            if not value:
                raise ConfigError(name, "is empty")
            if _HEADER_SAFE.fullmatch(value) is None:
                raise ConfigError(name, "must be printable ASCII without spaces or line breaks")
            if name != "email" and len(value) < MIN_SECRET_CHARS:
                # Every text a server sends is searched for the secret and it is cut out:
                # a secret of a letter or two is in every other word ("In<redacted>ernal").
                # Real ones are long: an API token is 40 characters, a global API key 37.
                raise ConfigError(
                    name,
                    f"is {len(value)} character{'s' if len(value) != 1 else ''} long, too "
                    f"short for a credential (at least {MIN_SECRET_CHARS}; a Cloudflare "
                    "API token is 40)",
                )

    @property
    def scheme(self) -> Literal["token", "legacy"]:
        return "token" if self.token is not None else "legacy"

    def headers(self) -> dict[str, str]:
        """The authentication headers; build them once per run, not per request."""
        if self.token is not None:
            return {"Authorization": f"Bearer {self.token}"}
        # Both are set: __post_init__ allows no other legacy shape.
        assert self.email is not None
        assert self.api_key is not None
        return {"X-Auth-Email": self.email, "X-Auth-Key": self.api_key}

    def __repr__(self) -> str:
        if self.scheme == "token":
            return f"Credentials(token={_REDACTED})"
        return f"Credentials(email={_REDACTED}, api_key={_REDACTED})"

    __str__ = __repr__

    # Hand-written so that equality still covers the secrets while the fields stay
    # compare=False (which keeps them out of field-by-field diff printers).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return (self.token, self.email, self.api_key) == (other.token, other.email, other.api_key)

    def __hash__(self) -> int:
        return hash((self.token, self.email, self.api_key))


# --- the send command's settings --------------------------------------------------------

# Cloudflare account ids are 32 hex digits; allow any path-safe id so that emulators
# and tests may use readable ones.
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _normalize_base_url(url: str) -> str:
    """``url`` without its trailing slash, or :class:`ConfigError` (field ``base_url``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError("base_url", f"invalid URL {url!r}: {exc}") from None
    if parts.username is not None or parts.password is not None:
        # Not quoted: whatever sits before the "@" may be a password.
        raise ConfigError(
            "base_url", "must not hold credentials (user:password@); use the env vars"
        )
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError("base_url", f"invalid URL {url!r}: expected https://host[:port][/path]")
    if parts.query or parts.fragment:
        raise ConfigError("base_url", f"invalid URL {url!r}: no query or fragment allowed")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        # The token would travel in clear text; plain http is only for a local emulator.
        raise ConfigError(
            "base_url",
            f"{url!r} uses plain http, which is only allowed for a loopback host "
            "(127.0.0.0/8, ::1, localhost); use https",
        )
    return url.rstrip("/")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(name, f"must be {bounds}, got {value}")


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(name, f"must be {expected} seconds, got {value!r}")
    return float(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")


_JOB_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# The list endpoint's status filter (Cloudflare API reference).
INSTANCE_STATUSES: Final = (
    "queued", "running", "paused", "errored", "terminated", "complete", "waitingForPause",
    "waiting",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class SendSettings:
    """Everything `dispatcher send` needs, checked once.

    Errors are :class:`ConfigError` whose ``where`` is the field name;
    :func:`dispatcher.run.config.load_send_settings` renames it to where the value came from.
    """

    inputs: tuple[str, ...]  # paths; "-" is stdin
    format: Format | None = None  # None: each source decides from its file name
    workflow: str | None = None
    event_type: str | None = None  # the event sent to every id of an id list
    body: bytes | None = None  # JSON text, already checked, for id lists
    validate_ids: bool = True  # False lets system-generated (cron) instance ids through
    # Where events go (dispatcher.clients.targets); only "api" needs an account and a token.
    target: Target = "api"
    account_id: str | None = None
    allow_extra_fields: bool = False  # True: unknown JSONL fields / CSV columns are ignored
    base_url: str = DEFAULT_BASE_URL
    credentials: Credentials | None = None
    relay_secret: str | None = dataclasses.field(default=None, repr=False, compare=False)
    batch_size: int = DEFAULT_RELAY_BATCH  # events per POST /events, target relay only
    rate: RateSetting = DEFAULT_RATE
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    results: str = DEFAULT_RESULTS  # path, or "-" for stdout
    quiet: bool = False
    progress: Progress = DEFAULT_PROGRESS
    overwrite: bool = False  # replace an existing results file
    resume: bool = False  # skip records the existing results already settle
    retry_failed: bool = False  # on resume, re-send rejected and not_sent records
    resend_unknown: bool = False  # on resume, re-send records whose delivery is unknown
    grace: float = DEFAULT_GRACE
    max_failures: int | None = None
    max_error_rate: float | None = None  # a fraction in (0, 1]
    error_window: int = DEFAULT_ERROR_WINDOW
    processes: int = 1  # worker processes sharing the input and the rate budget
    http_client: HttpClient = "fast"  # our lean HTTP/1.1 client, or aiohttp
    # --redis: the account's budget (and --job's work) in Redis. Out of the field-driven
    # repr (it may hold a password): __repr__ shows it redacted.
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    redis_outage_timeout: float = DEFAULT_REDIS_OUTAGE_TIMEOUT  # then the run ends, exit 3
    job: str | None = None  # --job: share this input's work with every process of that name
    # --instances-of: the records are the instances the list endpoint names, not files.
    instances_of: str | None = None
    instance_status: str | None = None  # --status: the list endpoint's own filter
    waiting_for: str | None = None  # --waiting-for: only instances parked in this wait

    def __post_init__(self) -> None:
        self._check_inputs()
        self._check_instances()
        if self.format is not None:
            _check_choice("format", self.format, _FORMATS)
        self._check_path_parts()
        if self.body is not None:
            self._check_body(self.body)
        for name in (
            "validate_ids",
            "allow_extra_fields",
            "quiet",
            "overwrite",
            "resume",
            "retry_failed",
            "resend_unknown",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, "must be true or false")
        self._check_target()
        if not isinstance(self.base_url, str):
            raise ConfigError("base_url", f"must be a string, got {type(self.base_url).__name__}")
        object.__setattr__(self, "base_url", _normalize_base_url(self.base_url))
        if not isinstance(self.rate, Rate) and self.rate not in ("unlimited", "auto"):
            raise ConfigError("rate", f"must be a Rate, 'unlimited' or 'auto', got {self.rate!r}")
        _check_int("concurrency", self.concurrency, 1, MAX_CONCURRENCY)
        _check_int("max_attempts", self.max_attempts, 1)
        # Normalised to float so that an int default from a caller compares and prints
        # like the parsed values do.
        for name, allow_zero in (
            ("max_retry_wait", True),
            ("timeout", False),
            ("connect_timeout", False),
        ):
            seconds = _check_seconds(name, getattr(self, name), allow_zero=allow_zero)
            object.__setattr__(self, name, seconds)
        self._check_results()
        _check_choice("progress", self.progress, _PROGRESS)
        object.__setattr__(self, "grace", _check_seconds("grace", self.grace, allow_zero=True))
        if self.max_failures is not None:
            _check_int("max_failures", self.max_failures, 1)
        if self.max_error_rate is not None and (
            isinstance(self.max_error_rate, bool)
            or not isinstance(self.max_error_rate, int | float)
            or not 0 < self.max_error_rate <= 1
        ):
            raise ConfigError(
                "max_error_rate", f"must be above 0% and at most 100%, got {self.max_error_rate!r}"
            )
        _check_int("error_window", self.error_window, 1)
        _check_int("processes", self.processes, 1, MAX_PROCESSES)
        _check_choice("http_client", self.http_client, HTTP_CLIENTS)
        if self.processes > 1 and self.results == "-":
            raise ConfigError("processes", "needs a results file, not stdout")
        self._check_coordination()
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "cannot be combined with --resume")
        if (self.retry_failed or self.resend_unknown) and not self.resume:
            # Both only make sense against earlier results: they imply --resume.
            object.__setattr__(self, "resume", True)
        if self.resume and self.results == "-":
            raise ConfigError("resume", "needs a results file to resume from, not stdout")

    def __repr__(self) -> str:
        shown = [
            f"{field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.repr
        ]
        if self.redis_url is not None:
            shown.append(f"redis_url={redact(str(self.redis_url))!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def keeps_results(self) -> bool:
        """Whether earlier results at ``results`` are carried on, not refused: with
        ``--resume``, and for a ``--job`` (which resumes by itself, from Redis)."""
        return self.resume or self.job is not None

    def _check_target(self) -> None:
        _check_choice("target", self.target, TARGETS)
        if self.account_id is not None and (
            not isinstance(self.account_id, str) or _ACCOUNT_ID.fullmatch(self.account_id) is None
        ):
            raise ConfigError(
                "account_id", f"must be 1..64 letters, digits, '-' or '_', got {self.account_id!r}"
            )
        if self.credentials is not None and not isinstance(self.credentials, Credentials):
            raise ConfigError("credentials", "must be a Credentials value")
        if self.target == "api":
            if self.account_id is None:
                raise ConfigError("account_id", "required with --target api")
            if self.credentials is None:
                raise ConfigError("credentials", "required with --target api")
        _check_int("batch_size", self.batch_size, 1, MAX_RELAY_BATCH)
        if self.target == "relay":
            if self.relay_secret is None:
                raise ConfigError("relay_secret", "required with --target relay")
            # Said without quoting it: it is a secret.
            if not isinstance(self.relay_secret, str) or not self.relay_secret:
                raise ConfigError("relay_secret", "is empty")
            if _HEADER_SAFE.fullmatch(self.relay_secret) is None:
                raise ConfigError(
                    "relay_secret", "must be printable ASCII without spaces or line breaks"
                )

    def _check_coordination(self) -> None:
        if self.redis_url is not None:
            if not isinstance(self.redis_url, str):
                raise ConfigError("redis_url", "must be a redis://, rediss:// or unix:// URL")
            problem = check_redis_url(self.redis_url)
            if problem is not None:
                raise ConfigError("redis_url", f"{redact(self.redis_url)}: {problem}")
        seconds = _check_seconds(
            "redis_outage_timeout", self.redis_outage_timeout, allow_zero=False
        )
        object.__setattr__(self, "redis_outage_timeout", seconds)
        if self.job is None:
            if self.redis_url is not None and self.processes > 1:
                raise ConfigError(
                    "processes", "with --redis, start each process yourself (with --job to share)"
                )
            return
        if not isinstance(self.job, str) or _JOB_NAME.fullmatch(self.job) is None:
            raise ConfigError(
                "job", f"must be 1..64 letters, digits, '.', '-' or '_', got {self.job!r}"
            )
        if self.redis_url is None:
            raise ConfigError("job", "needs --redis (or DISPATCHER_REDIS_URL): the job lives there")
        if self.processes > 1:
            raise ConfigError("processes", "--job shares the work through Redis: start N processes")
        if self.resume:
            raise ConfigError(
                "resume", "a --job resumes by itself: start it again with the same name"
            )
        if self.results == "-":
            raise ConfigError("job", "each process of a job needs its own --results file")

    def _check_instances(self) -> None:
        if self.instances_of is None:
            for name in ("instance_status", "waiting_for"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "needs --instances-of WORKFLOW")
            return
        if self.inputs:
            raise ConfigError(
                "instances_of", "takes its records from the list endpoint: give no INPUT file"
            )
        try:
            check_path(self.instances_of, "i", "e")
        except RuleViolation as exc:
            raise ConfigError("instances_of", exc.message) from None
        if self.workflow is not None and self.workflow != self.instances_of:
            raise ConfigError("workflow", "differs from --instances-of; give one of them")
        if self.event_type is None:
            raise ConfigError("event_type", "required with --instances-of")
        if self.instance_status is not None and self.instance_status not in INSTANCE_STATUSES:
            raise ConfigError("instance_status", f"must be one of {', '.join(INSTANCE_STATUSES)}")
        if self.waiting_for is not None and (
            not isinstance(self.waiting_for, str) or not 1 <= len(self.waiting_for) <= 100
        ):
            raise ConfigError("waiting_for", "must be an event type of 1..100 characters")
        if self.target == "relay":
            raise ConfigError(
                "instances_of",
                "the relay's Workflow binding cannot list instances: write the ids with "
                "`dispatcher instances list --workflow W --out ids.txt` (REST), then "
                "`dispatcher send ids.txt --target relay ...`",
            )
        if self.processes > 1 or self.job is not None:
            raise ConfigError(
                "instances_of", "one process reads the listing: not with --processes or --job"
            )
        object.__setattr__(self, "workflow", self.instances_of)

    def _check_inputs(self) -> None:
        # Empty is allowed: dispatch() takes its records from the caller, not from files.
        if not isinstance(self.inputs, tuple):
            raise ConfigError("inputs", "must be a tuple of paths")
        for item in self.inputs:
            if not isinstance(item, str) or not item:
                raise ConfigError("inputs", f"each input must be a non-empty path, got {item!r}")
        if self.inputs.count("-") > 1:
            raise ConfigError("inputs", "stdin (-) can be read only once")

    def _check_path_parts(self) -> None:
        if self.workflow is not None and (
            not isinstance(self.workflow, str)
            or not 1 <= len(self.workflow) <= MAX_WORKFLOW_LEN
            or NAME_PATTERN.fullmatch(self.workflow) is None
        ):
            raise ConfigError(
                "workflow",
                f"must be 1..{MAX_WORKFLOW_LEN} characters matching "
                f"^[a-zA-Z0-9_][a-zA-Z0-9-_]*$, got {self.workflow!r}",
            )
        if self.event_type is not None and (
            not isinstance(self.event_type, str)
            or not 1 <= len(self.event_type) <= MAX_EVENT_TYPE_LEN
        ):
            raise ConfigError(
                "event_type", f"must be 1..{MAX_EVENT_TYPE_LEN} characters, got {self.event_type!r}"
            )
        # An id list carries no path parts of its own: both must come from the settings.
        if self.format == "ids":
            for name in ("workflow", "event_type"):
                if getattr(self, name) is None:
                    raise ConfigError(name, "is required for id lists (format ids)")

    @staticmethod
    def _check_body(body: object) -> None:
        if not isinstance(body, bytes):
            raise ConfigError("body", f"must be JSON as bytes, got {type(body).__name__}")
        if len(body) > MAX_BODY_BYTES:
            raise ConfigError(
                "body", f"is {len(body)} bytes, over the API's limit of {MAX_BODY_BYTES}"
            )
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ConfigError("body", f"is not valid JSON: {exc}") from None

    def _check_results(self) -> None:
        if not isinstance(self.results, str) or not self.results:
            raise ConfigError("results", "must be a path, or - for stdout")
        # Writing envelopes over a file still being read would destroy the input.
        if self.results != "-" and os.path.abspath(self.results) in {
            os.path.abspath(item) for item in self.inputs if item != "-"
        }:
            raise ConfigError("results", f"{self.results!r} is also an input")
