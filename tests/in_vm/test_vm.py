"""VM tests: the built image with the installed .deb, booted under TCG with each LXD layout.

Each test boots one guest (never two at once) and checks, from the host's side, what the agent
reported on the ring buffers and when. A test that cannot run because a tool or the .deb is
missing fails; it never skips. On failure the console tail and the ring-buffer timeline are
printed (pytest shows them under "Captured stdout"). The figures measured are printed at the end.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import GuestPanicked
from lxd_agent_harness.image.deb import DEB_PACKAGE
from lxd_agent_harness.image.rootfs import BASE_PACKAGES, CLOUD_INIT_PACKAGES, ImageSpec
from lxd_agent_harness.image.rootfs import build_image as build_guest_image
from lxd_agent_harness.image.seed import INSTALLED_MARKER, SEED_DIR, make_seed_iso
from lxd_agent_harness.lxd import monitor
from lxd_agent_harness.testing.guest import LxdVm
from lxd_agent_harness.vm.config import GuestImage
from lxd_agent_harness.vm.instance import Vm
from tests.harness.vm.test_config import DEBIAN_12_QEMU
from tests.helpers import run
from tests.vms import (
    BOOT_TIMEOUT,
    SEED_BOOT_TIMEOUT,
    STOP_TIMEOUT,
    Figures,
    booted,
    checked_boot,
    multi_user_after,
)

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cloud_init_image(figures: Figures) -> GuestImage:
    """The image with cloud-init and WITHOUT the package: the seed has to install it."""
    started = time.monotonic()
    spec = ImageSpec(packages=BASE_PACKAGES + CLOUD_INIT_PACKAGES)
    image = build_guest_image(spec, progress=print)
    figures["image with cloud-init: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image


# -- one test per layout ------------------------------------------------------------------------


@pytest.mark.lxd_cold  # the port the agent picks as it starts is the point
@pytest.mark.lxd_layout("lxd-5.19")
def test_lxd_5_19_falls_back_to_the_legacy_port(lxd_vm: LxdVm, figures: Figures) -> None:
    """On the project's plugin, as an image builder's test would be written."""
    started = lxd_vm.wait_for(STARTED, timeout=BOOT_TIMEOUT)
    assert started.port == LEGACY_PORT_NAME
    figures["lxd-5.19: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
    probe = lxd_vm.run("lxd-agent probe")
    assert f"would use: {LEGACY_PORT_NAME}" in probe.output, probe.output
    figures["lxd-5.19: userspace -> multi-user.target"] = (
        f"{lxd_vm.call(multi_user_after(lxd_vm.vm), 120):.2f} s"
    )
    off = lxd_vm.power_off()
    assert off.stopped and off.guest_off, off.timeline
    assert off.stopped_at is not None and off.powered_down_at is not None
    figures["lxd-5.19: power-off -> STOPPED"] = f"{off.stopped_at - off.powered_down_at:.2f} s"
    assert monitor.state_changes(lxd_vm.vm.monitor.timeline.entries, LEGACY_PORT_NAME) == [
        f"unknown -> {STARTED}",
        f"{STARTED} -> {STOPPED}",
    ]


# Ours on `bridged`: a cell of the compatibility matrix (tests/harness/scenarios/test_matrix.py).


# -- QEMU before 8.1 --------------------------------------------------------------------------


def test_a_qemu_older_than_8_1_runs_the_vcpus_on_one_thread_and_the_timeline_says_why(
    guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch, figures: Figures
) -> None:
    """The harness as it runs under Debian 12's own QEMU 7.2 (told it is, by its version line)."""
    asked: list[str] = []

    def debian_12_qemu(binary: str) -> str:
        asked.append(binary)
        return DEBIAN_12_QEMU

    # The command line and the timeline's note both ask through vm.config.config_tcg_accel.
    monkeypatch.setattr("lxd_agent_harness.vm.config.qemu_version", debian_12_qemu)

    async def scenario() -> None:
        # Two vCPUs, whatever the suite's default: one thread matters only with more than one.
        async with booted(guest_image, "lxd-5.20", cpus=2) as vm:
            argv = Path(f"/proc/{vm.qemu.pid}/cmdline").read_bytes().split(b"\0")
            assert argv[argv.index(b"-accel") + 1] == b"tcg,thread=single"
            # One thread keeps one core busy: the guest waited for one of the machine's cores,
            # not both (a wait for both once outlasted this test's deadline while another
            # worker's VM held one for minutes).
            assert vm.cores is not None and vm.cores.wanted == 1
            started = await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            figures["2 vCPUs on one TCG thread: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            notes = [line for line in vm.render_timeline() if "older than 8.1" in line]
            assert len(notes) == 1 and "the 2 vCPUs share one thread" in notes[0], notes

    run(scenario(), BOOT_TIMEOUT + STOP_TIMEOUT)
    assert asked and set(asked) == {"qemu-system-x86_64"}


def test_a_kernel_panic_in_the_guest_ends_every_wait_at_once_with_the_kernels_reason(
    guest_image: GuestImage,
) -> None:
    """What a guest that dies looks like to a test: a GuestPanicked, not a 120 s timeout."""

    async def scenario() -> None:
        async with booted(guest_image, "lxd-5.20") as vm:
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            await vm.login(timeout=BOOT_TIMEOUT)
            # Root may always write the trigger, whatever kernel.sysrq allows.
            with pytest.raises(GuestPanicked) as at_the_prompt:
                await vm.run("echo c > /proc/sysrq-trigger", timeout=BOOT_TIMEOUT)
            assert at_the_prompt.value.panic == "sysrq triggered crash", at_the_prompt.value
            assert any("sysrq triggered crash" in line for line in at_the_prompt.value.console_tail)
            # A wait on the ring too: the agent never got to say STOPPED.
            with pytest.raises(GuestPanicked):
                await vm.wait_for_state(STOPPED, PORT_NAME, timeout=BOOT_TIMEOUT)
            assert any("kernel panic: sysrq" in line for line in vm.render_timeline())

    run(scenario(), 2 * BOOT_TIMEOUT + STOP_TIMEOUT)


# -- the NoCloud install path ------------------------------------------------------------------


def test_cloud_init_seed_installs_the_agent_which_reports_started_and_stopped(
    cloud_init_image: GuestImage, deb: Path, tmp_path: Path, figures: Figures
) -> None:
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    seed = make_seed_iso(deb, tmp_path / "seed.iso")

    async def remove_and_reinstall(vm: Vm) -> None:
        assert INSTALLED_MARKER in vm.console.tail(2000)
        installed = await vm.run(f"dpkg-query -W -f '${{Version}}' {DEB_PACKAGE}")
        assert installed.output.strip() == version, installed.output
        # Removing stops the agent (the host sees STOPPED); installing again in the same
        # boot starts it (the port already exists: no new device event would do it).
        removed = await vm.run(f"dpkg -r {DEB_PACKAGE}", timeout=60)
        assert removed.status == 0, removed.output
        await vm.wait_for_state(STOPPED, PORT_NAME, timeout=STOP_TIMEOUT)
        again = await vm.run(f"dpkg -i {SEED_DIR}/{deb.name}", timeout=120)
        assert again.status == 0, again.output
        await vm.wait_for_state(STARTED, PORT_NAME, timeout=STOP_TIMEOUT)

    verdict = checked_boot(
        cloud_init_image,
        "lxd-5.20",
        seed=seed,
        timeout=SEED_BOOT_TIMEOUT,
        while_up=remove_and_reinstall,
    )
    assert verdict.started and verdict.stopped
    figures["cloud-init seed: QEMU start -> STARTED"] = f"{verdict.started.seconds:.2f} s"
    figures["cloud-init seed: power-off -> STOPPED"] = f"{verdict.stopped_after_power_off:.2f} s"
    assert verdict.state_changes(PORT_NAME) == [
        f"unknown -> {STARTED}",
        f"{STARTED} -> {STOPPED}",
        f"{STOPPED} -> {STARTED}",
        f"{STARTED} -> {STOPPED}",
    ]


# A guest without an agent never reports STARTED (the harness does not pass by itself):
# `check` on the cloud image without one (tests/harness/scenarios/test_check.py).


# -- the command line ----------------------------------------------------------------------------


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone meanwhile
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.last
def test_no_vm_test_left_a_qemu_behind() -> None:
    """Last on its worker: no harness QEMU is left as this process's child or as an orphan
    (its starter gone). The other worker's guests, still running, have a living starter."""
    found = subprocess.run(
        ["pgrep", "-f", "lxd-agent-harness-"], capture_output=True, text=True
    ).stdout.split()
    pids = [int(pid) for pid in found if int(pid) != os.getpid()]
    assert [pid for pid in pids if _parent(pid) in (os.getpid(), 1)] == []
