"""An in-process emulator of Cloudflare Workflows' "send event to instance" API.

    async with Emulator(EmulatorConfig(limit=Limit.parse("5/1s"))) as emu:
        ...  # point a client at emu.base_url, then assert on emu.log

See docs/emulator.md for the behaviour, the shell command and the flags.
"""

from __future__ import annotations

from dispatcher.emulator.config import EmulatorConfig, Limit
from dispatcher.emulator.faults import FaultKind, Faults, parse_fault, parse_latency
from dispatcher.emulator.instances import InstanceModel
from dispatcher.emulator.log import EmulatorLog, RequestEntry
from dispatcher.emulator.server import Emulator
from dispatcher.emulator.units import parse_duration

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "EmulatorLog",
    "FaultKind",
    "Faults",
    "InstanceModel",
    "Limit",
    "RequestEntry",
    "parse_duration",
    "parse_fault",
    "parse_latency",
]
