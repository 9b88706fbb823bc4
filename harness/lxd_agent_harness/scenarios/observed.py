"""What every scenario keeps of a VM it booted: the timeline, and when the guest came up and went.

A verdict (`BootVerdict`, a matrix `Cell`) is filled from the VM while it still runs, by one
function, so that each scenario records the same things the same way. Never prints.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.vm.instance import Vm


class PowerOffFigures:
    """How long after the power button `STOPPED` was seen and the guest was off.

    For a verdict that has these three (times in seconds since QEMU started; None: not reached).
    """

    stopped: TimelineEntry | None
    powered_down: float | None
    guest_off: float | None

    @property
    def stopped_after_power_off(self) -> float | None:
        if self.stopped is None or self.powered_down is None:
            return None
        return self.stopped.seconds - self.powered_down

    @property
    def off_after_power_off(self) -> float | None:
        if self.guest_off is None or self.powered_down is None:
            return None
        return self.guest_off - self.powered_down


class Observed(Protocol):
    """What `record` fills: a verdict's view of one VM. Times in seconds since QEMU started."""

    entries: list[TimelineEntry]
    timeline: list[str]
    kernel_up: float | None
    powered_down: float | None
    guest_off: float | None


def record(vm: Vm, into: Observed) -> None:
    """Copy what `vm` saw into the verdict `into`, while the VM still has it."""
    with contextlib.suppress(VmError):  # a VM that failed to start has no console or monitor
        into.kernel_up = vm.since_start(vm.console.milestones.get("kernel up"))
    with contextlib.suppress(VmError):
        into.entries = list(vm.monitor.timeline.entries)
        into.timeline = vm.render_timeline()
    into.powered_down = vm.since_start(vm.powerdown_at)
    into.guest_off = vm.since_start(vm.guest_off_at)


def first_state(entries: list[TimelineEntry], status: str, after: float) -> TimelineEntry | None:
    """The first change of any ring's state to `status` at or after `after` s, if any."""
    return next(
        (
            e
            for e in entries
            if e.kind is EntryKind.STATE and e.text.endswith(f"-> {status}") and e.seconds >= after
        ),
        None,
    )
