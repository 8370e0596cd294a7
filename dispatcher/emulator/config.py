"""The emulator's settings: small frozen values, validated once, with parsers for the shell."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from dispatcher.emulator.faults import Faults
from dispatcher.emulator.instances import InstanceModel
from dispatcher.emulator.units import format_seconds, parse_duration

#: Cloudflare's global API limit: 1200 requests per 5 minutes per user.
DEFAULT_LIMIT_SPEC: Final = "1200/5m"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8787


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """A budget of ``quota`` requests per ``window`` seconds, per credential."""

    quota: int
    window: float

    def __post_init__(self) -> None:
        if isinstance(self.quota, bool) or not isinstance(self.quota, int) or self.quota < 1:
            raise ValueError(f"limit quota must be a whole number >= 1, got {self.quota!r}")
        if not isinstance(self.window, int | float) or not 0 < self.window < math.inf:
            raise ValueError(
                f"limit window must be a positive number of seconds, got {self.window!r}"
            )

    @classmethod
    def parse(cls, text: str) -> Limit | None:
        """``"1200/5m"`` -> ``Limit(quota=1200, window=300.0)``; ``"off"`` -> ``None``."""
        spec = text.strip()
        if spec.lower() in {"off", "none", "0"}:
            return None
        quota_text, sep, window_text = spec.partition("/")
        if not sep or not quota_text.strip().isdigit():
            raise ValueError(
                f"{text!r} is not a limit: use QUOTA/WINDOW like 1200/5m or 200/1s, or off"
            )
        try:
            return cls(quota=int(quota_text), window=parse_duration(window_text))
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.quota}/{format_seconds(self.window)}s"


def _check_strings(name: str, values: object) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{name} must be a tuple of non-empty strings")


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorConfig:
    """Everything the emulator does differently from run to run.

    ``tokens`` / ``legacy_keys`` empty means any non-empty credential passes, which is what
    a local test wants; set them to check that a client sends the right one.
    ``lockout=None`` locks a credential out for one ``limit.window``, as Cloudflare does.
    ``keep_requests=False`` stops keeping one :class:`RequestEntry` per request, so a long
    shell run keeps flat memory (counts and accepted keys are still kept).
    ``strict_ids=False`` lets cron-style system instance ids through (length still checked).
    ``instances`` (opt-in) models instances: create, list, get, and events kept per
    instance; unknown instance ids then answer 404 code 10400. ``None``: event-only mode.
    """

    tokens: tuple[str, ...] = ()
    legacy_keys: tuple[tuple[str, str], ...] = ()
    limit: Limit | None = field(default_factory=lambda: Limit(quota=1200, window=300.0))
    lockout: float | None = None
    known_instances: frozenset[str] | None = None
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    host: str = DEFAULT_HOST
    port: int = 0
    keep_requests: bool = True
    strict_ids: bool = True
    instances: InstanceModel | None = None

    def __post_init__(self) -> None:
        if self.instances is not None and not isinstance(self.instances, InstanceModel):
            raise ValueError(f"instances must be an InstanceModel or None, got {self.instances!r}")
        _check_strings("tokens", self.tokens)
        if not isinstance(self.legacy_keys, tuple) or not all(
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(part, str) and part for part in pair)
            for pair in self.legacy_keys
        ):
            raise ValueError(
                "legacy_keys must be a tuple of (email, key) pairs of non-empty strings"
            )
        if self.limit is not None and not isinstance(self.limit, Limit):
            raise ValueError(f"limit must be a Limit or None, got {self.limit!r}")
        if self.lockout is not None and (
            not isinstance(self.lockout, int | float) or not 0 < self.lockout < math.inf
        ):
            raise ValueError(f"lockout must be a positive number of seconds, got {self.lockout!r}")
        if self.known_instances is not None and not (
            isinstance(self.known_instances, frozenset)
            and all(isinstance(i, str) for i in self.known_instances)
        ):
            raise ValueError("known_instances must be a frozenset of strings or None")
        if not isinstance(self.faults, Faults):
            raise ValueError(f"faults must be a Faults, got {self.faults!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must be a non-empty string")
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 <= self.port <= 65535
        ):
            raise ValueError(f"port must be 0..65535 (0 picks a free port), got {self.port!r}")

    @property
    def effective_lockout(self) -> float | None:
        """Seconds a credential stays locked out after exceeding its budget (None: no limit)."""
        if self.limit is None:
            return None
        return self.limit.window if self.lockout is None else float(self.lockout)
