"""dispatcher: send events to Cloudflare Workflows instances in bulk.

The public API is what ``__all__`` lists; everything else is internal.
"""

from __future__ import annotations

from dispatcher.inputs.records import KeyDeriver, event_from_mapping
from dispatcher.model import (
    Delivery,
    Envelope,
    EnvelopeError,
    ErrorKind,
    Event,
    Invalid,
    Outcome,
    Record,
    UserError,
)
from dispatcher.run.runner import dispatch, run
from dispatcher.run.settings import (
    ConfigError,
    Credentials,
    Rate,
    SendSettings,
    parse_duration,
    parse_rate,
)
from dispatcher.sending.stats import RunStats

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
    "UserError",
    "dispatch",
    "event_from_mapping",
    "parse_duration",
    "parse_rate",
    "run",
]

__version__ = "0.1.0"
