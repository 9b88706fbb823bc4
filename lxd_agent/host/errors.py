"""The host harness's errors: one small hierarchy, each message one actionable line.

Every failure a user of the harness can hit is a `HarnessError`, so the command line can catch
that one class, print the message and exit non-zero; anything else is a bug and keeps its
traceback. Host side only: the guest agent never imports this module.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness reports to a user (what was tried, found, what to do)."""


class LayoutError(HarnessError):
    """An unknown layout name or an invalid ring size, caught before QEMU runs."""


class QemuError(HarnessError):
    """QEMU could not be found or started, died early, or its QMP socket did not answer."""


class MonitorError(HarnessError):
    """The ring-buffer monitor could not read a ring (its QMP connection failed or was lost)."""


class MonitorTimeout(MonitorError):
    """The monitor did not see the awaited state in time; the message holds the timeline."""


class VmError(HarnessError):
    """The guest did not do what the harness waited for, or QEMU stopped under it."""
