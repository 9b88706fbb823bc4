"""The one .deb (built on Debian 12) in Debian 11, 12 and 13 guests, and in place of Debian's own.

For each release: an image with the package installed, booted on LXD 5.20's layout (STARTED at
boot; the unit as systemd sees it; `systemctl stop`/`start`; a SIGKILL of the agent, after which
the stop hook writes STOPPED and systemd restarts it; STOPPED at power-off), and on Incus's
(STARTED on Incus's own port at boot, neither the boot nor the power button held, STOPPED). Where
Debian's archive has its own `lxd-agent` (bookworm, trixie), an image with that one installed
gets ours with `apt-get install ./...deb` in the running guest, and ours must take over.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.image.aptsources import RELEASES
from lxd_agent_harness.image.deb import DEB_PACKAGE
from lxd_agent_harness.image.rootfs import BASE_PACKAGES, ImageSpec, build_image
from lxd_agent_harness.vm.config import GuestImage
from lxd_agent_harness.vm.instance import Vm
from tests.helpers import run
from tests.vms import (
    BOOT_TIMEOUT,
    STOP_TIMEOUT,
    TEST_DEADLINE,
    Figures,
    booted,
    kill_and_wait_restarted,
    multi_user_after,
    power_off_and_wait_stopped,
    state_changes,
)

pytestmark = pytest.mark.vm

# The unit's `systemd-analyze security` exposure in every release's guest (1.2 on 12: the
# guest's network namespace and netlink for Incus's state line; 0.7 before). As the host's
# check of the unit file (tests/systemd/test_units.py).
EXPOSURE_BOUND = 1.5
# Debian's own lxd-agent is in these releases' archives (tests/packaging/test_apt.py checks).
RELEASES_WITH_DEBIANS_LXD_AGENT = ("bookworm", "trixie")


def image_for(release: str, spec: ImageSpec, figures: Figures, what: str) -> GuestImage:
    started = time.monotonic()
    image = build_image(spec, progress=print)
    figures[f"{release}: image {what}: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image


@pytest.fixture(scope="module", params=list(RELEASES))
def release_image(
    request: pytest.FixtureRequest, deb: Path, figures: Figures
) -> tuple[str, GuestImage]:
    release: str = request.param
    spec = ImageSpec(release=release, debs=(deb,))
    return release, image_for(release, spec, figures, "with the .deb")


async def guest_versions(vm: Vm) -> str:
    python = await vm.run("python3 --version")
    systemd = await vm.run("systemctl --version | head -1")
    return f"{python.output.strip()}, {systemd.output.strip()}"


async def exposure(vm: Vm) -> float:
    security = await vm.run("systemd-analyze security --no-pager lxd-agent | tail -1")
    match = re.search(r"exposure level for lxd-agent\.service: ([0-9.]+)", security.output)
    assert match, security.output
    return float(match.group(1))


def test_release_reports_at_boot_after_a_kill_and_at_power_off(
    release_image: tuple[str, GuestImage], figures: Figures
) -> None:
    release, image = release_image

    async def scenario() -> None:
        async with booted(image, "lxd-5.20") as vm:
            started = await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            figures[f"{release}: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            print(f"{release} guest: {await guest_versions(vm)}")
            # The host's identity, as LXD passes it (SMBIOS type 2).
            board = await vm.run("cat /sys/class/dmi/id/board_vendor /sys/class/dmi/id/board_name")
            assert board.output.splitlines() == ["Canonical Ltd.", "LXD"], board.output

            # The agent picked the new name and saw the chardev-less legacy port hang up.
            probe = await vm.run("lxd-agent probe")
            assert probe.status == 0, probe.output
            new, legacy, incus, verdict = probe.output.strip().splitlines()
            assert new.startswith(PORT_NAME) and "host-connected=yes  usable" in new
            assert legacy.startswith(LEGACY_PORT_NAME) and "POLLHUP" in legacy, legacy
            assert incus.startswith(INCUS_PORT_NAME) and "no such port" in incus, incus
            assert verdict.startswith(f"would use: {PORT_NAME} (")

            # The unit as shipped, as this release's systemd reads it.
            show = await vm.run(
                "systemctl show lxd-agent -p ActiveState,SubState,Result,Type,DropInPaths,"
                "StatusText"
            )
            props = dict(line.split("=", 1) for line in show.output.splitlines() if "=" in line)
            assert props.get("ActiveState") == "active", show.output
            assert props.get("SubState") == "running", show.output
            assert props.get("Result") == "success", show.output
            assert props.get("Type") == "notify", show.output
            assert props.get("DropInPaths", "") == "", "the unit must run without drop-ins"
            assert props.get("StatusText", "").startswith(f"reporting to {PORT_NAME} (")
            # --man=no: the guest has no man-db to open Documentation=man:lxd-agent(8) with
            # (the package ships the page: tests/packaging/test_contents.py).
            verify = await vm.run(
                "systemd-analyze verify --man=no /lib/systemd/system/lxd-agent.service 2>&1"
            )
            assert verify.status == 0 and verify.output.strip() == "", verify.output
            score = await exposure(vm)
            figures[f"{release}: systemd-analyze security exposure"] = f"{score}"
            assert score <= EXPOSURE_BOUND
            multi_user = await multi_user_after(vm)
            figures[f"{release}: userspace -> multi-user.target"] = f"{multi_user:.2f} s"

            # systemctl stop and start move the host's state.
            stop = await vm.run("systemctl stop lxd-agent")
            assert stop.status == 0, stop.output
            await vm.wait_for_state(STOPPED, PORT_NAME, timeout=STOP_TIMEOUT)
            before = time.monotonic()
            start = await vm.run("systemctl start lxd-agent")
            assert start.status == 0, start.output
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=STOP_TIMEOUT)
            figures[f"{release}: systemctl start -> STARTED on the host"] = (
                f"{time.monotonic() - before:.2f} s"
            )

            figures[f"{release}: kill -> STOPPED, STARTED again"] = await kill_and_wait_restarted(
                vm, PORT_NAME
            )
            restarts = await vm.run("systemctl show lxd-agent -p NRestarts")
            assert restarts.output.strip() == "NRestarts=1", restarts.output
            errors = await vm.run("journalctl -b -q -u lxd-agent -p err --no-pager")
            assert errors.output.strip() == "", errors.output

            off = await power_off_and_wait_stopped(vm, PORT_NAME)
            figures[f"{release}: power-off -> STOPPED"] = f"{off:.2f} s"
            assert state_changes(vm, PORT_NAME) == [
                f"unknown -> {STARTED}",
                f"{STARTED} -> {STOPPED}",  # systemctl stop
                f"{STOPPED} -> {STARTED}",  # systemctl start
                f"{STARTED} -> {STOPPED}",  # kill: the stop hook
                f"{STOPPED} -> {STARTED}",  # restarted
                f"{STARTED} -> {STOPPED}",  # power-off
            ]

    run(scenario(), TEST_DEADLINE)


def test_release_reports_on_incus_and_holds_neither_boot_nor_power_off(
    release_image: tuple[str, GuestImage], figures: Figures
) -> None:
    release, image = release_image

    async def scenario() -> None:
        async with booted(image, "incus") as vm:
            # Incus's own port (its 7.3 rule), the chardev-less LXD stub beside it.
            started = await vm.wait_for_state(STARTED, INCUS_PORT_NAME, timeout=BOOT_TIMEOUT)
            figures[f"{release}: incus: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            await vm.login(timeout=BOOT_TIMEOUT)
            # A hanging agent would hold is-system-running in "starting" past this timeout.
            system = await vm.run("systemctl is-system-running --wait", timeout=90)
            multi_user = await multi_user_after(vm)
            figures[f"{release}: incus: userspace -> multi-user.target"] = f"{multi_user:.2f} s"
            agent = await vm.run(
                "systemctl show lxd-agent -p ActiveState,SubState,Result,NRestarts,StatusText"
            )
            figures[f"{release}: incus: agent unit after boot"] = " ".join(agent.output.split())
            assert system.output.strip() == "running", system.output  # not degraded
            assert "ActiveState=active" in agent.output and "NRestarts=0" in agent.output
            assert f"StatusText=reporting to {INCUS_PORT_NAME} (" in agent.output, agent.output
            off = await power_off_and_wait_stopped(vm, INCUS_PORT_NAME)
            figures[f"{release}: incus: power-off -> STOPPED"] = f"{off:.2f} s"
            assert state_changes(vm, INCUS_PORT_NAME) == [
                f"unknown -> {STARTED}",
                f"{STARTED} -> {STOPPED}",
            ]

    run(scenario(), TEST_DEADLINE)


@pytest.mark.parametrize("release", RELEASES_WITH_DEBIANS_LXD_AGENT)
def test_ours_takes_over_from_debians_lxd_agent_in_a_running_guest(
    release: str, deb: Path, figures: Figures
) -> None:
    spec = ImageSpec(release=release, packages=(*BASE_PACKAGES, "lxd-agent"), carried=(deb,))
    image = image_for(release, spec, figures, "with Debian's lxd-agent")

    async def scenario() -> None:
        async with booted(image, "lxd-5.20") as vm:
            await vm.login(timeout=BOOT_TIMEOUT)
            # Not `is-system-running --wait`: on trixie Debian's agent restarts for ever.
            theirs = await vm.run("dpkg-query -W -f '${Version}' lxd-agent")
            before = await vm.run("systemctl show lxd-agent -p ActiveState,Result")
            print(f"{release}: Debian's lxd-agent {theirs.output.strip()}: {before.output!r}")
            # Debian's agent (LXD 5.0) only knows the legacy port, which has no ring here.
            assert vm.monitor.state(PORT_NAME) is None

            # No network in the guest: apt installs the file with what the image has.
            installing_at = time.monotonic()
            install = await vm.run(
                f"apt-get install -y -q /root/{deb.name} 2>&1", timeout=BOOT_TIMEOUT
            )
            assert install.status == 0, install.output
            assert "trying to overwrite" not in install.output, install.output
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=STOP_TIMEOUT)
            figures[f"{release}: apt-get install over Debian's -> STARTED"] = (
                f"{time.monotonic() - installing_at:.2f} s"
            )
            gone = await vm.run("dpkg-query -W -f '${db:Status-Abbrev}' lxd-agent")
            assert gone.output.strip()[1:2] != "i", gone.output  # removed by the conflict
            verify = await vm.run(f"dpkg --verify {DEB_PACKAGE}")
            assert verify.status == 0 and verify.output.strip() == "", verify.output
            active = await vm.run("systemctl is-active lxd-agent")
            assert active.output.strip() == "active", active.output
            await power_off_and_wait_stopped(vm, PORT_NAME)

    run(scenario(), TEST_DEADLINE)
