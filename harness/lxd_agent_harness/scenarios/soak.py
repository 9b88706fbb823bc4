"""The soak scenario: many boots, each putting the agent through the faults a real host sees.

Each cycle boots one QEMU (reboots allowed, a second QMP socket for a restarted host reader) and,
in order: sees STARTED after boot; reboots the guest inside the same QEMU (STOPPED, then
STARTED); hot-unplugs the status port over QMP and plugs it back with the same id, name and
chardev (the same agent process must report STARTED within one refresh); restarts the host's
ring reader on a new QMP connection (it must see STARTED within one refresh, although the old
reader consumed the ring); kills the agent with SIGKILL (STOPPED from the unit's stop hook, then
STARTED from the restarted unit); and powers off (STOPPED, guest off). Every fault gets a
`FaultResult`; `soak` returns them all in a `SoakVerdict`. It never prints: the CLI renders the
table, the VM tests assert on it.

Host side only; how QEMU, the rings and the console work belongs to vm, monitor and console.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.base.errors import HarnessError, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.lxd.layouts import SERIAL_BUS, Layout, lxd_ring_port
from lxd_agent_harness.lxd.monitor import ONE_REFRESH
from lxd_agent_harness.vm.config import VmConfig
from lxd_agent_harness.vm.instance import POWEROFF_TIMEOUT, Vm
from lxd_agent_harness.vm.units import AGENT_UNIT, unit_properties
from lxd_agent_harness.vm.warm import How, started_vm

# The unit restarts the agent 5 s after it died (RestartSec=5s); under TCG it starts in 1-3 s.
AGENT_RESTART_TIMEOUT = 30.0
UNPLUG_TIMEOUT = 10.0

FAULTS = ("boot", "reboot", "port-replug", "monitor-restart", "agent-kill", "power-off")


@dataclass
class FaultResult:
    cycle: int
    fault: str
    seconds: float | None = None
    """How long the fault took to be answered (what `detail` says was measured)."""
    detail: str = ""
    error: HarnessError | None = None
    """Why it failed, with the error's fields; None when it passed."""

    @property
    def passed(self) -> bool:
        return self.error is None and self.seconds is not None


@dataclass
class SoakVerdict:
    layout: str
    cycles: int
    results: list[FaultResult] = field(default_factory=list)
    cycle_seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds of each completed cycle, QEMU start to QEMU gone (the VM lock's wait
    excluded)."""

    @property
    def passed(self) -> bool:
        return len(self.results) == self.cycles * len(FAULTS) and all(
            r.passed for r in self.results
        )

    def failures(self) -> list[FaultResult]:
        return [r for r in self.results if not r.passed]


async def main_pid(vm: Vm) -> int:
    """The agent's process id, as systemd says (0: not running)."""
    main_pid = (await unit_properties(vm, AGENT_UNIT, ["MainPID"]))["MainPID"]
    try:
        return int(main_pid)
    except ValueError:
        raise vm.error(f"systemctl gave no MainPID for lxd-agent: {main_pid!r}") from None


async def _since(start: float, awaitable: Awaitable[object]) -> float:
    await awaitable
    return time.monotonic() - start


async def _boot(vm: Vm, port: str, timeout: float) -> tuple[float, str]:
    entry = await vm.wait_for_state(STARTED, port, timeout=timeout)
    return entry.seconds, "STARTED after QEMU start"


async def _reboot(vm: Vm, port: str, timeout: float) -> tuple[float, str]:
    await vm.login()
    start = time.monotonic()
    vm.shell.send("systemctl reboot")
    vm.shell.logged_out()
    vm.note("guest: systemctl reboot")
    stopped = await _since(start, vm.wait_for_state(STOPPED, port, timeout=timeout))
    started = await _since(start, vm.wait_for_state(STARTED, port, timeout=timeout))
    return started, f"STOPPED after {stopped:.1f} s, STARTED again after"


async def _device_gone(vm: Vm, device_id: str) -> None:
    deadline = time.monotonic() + UNPLUG_TIMEOUT
    while True:
        children = await vm.execute("qom-list", {"path": "/machine/peripheral"})
        names = {c.get("name") for c in children} if isinstance(children, list) else set()
        if device_id not in names:
            return
        if time.monotonic() > deadline:
            raise vm.error(
                f"device {device_id} still present {UNPLUG_TIMEOUT:g} s after device_del"
            )
        await asyncio.sleep(0.1)


