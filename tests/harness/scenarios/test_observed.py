"""Tests for lxd_agent_harness.scenarios.observed: what a verdict keeps of a VM (copied from a
`Vm` whose console and monitor are stand-ins), the first change to a state, and the seconds
after the power button."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.boot import BootVerdict
from lxd_agent_harness.scenarios.observed import (
    PowerOffFigures,
    first_state,
    power_off_within,
    pressing_again,
    record,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from lxd_agent_harness.vm.instance import Vm


def state(seconds: float, text: str, port: str = PORT_NAME) -> TimelineEntry:
    return TimelineEntry(seconds, EntryKind.STATE, text, port)


def test_the_first_state_is_the_first_change_to_it_on_any_ring_from_the_moment_on() -> None:
    entries = [
        TimelineEntry(1.0, EntryKind.NOTE, f"not a ring: unknown -> {STARTED}"),
        TimelineEntry(2.0, EntryKind.READ, f"'{STARTED}\\n'", PORT_NAME),
        legacy := state(3.0, f"unknown -> {STARTED}", LEGACY_PORT_NAME),
        state(4.0, f"{STARTED} -> {STOPPED}"),
        again := state(9.0, f"{STOPPED} -> {STARTED}"),
    ]
    assert first_state(entries, STARTED, after=0.0) is legacy
    assert first_state(entries, STARTED, after=3.0) is legacy  # at the moment counts
    assert first_state(entries, STARTED, after=3.5) is again
    assert first_state(entries, STARTED, after=9.5) is None
    assert first_state(entries, "CONNECTED", after=0.0) is None


@dataclass
class Figures(PowerOffFigures):
    stopped: TimelineEntry | None = None
    powered_down: float | None = None
    guest_off: float | None = None


def test_the_seconds_after_the_power_button_need_the_button_and_what_followed() -> None:
    seen = Figures(state(21.0, f"{STARTED} -> {STOPPED}"), powered_down=20.25, guest_off=21.5)
    assert seen.stopped_after_power_off == pytest.approx(0.75)
    assert seen.off_after_power_off == pytest.approx(1.25)
    assert Figures(seen.stopped, None, 21.5).stopped_after_power_off is None
    assert Figures(seen.stopped, None, 21.5).off_after_power_off is None
    assert Figures(None, 20.25, None).stopped_after_power_off is None
    assert Figures(None, 20.25, None).off_after_power_off is None


def _vm(tmp_path: Path) -> Vm:
    config = VmConfig(get_layout("lxd-5.20"), DirectBoot(GuestImage(tmp_path)), Accel.TCG)
    return Vm(config)


def test_record_copies_what_the_vm_saw_in_seconds_since_qemu_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = _vm(tmp_path)
    vm.t0 = 100.0
    entries = [state(11.0, f"unknown -> {STARTED}")]

    class Monitor:
        timeline = SimpleNamespace(entries=entries)

        def render_timeline(self) -> list[str]:
            return ["   11.000s  state  com.canonical.lxd: unknown -> STARTED"]

    monkeypatch.setattr(vm, "_console", SimpleNamespace(milestones={"kernel up": 102.5}))
    monkeypatch.setattr(vm, "_monitor", Monitor())
    vm.powerdown_at, vm.guest_off_at = 120.0, 121.5
    verdict = BootVerdict(layout="lxd-5.20", port=PORT_NAME)
    record(vm, verdict)
    assert verdict.kernel_up == 2.5
    assert (verdict.powered_down, verdict.guest_off) == (20.0, 21.5)
    assert verdict.timeline == ["   11.000s  state  com.canonical.lxd: unknown -> STARTED"]
    assert verdict.entries == entries
    entries.append(state(30.0, f"{STARTED} -> {STOPPED}"))
    assert len(verdict.entries) == 1  # a copy: the verdict outlives the VM


def test_record_of_a_vm_that_never_started_leaves_the_verdict_empty(tmp_path: Path) -> None:
    verdict = BootVerdict(layout="lxd-5.20", port=PORT_NAME)
    record(_vm(tmp_path), verdict)  # no console, no monitor: nothing to copy, no error
    assert (verdict.kernel_up, verdict.powered_down, verdict.guest_off) == (None, None, None)
    assert verdict.entries == [] and verdict.timeline == []


class PressedVm:
    """What `pressing_again` uses of a `Vm`: its console, the presses, the notes."""

    def __init__(self, console: bytes) -> None:
        self.text = console
        self.console = self
        self.guest_off_at: float | None = None
        self.presses = 0
        self.notes: list[str] = []

    def search(self, pattern: re.Pattern[bytes], start: int) -> re.Match[bytes] | None:
        return pattern.search(self.text, start)

    def note(self, text: str) -> None:
        self.notes.append(text)

    async def power_off(self) -> None:
        self.presses += 1


@pytest.mark.parametrize(
    ("console", "again"),
    [
        # A boot, and a package restarting its unit, are no shutdown: the press was dropped.
        (b"[  OK  ] Reached target cloud-init.target\n         Stopping lxd-agent.service\n", True),
        (b"[  OK  ] Stopped target multi-user.target - Multi-User System.\n", False),
        (b"[  OK  ] Reached target shutdown.target - System Shutdown.\n", False),
        (b"reboot: Power down\n", False),
    ],
)
def test_the_power_button_is_pressed_again_only_while_the_console_shows_no_shutdown(
    console: bytes, again: bool
) -> None:
    vm = PressedVm(console)

    async def wait() -> None:
        async with pressing_again(cast(Vm, vm), 0, every=0.01):
            await asyncio.sleep(0.1)

    asyncio.run(wait())
    assert (vm.presses > 1) is again, vm.presses
    assert len(vm.notes) == vm.presses


def test_the_power_button_is_not_pressed_again_once_the_guest_is_off() -> None:
    vm = PressedVm(b"")
    vm.guest_off_at = 3.0

    async def wait() -> None:
        async with pressing_again(cast(Vm, vm), 0, every=0.01):
            await asyncio.sleep(0.1)

    asyncio.run(wait())
    assert vm.presses == 0


class SlowOffVm:
    """What `power_off_within` uses of a `Vm`, for a guest that is off `off_after` s after the
    press and whose vCPU waited `starved` s for a host CPU meanwhile."""

    def __init__(self, off_after: float, starved: float) -> None:
        self.t0 = time.monotonic()
        self.off_after, self.starved = off_after, starved
        self.console = PressedVm(b"")
        self.console.received = 0  # type: ignore[attr-defined]
        self.guest_off_at: float | None = None
        self.monitor = SimpleNamespace(read_rings=self._read_rings)
        self.notes: list[str] = []

    async def _read_rings(self, _why: str) -> None:
        return None

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def host_cpu_wait(self, since: float = 0.0) -> float:
        return self.starved if self.seconds() > 0.05 else 0.0

    def note(self, text: str) -> None:
        self.notes.append(text)

    def release_cores(self) -> None:
        pass

    async def power_off(self) -> None:
        pass

    async def check_running(self) -> None:
        pass

    async def wait_guest_off(self, timeout: float) -> float:
        await asyncio.sleep(timeout)
        if self.seconds() >= self.off_after:
            self.guest_off_at = time.monotonic()
            return self.seconds()
        raise VmError("still up")


@pytest.mark.parametrize(("starved", "held"), [(0.0, True), (1.5, False)])
def test_the_power_off_bound_counts_the_time_the_guest_could_run(
    starved: float, held: bool
) -> None:
    """Off 1.5 s after the press against a bound of 0.3 s: held, unless its vCPU waited 1.5 s
    of those for a host CPU (a busy host, not the guest, took that time). The margins are
    wide: a test process stalled by a busy machine for a second gives the same answer."""
    vm = SlowOffVm(off_after=1.5, starved=starved)
    outcome = asyncio.run(power_off_within(cast(Vm, vm), 0.3))
    assert outcome.held is held
    assert (vm.guest_off_at is not None) is not held
    assert any(n.startswith("power-off held for 0.3 s;") for n in vm.notes) is held
