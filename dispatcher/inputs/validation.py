"""The API's path and payload rules (Cloudflare's API reference and limits pages), shared
by the client and the emulator."""

from __future__ import annotations

import re
from typing import Final

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_WORKFLOW_LEN: Final = 64
MAX_INSTANCE_ID_LEN: Final = 100
MAX_EVENT_TYPE_LEN: Final = 100
NAME_PATTERN: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9\-_]*")


class RuleViolation(ValueError):
    """A value broke one of the API's rules; ``rule`` is a short stable name."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def _check_name(field: str, value: object, max_len: int, *, pattern: bool) -> None:
    if not isinstance(value, str):
        raise RuleViolation(
            f"{field}_type", f"{field} must be a string, got {type(value).__name__}"
        )
    if not 1 <= len(value) <= max_len:
        raise RuleViolation(
            f"{field}_length", f"{field} must be 1..{max_len} characters, got {len(value)}"
        )
    if pattern and NAME_PATTERN.fullmatch(value) is None:
        raise RuleViolation(
            f"{field}_pattern",
            f"{field} {value!r} must match ^[a-zA-Z0-9_][a-zA-Z0-9-_]*$",
        )


def check_path(
    workflow: object, instance_id: object, event_type: object, *, strict_ids: bool = True
) -> None:
    """Raise :class:`RuleViolation` for the first path rule broken.

    ``strict_ids=False`` lets system-generated (cron) instance ids through: only their
    length is checked.
    """
    _check_name("workflow", workflow, MAX_WORKFLOW_LEN, pattern=True)
    _check_name("instance_id", instance_id, MAX_INSTANCE_ID_LEN, pattern=strict_ids)
    _check_name("event_type", event_type, MAX_EVENT_TYPE_LEN, pattern=False)


def check_body_size(size: int) -> None:
    if size > MAX_BODY_BYTES:
        raise RuleViolation(
            "body_too_large", f"body is {size} bytes, over the API's limit of {MAX_BODY_BYTES}"
        )
