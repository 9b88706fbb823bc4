"""What every scenario keeps of a VM it booted: the timeline, and when the guest came up and went.

A verdict (`BootVerdict`, a matrix `Cell`) is filled from the VM while it still runs, by one
function, so that each scenario records the same things the same way. Never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from lxd_agent_harness.base.errors import GuestStopped, HarnessError, VmError
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.vm.instance import Vm

# What systemd prints on the console while a job keeps it waiting.
JOB_RUNNING = re.compile(rb"A (start|stop) job is running for (.+?) \(\d")


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


def first_state(
    entries: list[TimelineEntry], status: str, after: float, port: str | None = None
) -> TimelineEntry | None:
    """The first change of `port`'s ring (any ring: None) to `status` at or after `after` s."""
    return next(
        (
            e
            for e in entries
            if e.kind is EntryKind.STATE
            and e.text.endswith(f"-> {status}")
            and e.seconds >= after
            and (port is None or e.port == port)
        ),
        None,
    )


@dataclass(frozen=True)
class PowerOff:
    """What pressing the power button did, within a bound."""

    held: bool
    """The guest was still up `bound` s after the button (QEMU is then left to the caller)."""
    job_running: str = ""
    """What systemd said it was waiting for on the console while held (`stop job for X`)."""


SHUTTING_DOWN = re.compile(
    rb"Stopped target|Reached target.{0,60}(?:Shutdown|Power-Off|Power Off)"
    rb"|System is powering down|Powering off|reboot: Power down"
)
"""What a guest's console shows once a power button was taken: systemd's shutdown at work.
Not `Stopping X` or `Reached target X` alone: a boot, or a package restarting its unit (a
seed's install), prints those too."""


PRESS_AGAIN_AFTER = 5.0
"""Seconds after a press with no sign of a shutdown on the console before the next one."""


@contextlib.asynccontextmanager
async def pressing_again(vm: Vm, mark: int, every: float) -> AsyncIterator[None]:
    """While inside, press the power button again every `every` s for as long as the console
    shows no sign of a shutdown (`SHUTTING_DOWN`) since `mark` and the guest is not off.

    A guest drops a press that comes before logind runs (a cloud image whose agent reports
    before that, with two vCPUs), or while a package manager holds a shutdown inhibitor (facts
    §6): that is not the agent holding it.
    """

    async def press() -> None:
        while True:
            await asyncio.sleep(every)
            if vm.guest_off_at is not None or vm.console.search(SHUTTING_DOWN, mark) is not None:
                return
            vm.note("no sign of a shutdown on the console: the power button again")
            await vm.power_off()

    presser = asyncio.ensure_future(press())
    try:
        yield
    finally:
        presser.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await presser  # raises what a press raised (QEMU gone)


async def power_off_within(
    vm: Vm, bound: float, press_again_after: float | None = None
) -> PowerOff:
    """Press the power button and wait up to `bound` s for the guest to be off.

    A hang is an answer, not an error: a guest still up at the bound gives `held`, with the job
    systemd printed. QEMU dying or the guest crashing meanwhile raises, as it is no answer. The
    rings are read once more at the end: the last line may still be in one.

    `press_again_after`: press again every so many seconds while the console shows no sign of a
    shutdown (`pressing_again`).
    """
    mark = vm.console.received
    pressed = vm.seconds()
    vm.host_cpu_wait()  # a sample at the press: the bound counts the time the guest could run
    await vm.power_off()
    vm.release_cores()  # a guest shutting down needs its core no more, a held one not at all
    try:
        async with contextlib.AsyncExitStack() as stack:
            if press_again_after is not None:
                await stack.enter_async_context(pressing_again(vm, mark, press_again_after))
            off = await _off_within(vm, bound, pressed)
        if not off:
            job = ""
            match = vm.console.search(JOB_RUNNING, mark)
            if match is not None:
                kind, unit = (group.decode(errors="replace") for group in match.groups())
                job = f"{kind} job for {unit}"
            starved = vm.host_cpu_wait(pressed)
            extra = (
                f" (and {starved:.1f} s its vCPU waited for a host CPU)" if starved >= 1.0 else ""
            )
            vm.note(f"power-off held for {bound:g} s{extra}; {job or 'no job on the console'}")
            return PowerOff(held=True, job_running=job)
        return PowerOff(held=False)
    finally:
        with contextlib.suppress(HarnessError):
            await vm.monitor.read_rings("after power-off")


# How often the wait for the power-off looks at how long the guest waited for a host CPU.
_OFF_SLICE = 1.0


async def _off_within(vm: Vm, bound: float, pressed: float) -> bool:
    """Whether the guest is off within `bound` s of the press at `pressed` (VM seconds), counted
    in the time it could run (`Vm.host_cpu_wait`); raises if QEMU died or the guest crashed."""
    while vm.guest_off_at is None:
        left = bound - (vm.seconds() - pressed - vm.host_cpu_wait(pressed))
        if left <= 0:
            return await _off_at_the_bound(vm)
        try:
            await vm.wait_guest_off(timeout=min(left, _OFF_SLICE))
        except VmError:
            await _raise_unless_up(vm)
    return True


async def _raise_unless_up(vm: Vm) -> None:
    """Raises if QEMU died or the guest crashed (no answer); returns while it is up."""
    try:
        await vm.check_running()
    except GuestStopped as stopped:
        if stopped.run_state != "shutdown":
            raise


async def _off_at_the_bound(vm: Vm) -> bool:
    """At the bound: off (perhaps just now), or held; raises if QEMU died or the guest crashed."""
    if vm.guest_off_at is not None:
        return True
    try:
        await vm.wait_guest_off(timeout=0.0)
    except VmError:
        try:
            await vm.check_running()  # QEMU died or the guest crashed: not a hang
        except GuestStopped as stopped:
            if stopped.run_state != "shutdown":
                raise
            await vm.wait_guest_off(timeout=1.0)  # off just as the time ran out
            return True
        return False
    return True
