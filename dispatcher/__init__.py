"""dispatcher: send events to Cloudflare Workflows instances in bulk."""

from __future__ import annotations

from dispatcher.model import Delivery, ErrorKind, Event, Invalid, Outcome, Record

__all__ = [
    "Delivery",
    "ErrorKind",
    "Event",
    "Invalid",
    "Outcome",
    "Record",
]

__version__ = "0.1.0"
