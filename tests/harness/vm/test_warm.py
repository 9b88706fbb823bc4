"""Tests for lxd_agent_harness.vm.warm: what a saved guest is keyed by (no VM), then real saves
and restores: a guest restored twice from one state, each on its own disk; a state QEMU refuses
falls back to a cold boot and is removed."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, Network, VmConfig
from lxd_agent_harness.vm.warm import How, SavedGuest, started_vm, warm_key
from tests.helpers import run
from tests.vms import Figures

QEMU = "QEMU emulator version 7.2.0"


def image_files(tmp_path: Path) -> GuestImage:
    image = GuestImage(tmp_path / "image")
    image.directory.mkdir()
    for path in (image.disk, image.kernel, image.initrd):
        path.write_bytes(b"x")
    return image


def test_a_saved_guest_fits_only_the_same_image_layout_machine_and_qemu(tmp_path: Path) -> None:
    image = image_files(tmp_path)
    config = VmConfig(
        layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=Accel.TCG, cpus=2
    )
    key = warm_key(config, QEMU)
    assert warm_key(config, QEMU) == key  # stable
    others = [
        warm_key(replace(config, layout=get_layout("lxd-5.19")), QEMU),
        warm_key(replace(config, ring_size=64), QEMU),
        warm_key(replace(config, memory_mib=2048), QEMU),
        warm_key(replace(config, cpus=1), QEMU),
        warm_key(replace(config, network=Network.ISOLATED), QEMU),
        warm_key(replace(config, credentials=(("lxd-agent.state", "on"),)), QEMU),
        warm_key(config, "QEMU emulator version 8.2.0"),
    ]
    assert len({key, *others}) == len(others) + 1
    # A rebuilt image (new contents, new time) is another image.
    os.utime(image.disk, ns=(0, time.time_ns() + 10**9))
    assert warm_key(config, QEMU) != key


# -- real guests ------------------------------------------------------------------------------

WARM_DEADLINE = 600.0


@pytest.mark.vm
def test_guests_restored_from_one_state_report_at_once_and_never_share_a_disk(
    guest_image: GuestImage, tmp_path: Path, figures: Figures
) -> None:
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(guest_image), accel=Accel.TCG)
    store = tmp_path / "warm"

    async def scenario() -> None:
        async with started_vm(config, warm=True, progress=print, store=store) as (vm, start):
            assert start.how is How.WARM, start.reason
            # The host saw STARTED before the guest was handed over: the agent's refresh.
            assert vm.monitor.state(vm.config.layout.rings[0].port_name) == STARTED
            assert vm.config.incoming is not None and vm.config.overlay is not None
            written = await vm.run("echo first > /root/mark && sync && cat /root/mark")
            assert written.output == "first"
            first_disk = vm.config.overlay
        assert not first_disk.exists()  # the guest's own overlay went with it
        began = time.monotonic()
        async with started_vm(config, warm=True, progress=print, store=store) as (vm, start):
            figures["warm start: ask -> STARTED seen"] = f"{time.monotonic() - began:.2f} s"
            assert start.how is How.WARM, start.reason
            # Its own overlay over the saved disk: the first guest's write is not there.
            assert vm.config.overlay != first_disk
            seen = await vm.run("cat /root/mark 2>&1; systemctl is-active lxd-agent")
            assert seen.output.splitlines() == [
                "cat: /root/mark: No such file or directory",
                "active",
            ]
            await vm.power_off()
            await vm.wait_for_state(STOPPED, None, timeout=30)

    run(scenario(), WARM_DEADLINE)
    saved = [d for d in store.iterdir() if SavedGuest(d).is_complete()]
    assert len(saved) == 1 and not [d for d in store.iterdir() if d.name.startswith(".")]


@pytest.mark.vm
def test_a_state_qemu_refuses_falls_back_to_a_cold_boot_that_says_why(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    config = VmConfig(layout=get_layout("lxd-5.19"), boot=DirectBoot(guest_image), accel=Accel.TCG)
    store = tmp_path / "warm"

    async def scenario() -> None:
        async with started_vm(config, warm=True, progress=print, store=store) as (_vm, start):
            assert start.how is How.WARM, start.reason
        (saved,) = [SavedGuest(d) for d in store.iterdir()]
        saved.state.write_bytes(b"not a migration stream")
        async with started_vm(config, warm=True, progress=print, store=store) as (vm, start):
            assert start.how is How.COLD
            assert "the restore of" in start.reason and "is removed" in start.reason
            assert vm.config.incoming is None  # a real boot
            await vm.wait_for_state(STARTED, None, timeout=120)
        assert not saved.directory.exists()

    run(scenario(), WARM_DEADLINE)
