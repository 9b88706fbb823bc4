"""What the VM tests share (tests/in_vm, and those of tests/harness marked `vm`): booting a
guest with a layout, powering it off, reading its timeline.

Each VM test boots one guest (never two at once) and checks, from the host's side, what the
agent reported on the ring buffers and when. On failure the console tail and the ring-buffer
timeline are printed (pytest shows them under "Captured stdout").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.cli.report import failure_lines
from lxd_agent_harness.lxd import monitor
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.qemu.process import process_exists
from lxd_agent_harness.scenarios.boot import BootVerdict, WithVm, boot_and_check
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import Boot, DirectBoot, GuestImage, VmConfig
from lxd_agent_harness.vm.instance import Vm
from lxd_agent_harness.vm.units import agent_diagnostics, unit_properties
from tests.helpers import run

TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "dpkg-deb")

# Generous bounds: the point is catching a hang (90 s is systemd's stop timeout), not speed.
BOOT_TIMEOUT = 120.0
SEED_BOOT_TIMEOUT = 420.0
STOP_TIMEOUT = 30.0
POWER_OFF_BOUND = 20.0
TEST_DEADLINE = 300.0

Figures = Dict[str, str]


@contextlib.asynccontextmanager
async def booted(
    image: GuestImage, layout: str, seed: Path | None = None, **machine: Any
) -> AsyncIterator[Vm]:
    """A running guest; on any failure, its console tail and timeline are printed. `machine`:
    more of `VmConfig`'s fields (`network`, `credentials`, `user_qmp`)."""
    config = VmConfig(
        layout=get_layout(layout), boot=DirectBoot(image), accel=Accel.TCG, seed=seed, **machine
    )
    vm = Vm(config, progress=print)
    async with vm:
        pid = vm.qemu.pid
        assert vm.files is not None
        workdir = vm.files.workdir
        try:
            yield vm
        except BaseException as failure:
            print(f"=== {layout}: console tail and ring-buffer timeline ===")
            print(vm.report(console_lines=40))
            if isinstance(failure, Exception):  # not a cancellation: the guest may still answer
                print(f"=== {layout}: the agent, seen from inside the guest ===")
                print(await agent_diagnostics(vm))
            raise
        print(f"=== {layout}: ring-buffer timeline ===")
        print("\n".join(vm.render_timeline()))
    assert not process_exists(pid), f"QEMU {pid} outlived its VM"
    assert not workdir.exists(), f"{workdir} outlived its VM"


def checked_boot(
    image: GuestImage | Boot,
    layout: str,
    *,
    seed: Path | None = None,
    timeout: float = BOOT_TIMEOUT,
    while_up: WithVm | None = None,
) -> BootVerdict:
    """The harness's boot-and-check scenario on `image` (direct boot) or through `boot`.

    Fails the test unless the verdict passed.

    A failed assertion in `while_up` fails the verdict like the harness's own checks, so the
    console tail and the timeline are printed with it.
    """

    async def checks(vm: Vm) -> None:
        assert while_up is not None
        try:
            await while_up(vm)
        except AssertionError as e:
            raise vm.error(f"a check failed while the guest was up: {e}") from e

    boot = DirectBoot(image) if isinstance(image, GuestImage) else image
    config = VmConfig(layout=get_layout(layout), boot=boot, accel=Accel.TCG, seed=seed)
    deadline = TEST_DEADLINE + timeout
    verdict = run(
        boot_and_check(config, timeout, progress=print, while_up=checks if while_up else None),
        deadline,
    )
    if verdict.error is not None:
        print(f"=== {layout}: the failure, the console tail and the timeline ===")
        print("\n".join(failure_lines(verdict.error)))
    else:
        print(f"=== {layout}: ring-buffer timeline ===")
        print("\n".join(verdict.timeline))
    assert verdict.passed, verdict.error
    return verdict


async def wait_for_instance_state(
    vm: Vm, port: str, wanted: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """The instance state Incus 7.3's rule holds for `port`, once `wanted` says it is there."""
    deadline = time.monotonic() + timeout
    while True:
        state = vm.monitor.instance_states.get(port)
        if state is not None and wanted(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"no such instance state on {port} within {timeout:g} s: {state}")
        await vm.check_running()
        await asyncio.sleep(0.2)


async def power_off_and_wait_stopped(vm: Vm, port: str) -> float:
    """Power off; STOPPED must follow the power button. Seconds from power-off to STOPPED."""
    await vm.power_off()
    stopped = await vm.wait_for_state(STOPPED, port, timeout=STOP_TIMEOUT)
    await vm.wait_guest_off(timeout=POWER_OFF_BOUND)
    powered_down = vm.since_start(vm.powerdown_at)
    assert powered_down is not None
    after = stopped.seconds - powered_down
    assert after >= 0, f"STOPPED at {stopped.seconds:.2f} s came before the power button"
    return after


async def kill_and_wait_restarted(
    vm: Vm, port: str, stop_timeout: float = STOP_TIMEOUT, restart_timeout: float = STOP_TIMEOUT
) -> str:
    """SIGKILL the agent: it cannot say STOPPED, the unit's stop hook does, and Restart=on-failure
    brings it back (after RestartSec=5s). The figure: seconds from the kill to STOPPED, and to
    STARTED again."""
    killed_at = time.monotonic()
    kill = await vm.run("systemctl kill -s KILL lxd-agent")
    assert kill.status == 0, kill.output
    await vm.wait_for_state(STOPPED, port, timeout=stop_timeout)
    stopped = time.monotonic() - killed_at
    await vm.wait_for_state(STARTED, port, timeout=restart_timeout)
    return f"{stopped:.2f} s, {time.monotonic() - killed_at:.2f} s"


async def multi_user_after(vm: Vm) -> float:
    """Seconds from the start of userspace (systemd) to multi-user.target, in the guest."""
    await vm.run("systemctl is-system-running --wait", timeout=90)
    manager = await unit_properties(vm, "", ["UserspaceTimestampMonotonic"])
    target = await unit_properties(vm, "multi-user.target", ["ActiveEnterTimestampMonotonic"])
    start = int(manager["UserspaceTimestampMonotonic"])
    reached = int(target["ActiveEnterTimestampMonotonic"])
    assert reached > 0, "multi-user.target never became active"
    return (reached - start) / 1e6


def state_changes(vm: Vm, port: str) -> list[str]:
    """The running VM's state changes on `port` so far (`lxd.monitor.state_changes`)."""
    return monitor.state_changes(vm.monitor.timeline.entries, port)
