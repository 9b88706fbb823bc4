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

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.image.cloud import CloudImage, build_cloud_image, cloud_spec
from lxd_agent_harness.image.seed import make_seed_iso
from lxd_agent_harness.lxd.layouts import SPICE_AGENT_PORT_NAME, SPICE_WEBDAV_PORT_NAME
from lxd_agent_harness.vm.config import FirmwareBoot
from lxd_agent_harness.vm.firmware import Firmware
from lxd_agent_harness.vm.instance import Vm
from tests.vms import Figures, checked_boot

pytestmark = pytest.mark.vm

SEED_BOOT_TIMEOUT = 420.0
STOP_TIMEOUT = 30.0
POWER_OFF_BOUND = 20.0


@pytest.fixture(scope="session")
def cloud_image(figures: Figures) -> CloudImage:
    started = time.monotonic()
    image = build_cloud_image(cloud_spec(), progress=print)
    figures["cloud image: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image


def test_cloud_image_boots_through_bios_and_reports_started_then_stopped(
    cloud_image: CloudImage,
    deb: Path,
    figures: Figures,
    tmp_path: Path,
) -> None:
    """Through UEFI: `check` on the cloud image with our package (test_check.py), and below
    with secure boot, both on LXD's default firmware."""
    firmware = Firmware.BIOS
    seed = make_seed_iso(deb, tmp_path / "seed.iso")
    before = os.stat(cloud_image.disk)
    verdict = checked_boot(
        FirmwareBoot(cloud_image.disk, "qcow2", firmware),
        "lxd-5.20",
        seed=seed,
        timeout=SEED_BOOT_TIMEOUT,
    )
    assert verdict.started and verdict.stopped and verdict.port == PORT_NAME
    figures[f"cloud image, {firmware.value}: QEMU start -> STARTED"] = (
        f"{verdict.started.seconds:.2f} s"
    )
    figures[f"cloud image, {firmware.value}: power-off -> STOPPED"] = (
        f"{verdict.stopped_after_power_off:.2f} s"
    )
    # The seed installs the package again once the guest is up, which restarts the agent (a
    # STOPPED, then STARTED, when the monitor reads between the two): the power button waits for
    # the install's end, so the STOPPED the verdict holds is the power-off's.
    changes = verdict.state_changes(PORT_NAME)
    assert changes[0] == f"unknown -> {STARTED}" and changes[-1] == f"{STARTED} -> {STOPPED}"
    assert changes[1:-1] in ([], [f"{STARTED} -> {STOPPED}", f"{STOPPED} -> {STARTED}"]), changes
    assert verdict.stopped_after_power_off is not None and verdict.stopped_after_power_off >= 0
    after = os.stat(cloud_image.disk)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


# The UEFI global variable SecureBoot: 4 bytes of attributes, then 1 when secure boot is on.
SECURE_BOOT_VARIABLE = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def test_cloud_image_boots_with_secure_boot_on_through_debians_signed_shim(
    cloud_image: CloudImage, deb: Path, figures: Figures, tmp_path: Path
) -> None:
    seed = make_seed_iso(deb, tmp_path / "seed.iso")
    state: list[str] = []
    ports: list[str] = []

    async def secure_boot_state(vm: Vm) -> None:
        value = await vm.run(f"od -An -tu1 {SECURE_BOOT_VARIABLE}")
        state.extend(value.output.split())
        listing = await vm.run("cat /sys/class/virtio-ports/*/name")
        ports.extend(listing.output.split())

    verdict = checked_boot(
        FirmwareBoot(cloud_image.disk, "qcow2", Firmware.UEFI, secure_boot=True),
        "lxd-5.20",
        seed=seed,
        timeout=SEED_BOOT_TIMEOUT,
        while_up=secure_boot_state,
    )
    assert verdict.started and verdict.stopped
    figures["cloud image, uefi + secure boot: QEMU start -> STARTED"] = (
        f"{verdict.started.seconds:.2f} s"
    )
    # The firmware enforced signatures all the way: shim, GRUB and the kernel were verified.
    assert state[-1:] == ["1"], state
    # LXD 5.20's four ports, seen from inside the guest: the count a saved state must match.
    assert sorted(ports) == sorted(
        [PORT_NAME, LEGACY_PORT_NAME, SPICE_AGENT_PORT_NAME, SPICE_WEBDAV_PORT_NAME]
    )
