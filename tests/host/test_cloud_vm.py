"""VM tests: the cloud image (`image --cloud`) booted through firmware, as LXD boots its VMs.

Each test boots one guest under TCG through UEFI (OVMF, LXD's default) or BIOS (SeaBIOS) from
the image's own GRUB, with the lxd-5.20 layout and its SPICE ports; a NoCloud seed installs the
.deb, and the host must see STARTED then STOPPED on com.canonical.lxd. Bad images must fail fast
with the reason. A missing tool or package fails the test; nothing skips. Figures are printed
with the other VM tests' (the session's `figures`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lxd_agent.host.accel import Accel
from lxd_agent.host.cloudimage import CloudImage, build_cloud_image, cloud_spec
from lxd_agent.host.errors import VmError
from lxd_agent.host.firmware import Firmware
from lxd_agent.host.layouts import SPICE_AGENT_PORT_NAME, SPICE_WEBDAV_PORT_NAME, get_layout
from lxd_agent.host.seed import make_seed_iso
from lxd_agent.host.vm import FirmwareBoot, Vm, VmConfig
from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from tests.host.helpers import run
from tests.host.test_vm import Figures, deb, figures  # noqa: F401 (session fixtures)

pytestmark = pytest.mark.vm

SEED_BOOT_TIMEOUT = 420.0
STOP_TIMEOUT = 30.0
POWER_OFF_BOUND = 20.0
# A bad image must fail well before the boot timeout: the firmware's dead end shows in seconds.
BAD_IMAGE_BOUND = 120.0
TEST_DEADLINE = 600.0


@pytest.fixture(scope="session")
def cloud_image(figures: Figures) -> CloudImage:  # noqa: F811
    started = time.monotonic()
    image = build_cloud_image(cloud_spec(), progress=print)
    figures["cloud image: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image


async def _boot_cloud(
    image: CloudImage, firmware: Firmware, seed: Path, check_ports: bool
) -> tuple[float, float, list[str]]:
    """Boot, wait for STARTED, power off, wait for STOPPED; (STARTED s, STOPPED s, port names)."""
    boot = FirmwareBoot(image.disk, "qcow2", firmware)
    config = VmConfig(get_layout("lxd-5.20"), boot, Accel.TCG, seed=seed)
    async with Vm(config, progress=print) as vm:
        try:
            started = await vm.wait_for_state(STARTED, PORT_NAME, timeout=SEED_BOOT_TIMEOUT)
            ports: list[str] = []
            if check_ports:
                listing = await vm.run("cat /sys/class/virtio-ports/*/name")
                ports = listing.output.split()
            await vm.power_off()
            stopped = await vm.wait_for_state(STOPPED, PORT_NAME, timeout=STOP_TIMEOUT)
            await vm.wait_guest_off(timeout=POWER_OFF_BOUND)
        except BaseException:
            print(f"=== cloud image, {firmware.value}: console tail and timeline ===")
            print(vm.report(console_lines=40))
            raise
        print("\n".join(vm.render_timeline()))
        assert vm.powerdown_at is not None
        return started.seconds, stopped.seconds - (vm.powerdown_at - vm.t0), ports


@pytest.mark.parametrize("firmware", [Firmware.UEFI, Firmware.BIOS], ids=["uefi", "bios"])
def test_cloud_image_boots_through_firmware_and_reports_started_then_stopped(
    firmware: Firmware,
    cloud_image: CloudImage,
    deb: Path,  # noqa: F811
    figures: Figures,  # noqa: F811
    tmp_path: Path,
) -> None:
    seed = make_seed_iso(deb, tmp_path / "seed.iso")
    before = os.stat(cloud_image.disk)
    started, stopped_after, ports = run(
        _boot_cloud(cloud_image, firmware, seed, check_ports=firmware is Firmware.UEFI),
        deadline=TEST_DEADLINE,
    )
    figures[f"cloud image, {firmware.value}: QEMU start -> STARTED"] = f"{started:.2f} s"
    figures[f"cloud image, {firmware.value}: power-off -> STOPPED"] = f"{stopped_after:.2f} s"
    after = os.stat(cloud_image.disk)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    if firmware is Firmware.UEFI:
        # LXD 5.20's four ports, seen from inside the guest: the count a saved state must match.
        assert sorted(ports) == sorted(
            [PORT_NAME, LEGACY_PORT_NAME, SPICE_AGENT_PORT_NAME, SPICE_WEBDAV_PORT_NAME]
        )


async def _boot_bad(image: Path, firmware: Firmware) -> VmError:
    config = VmConfig(get_layout("lxd-5.20"), FirmwareBoot(image, "raw", firmware), Accel.TCG)
    async with Vm(config, progress=print) as vm:
        with pytest.raises(VmError) as caught:
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=SEED_BOOT_TIMEOUT)
        return caught.value


@pytest.mark.parametrize("firmware", [Firmware.UEFI, Firmware.BIOS], ids=["uefi", "bios"])
def test_a_disk_with_nothing_to_boot_fails_fast_with_the_firmwares_reason(
    firmware: Firmware,
    tmp_path: Path,
    figures: Figures,  # noqa: F811
) -> None:
    blank = tmp_path / "blank.raw"
    blank.write_bytes(b"\0" * (4 << 20))
    started = time.monotonic()
    error = run(_boot_bad(blank, firmware), deadline=TEST_DEADLINE)
    took = time.monotonic() - started
    figures[f"blank disk, {firmware.value}: QEMU start -> failure"] = f"{took:.1f} s"
    assert took < BAD_IMAGE_BOUND, str(error)
    expected = "UEFI firmware" if firmware is Firmware.UEFI else "BIOS found no bootable device"
    assert expected in str(error)
    assert error.console_tail, "the error carries the console's last lines"
