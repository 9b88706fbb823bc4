"""Incus as a host: the agent on `org.linuxcontainers.incus`, by both of Incus's rules.

`incus-6` (before 7.3: 16 B ring, LXD's rule) with the state line off, as shipped; `incus`
(7.3: 16 KiB ring, its own rule) with the state line switched on the way an Incus user would,
`systemd.credential.lxd-agent.state=on` passed as an SMBIOS type 11 string, and a NIC on an
isolated user network. Each: STARTED at boot, again for a restarted host reader within one
refresh, STOPPED and STARTED again around a SIGKILL of the agent, STOPPED at power-off; on
`incus` the state the host holds (pid 1, the guest's host name and OS, the NIC's address) after
every read while the agent runs.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lxd_agent.guest.state import CREDENTIAL
from lxd_agent.protocol import INCUS_PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.lxd.monitor import ONE_REFRESH, StateRead
from lxd_agent_harness.vm.config import GuestImage, Network
from lxd_agent_harness.vm.instance import Vm
from tests.helpers import run
from tests.vms import (
    BOOT_TIMEOUT,
    TEST_DEADLINE,
    Figures,
    booted,
    kill_and_wait_restarted,
    power_off_and_wait_stopped,
    state_changes,
    wait_for_instance_state,
)

pytestmark = pytest.mark.vm

# QEMU's user network hands the first guest this address by DHCP.
USER_NETWORK_ADDRESS = "10.0.2.15"
# The guest's own DHCP client for the test: systemd-networkd, configured at run time in /run
# (the image configures no network).
DHCP_ON_ETHERNET = (
    "mkdir -p /run/systemd/network && "
    "printf '[Match]\\nType=ether\\n[Network]\\nDHCP=ipv4\\n' "
    "> /run/systemd/network/80-harness-dhcp.network && systemctl start systemd-networkd"
)
# Restart=on-failure's RestartSec=5s, the interpreter's start, one refresh.
AGENT_RESTART_TIMEOUT = 30.0


def addresses(state: dict[str, Any]) -> list[str]:
    return [
        address["address"]
        for interface in state.get("network", {}).values()
        for address in interface.get("addresses", [])
    ]


async def restart_kill_and_power_off(vm: Vm, figures: Figures, name: str) -> None:
    """The host reader restarts, the agent is killed, the guest powered off: the host must
    see STARTED, STOPPED and STARTED again, and STOPPED, each in time."""
    before = time.monotonic()
    await vm.restart_monitor()
    await vm.wait_for_state(STARTED, INCUS_PORT_NAME, timeout=ONE_REFRESH)
    figures[f"{name}: host restart -> STARTED"] = f"{time.monotonic() - before:.2f} s"

    figures[f"{name}: kill -> STOPPED, STARTED again"] = await kill_and_wait_restarted(
        vm, INCUS_PORT_NAME, restart_timeout=AGENT_RESTART_TIMEOUT
    )
    off = await power_off_and_wait_stopped(vm, INCUS_PORT_NAME)
    figures[f"{name}: power-off -> STOPPED"] = f"{off:.2f} s"
    # The restarted reader's own view: STARTED (restart), the kill, the restart, the power-off.
    assert state_changes(vm, INCUS_PORT_NAME) == [
        f"unknown -> {STARTED}",
        f"{STARTED} -> {STOPPED}",
        f"{STOPPED} -> {STARTED}",
        f"{STARTED} -> {STOPPED}",
    ]


def test_incus_before_7_3_reads_started_and_stopped_from_the_doubled_lines(
    guest_image: GuestImage, figures: Figures
) -> None:
    async def scenario() -> None:
        async with booted(guest_image, "incus-6", user_qmp=True) as vm:
            started = await vm.wait_for_state(STARTED, INCUS_PORT_NAME, timeout=BOOT_TIMEOUT)
            figures["incus-6: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            await vm.login(timeout=BOOT_TIMEOUT)
            reads = [e.text for e in vm.monitor.timeline.entries if e.port == INCUS_PORT_NAME]
            assert any(text.startswith(repr("STARTED\nSTARTED\n")) for text in reads), reads
            await restart_kill_and_power_off(vm, figures, "incus-6")

    run(scenario(), TEST_DEADLINE)


def test_incus_7_3_holds_the_guests_state_from_the_state_line_while_the_agent_runs(
    guest_image: GuestImage, figures: Figures
) -> None:
    async def scenario() -> None:
        async with booted(
            guest_image,
            "incus",
            user_qmp=True,
            network=Network.ISOLATED,
            credentials=((CREDENTIAL, "on"),),
        ) as vm:
            started = await vm.wait_for_state(STARTED, INCUS_PORT_NAME, timeout=BOOT_TIMEOUT)
            figures["incus: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            await wait_for_instance_state(vm, INCUS_PORT_NAME, lambda s: "os_info" in s, 30)
            await vm.login(timeout=BOOT_TIMEOUT)
            switch = await vm.run("journalctl -b -u lxd-agent -o cat | grep 'state line'")
            assert "on (the host's credential" in switch.output, switch.output

            # The host's identity, as Incus passes it (SMBIOS type 2).
            board = await vm.run("cat /sys/class/dmi/id/board_vendor /sys/class/dmi/id/board_name")
            assert board.output.splitlines() == ["LinuxContainers", "Incus"], board.output
            hostname = (await vm.run("cat /proc/sys/kernel/hostname")).output.strip()
            release = (await vm.run('. /etc/os-release; echo "$NAME|$VERSION"')).output.strip()
            networkd = await vm.run(DHCP_ON_ETHERNET)
            assert networkd.status == 0, networkd.output
            state = await wait_for_instance_state(
                vm, INCUS_PORT_NAME, lambda s: USER_NETWORK_ADDRESS in addresses(s), 60
            )
            written = await vm.run("lxd-agent state 2>/dev/null")
            print(f"the state line as the agent writes it now:\n{written.output.strip()}")
            print(f"the state as Incus 7.3's rule parsed it:\n{json.dumps(state, indent=1)}")
            figures["incus: state as parsed"] = json.dumps(state)
            assert state["pid"] == 1
            os_info = state["os_info"]
            assert os_info["hostname"] == hostname, (os_info, hostname)
            assert f"{os_info['os']}|{os_info['os_version']}" == release
            nic = next(i for i in state["network"].values() if i["type"] == "broadcast")
            assert nic["state"] == "up" and nic["hwaddr"].startswith("52:54:00:")
            assert state["processes"] > 1

            first = vm.monitor.state_reads
            await restart_kill_and_power_off(vm, figures, "incus")
            assert_state_held_while_the_agent_ran(first, vm.monitor.state_reads)

    run(scenario(), TEST_DEADLINE)


def assert_state_held_while_the_agent_ran(
    first_reader: list[StateRead], second_reader: list[StateRead]
) -> None:
    """Every read that set a state did so with pid 1, except those of STOPPED: the stop hook's
    after the kill and the power-off's, which clear it (Incus falls back to its own view)."""
    assert first_reader and all(read.state is not None for read in first_reader), first_reader
    cleared = [i for i, read in enumerate(second_reader) if read.state is None]
    assert len(cleared) == 2, second_reader  # the kill, the power-off
    assert cleared[-1] == len(second_reader) - 1
    assert all(
        read.state is not None and read.state["pid"] == 1 for read in second_reader[: cleared[0]]
    )
    between = second_reader[cleared[0] + 1 : cleared[1]]
    assert between and all(read.state is not None for read in between), second_reader