async def _port_replug(vm: Vm, port: str, timeout: float) -> tuple[float, str]:
    device = next(p for p in vm.config.layout.ports if p.name == port)
    chardev_id = device.chardev_id
    assert chardev_id is not None  # the port has a ring
    before = await main_pid(vm)
    await vm.execute("device_del", {"id": device.device_id})
    await _device_gone(vm, device.device_id)
    vm.note(f"port {port} unplugged")
    vm.monitor.forget(port, "port unplugged")
    start = time.monotonic()
    arguments: dict[str, object] = {
        "driver": "virtserialport",
        "id": device.device_id,
        "name": port,
        "chardev": chardev_id,
        "bus": SERIAL_BUS,
    }
    # QEMU lets go of the port's chardev a moment after the device itself is gone (seen here:
    # "Device 'qemu_serial-chardev' is in use" right after): try again until it is free.
    deadline = start + UNPLUG_TIMEOUT
    while True:
        try:
            await vm.execute("device_add", arguments)
            break
        except VmError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    vm.note(f"port {port} plugged back")
    seconds = await _since(start, vm.wait_for_state(STARTED, port, timeout=ONE_REFRESH))
    after = await main_pid(vm)
    if after != before:
        raise vm.error(
            f"the agent was restarted across the replug (MainPID {before} -> {after}); "
            "the same process must report again"
        )
    return seconds, f"STARTED after the port returned (MainPID {before} kept)"


async def _monitor_restart(vm: Vm, port: str, timeout: float) -> tuple[float, str]:
    start = time.monotonic()
    await vm.restart_monitor()
    seconds = await _since(start, vm.wait_for_state(STARTED, port, timeout=ONE_REFRESH))
    return seconds, "STARTED seen by a new QMP reader"


async def _agent_kill(vm: Vm, port: str, timeout: float) -> tuple[float, str]:
    before = await main_pid(vm)
    start = time.monotonic()
    killed = await vm.run("systemctl kill -s KILL lxd-agent")
    if killed.status != 0:
        raise vm.error(f"systemctl kill failed ({killed.status}): {killed.output}")
    stopped = await _since(start, vm.wait_for_state(STOPPED, port, timeout=ONE_REFRESH))
    started = await _since(start, vm.wait_for_state(STARTED, port, timeout=AGENT_RESTART_TIMEOUT))
    after = await main_pid(vm)
    return started, f"STOPPED after {stopped:.1f} s, STARTED after (MainPID {before} -> {after})"


async def _power_off(vm: Vm, port: str, timeout: float) -> tuple[float, str]:
    start = time.monotonic()
    await vm.power_off()
    stopped = await _since(start, vm.wait_for_state(STOPPED, port, timeout=timeout))
    await vm.wait_guest_off(timeout=min(timeout, POWEROFF_TIMEOUT))
    return stopped, "STOPPED after the power button, guest off"


Fault = Callable[[Vm, str, float], Awaitable[tuple[float, str]]]
_FAULTS: dict[str, Fault] = {
    "boot": _boot,
    "reboot": _reboot,
    "port-replug": _port_replug,
    "monitor-restart": _monitor_restart,
    "agent-kill": _agent_kill,
    "power-off": _power_off,
}
assert tuple(_FAULTS) == FAULTS


def soak_config(config: VmConfig) -> VmConfig:
    """`config` as the soak needs it: reboots stay in QEMU, a socket for a second reader."""
    return dataclasses.replace(config, allow_reboot=True, user_qmp=True)


async def soak(
    config: VmConfig,
    cycles: int,
    timeout: float,
    progress: Progress | None = None,
    warm: bool = False,
) -> SoakVerdict:
    """Run `cycles` boots of `config`, each through every fault in `FAULTS`.

    Each fault's failure is in its `FaultResult` (a `VmError` only for a layout without an LXD
    ring: nothing to soak). A failed fault ends its cycle (the faults after it are recorded as
    not run) and the next cycle boots afresh. Every wait is bounded by `timeout` or tighter.
    With `warm`, each cycle starts from a guest restored from a saved one (`vm.warm`) instead of
    a boot: its first fault is then the restore (the reboot still boots the guest for real).
    """
    verdict = SoakVerdict(layout=config.layout.name, cycles=cycles)
    port = _status_port(config.layout)
    for cycle in range(1, cycles + 1):
        results = [FaultResult(cycle, fault) for fault in FAULTS]
        try:
            async with started_vm(
                soak_config(config), warm=warm, timeout=timeout, progress=progress
            ) as (vm, start):
                if start.how is How.WARM:
                    results[0].seconds, results[0].detail = start.seconds, "STARTED after a restore"
                    vm.note(f"soak cycle {cycle}: {start.reason}")
                begun = time.monotonic()
                for result in results:
                    if result.seconds is not None:
                        continue  # the boot, answered by the restore
                    try:
                        result.seconds, result.detail = await _FAULTS[result.fault](
                            vm, port, timeout
                        )
                    except HarnessError as e:
                        result.error = e
                        break
                    vm.note(f"soak cycle {cycle}: {result.fault} passed in {result.seconds:.1f} s")
        except HarnessError as e:  # starting or stopping QEMU
            first = next((r for r in results if r.seconds is None), results[-1])
            first.error = first.error or e
        else:
            verdict.cycle_seconds.append(time.monotonic() - begun)
        for result in results:
            if result.seconds is None and result.error is None:
                result.detail = "not run: an earlier fault failed"
        verdict.results += results
    return verdict


def _status_port(layout: Layout) -> str:
    port = lxd_ring_port(layout)
    if port is None:
        raise VmError(
            f"layout {layout.name} has no ring on an LXD port, so there is nothing to soak; "
            "choose lxd-5.19 or lxd-5.20"
        )
    return port
