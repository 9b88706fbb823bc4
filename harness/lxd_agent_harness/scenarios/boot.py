"""The boot scenario: boot a guest, see STARTED on the ring LXD reads, press the power button,
see STOPPED and the guest off (on Incus's layout: the boot completes and the agent stands aside).

`boot_and_check` returns a `BootVerdict`: pass or fail and why, with the failure's own data (the
error and its fields), and what the host saw when. It never prints and never exits: `cli.main`
turns the verdict into lines and an exit code, the VM tests assert on it, and the snapshot
scenario runs it per step. Progress goes to an optional callback.

Host side only. The flow is here; how QEMU runs, how rings are read and how the console is
driven belong to the layers below (`vm`, `lxd`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.base.errors import GuestStateMismatch, HarnessError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.seed import INSTALLED_MARKER
from lxd_agent_harness.lxd.layouts import lxd_ring_port
from lxd_agent_harness.lxd.monitor import TimelineEntry, reads, state_changes
from lxd_agent_harness.scenarios.observed import (
    PRESS_AGAIN_AFTER,
    PowerOffFigures,
    pressing_again,
    record,
)
from lxd_agent_harness.vm.config import VmConfig
from lxd_agent_harness.vm.instance import POWEROFF_TIMEOUT, Vm
from lxd_agent_harness.vm.units import AGENT_UNIT, unit_properties

# Without a ring (Incus) the power-off time is the proof: off in 1-3 s here, while an agent
# stuck on the dead stub would hold it for systemd's 90 s stop timeout.
SEED_INSTALLED = re.compile(re.escape(INSTALLED_MARKER.encode()))

STUB_POWEROFF_BOUND = 20.0

# What the unit of an agent that stood aside (no LXD ring) must show.
STOOD_ASIDE_PROPERTIES = ("ActiveState", "Result", "NRestarts", "StatusText")

# What a caller does with the running VM: after STARTED and before the power button
# (`while_up`), or instead of the power button (`hold`, the CLI's `--keep`).
WithVm = Callable[[Vm], Awaitable[None]]


@dataclass
class BootVerdict(PowerOffFigures):
    """What `boot_and_check` saw. Times are seconds since QEMU started; None: not reached."""

    layout: str
    port: str | None
    """The LXD port with a ring that the agent must report on; None for Incus (no such ring)."""
    error: HarnessError | None = None
    """Why the scenario failed, with its fields (console tail, QEMU's output, timeline)."""
    started: TimelineEntry | None = None
    stopped: TimelineEntry | None = None
    kernel_up: float | None = None
    powered_down: float | None = None
    guest_off: float | None = None
    unit_state: str = ""
    """For a layout without an LXD ring: the agent unit's state after boot, as systemd says."""
    held: bool = False
    """The VM was handed to `hold` (`--keep`) instead of being powered off."""
    entries: list[TimelineEntry] = field(default_factory=list)
    """The monitor's timeline: QMP events, ring reads, state changes, notes."""
    timeline: list[str] = field(default_factory=list)
    """The same, rendered for a person."""

    def state_changes(self, port: str) -> list[str]:
        """`port`'s state changes in order, e.g. `unknown -> STARTED`."""
        return state_changes(self.entries, port)

    def reads(self, port: str) -> list[str]:
        """What the reads of `port`'s ring returned, where they returned anything."""
        return reads(self.entries, port)

    @property
    def passed(self) -> bool:
        return self.error is None


async def check_agent_stood_aside(vm: Vm, timeout: float) -> str:
    """With no LXD ring (Incus), the boot must complete and the agent must be skipped.

    Returns the unit's state; raises a `VmError` saying which of the two did not hold.
    """
    await vm.login(timeout=timeout)
    state = await vm.run("systemctl is-system-running --wait", timeout=timeout)
    vm.note(f"guest: systemctl is-system-running: {state.output.strip()}")
    if state.output.strip() != "running":
        raise vm.fill(
            GuestStateMismatch(
                f"the guest's boot did not complete cleanly: is-system-running says "
                f"{state.output.strip()!r}; see `systemctl --failed` in the guest (--keep)",
                subject="system",
                seen={"SystemState": state.output.strip()},
            )
        )
    props = await unit_properties(vm, AGENT_UNIT, STOOD_ASIDE_PROPERTIES)
    shown = " ".join(f"{name}={' '.join(value.split())}" for name, value in props.items())
    vm.note(f"guest: lxd-agent: {shown}")
    skipped = (
        props.get("ActiveState") == "inactive"
        and props.get("Result") == "success"
        and props.get("NRestarts") in ("", "0")
        and props.get("StatusText", "").startswith("skipped, no usable port")
    )
    if not skipped:
        raise vm.fill(
            GuestStateMismatch(
                "lxd-agent was not skipped cleanly although no LXD port has a ring behind it: "
                f"{shown}; see `journalctl -u lxd-agent` in the guest (--keep)",
                subject=AGENT_UNIT,
                seen=props,
            )
        )
    return shown


async def boot_and_check(
    config: VmConfig,
    timeout: float,
    progress: Progress | None = None,
    while_up: WithVm | None = None,
    hold: WithVm | None = None,
    shell_ready: bool = False,
    prepare: WithVm | None = None,
) -> BootVerdict:
    """Boot, see STARTED on the LXD ring, press the power button, see STOPPED, see it off.

    On a layout without an LXD ring (Incus) the proof is instead that the boot completes, the
    agent is skipped, and the guest powers off within `STUB_POWEROFF_BOUND`. Every wait is
    bounded by `timeout`. `while_up` runs between STARTED and the power button (a caller's own
    checks; its `HarnessError` fails the verdict); `hold` instead of the power button.
    `shell_ready`: a restored guest's console already has the harness's shell (`Vm`).
    `prepare` runs once QEMU runs, before the wait for STARTED (a guest whose agent must be
    started by hand).
    """
    port = lxd_ring_port(config.layout)
    verdict = BootVerdict(layout=config.layout.name, port=port)
    vm = Vm(config, progress=progress, shell_ready=shell_ready)
    try:
        async with vm:
            try:
                if prepare is not None:
                    await prepare(vm)
                await _boot_and_check(vm, port, timeout, while_up, hold, verdict)
            finally:
                record(vm, verdict)
    except HarnessError as e:  # from the boot, or from starting or stopping QEMU
        verdict.error = e
    return verdict


async def _seed_installed(vm: Vm, timeout: float) -> None:
    """Wait for the seed's install to end. An agent already in the image restarts then
    (`STOPPED`, `STARTED`): that `STOPPED` must not be taken for the power button's."""
    await vm.console.wait_for(SEED_INSTALLED, timeout, what=INSTALLED_MARKER)
    await vm.monitor.read_rings("seed installed")
    vm.note("console: the seed installed the package")


async def _boot_and_check(
    vm: Vm,
    port: str | None,
    timeout: float,
    while_up: WithVm | None,
    hold: WithVm | None,
    verdict: BootVerdict,
) -> None:
    if port is not None:
        verdict.started = await vm.wait_for_state(STARTED, port, timeout=timeout)
    else:
        vm.note(f"{vm.config.layout.name} has no ring on an LXD port; checking the boot")
        verdict.unit_state = await check_agent_stood_aside(vm, timeout)
    if vm.config.seed is not None:
        await _seed_installed(vm, timeout)
    if while_up is not None:
        await while_up(vm)
    if hold is not None:
        verdict.held = True
        await hold(vm)
        return
    if port is not None and vm.monitor.state(port) != STARTED:
        raise vm.error(f"{port} went from STARTED to {vm.monitor.state(port)} early")
    mark = vm.console.received
    await vm.power_off()
    async with pressing_again(vm, mark, PRESS_AGAIN_AFTER):
        if port is not None:
            verdict.stopped = await vm.wait_for_state(STOPPED, port, timeout=timeout)
        bound = POWEROFF_TIMEOUT if port is not None else STUB_POWEROFF_BOUND
        await vm.wait_guest_off(timeout=min(timeout, bound))
