"""dispatcher: send events to Cloudflare Workflows instances in bulk.

The public API is what ``__all__`` lists; everything else is internal.
"""

from __future__ import annotations

from dispatcher.model import (
    Delivery,
    Envelope,
    EnvelopeError,
    ErrorKind,
    Event,
    Invalid,
    Outcome,
    Record,
)
from dispatcher.records import KeyDeriver, event_from_mapping
from dispatcher.runner import dispatch, run
from dispatcher.settings import (
    ConfigError,
    Credentials,
    Rate,
    SendSettings,
    parse_duration,
    parse_rate,
)
from dispatcher.stats import RunStats

__all__ = [
    "ConfigError",
    "Credentials",
    "Delivery",
    "Envelope",
    "EnvelopeError",
    "ErrorKind",
    "Event",
    "Invalid",
    "KeyDeriver",
    "Outcome",
    "Rate",
    "Record",
    "RunStats",
    "SendSettings",
    "dispatch",
    "event_from_mapping",
    "parse_duration",
    "parse_rate",
    "run",
]

__version__ = "0.1.0"
