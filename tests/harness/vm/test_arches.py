"""Tests for lxd_agent_harness.vm.arches and the command line it gives an arm64 guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.arches import MACHINES, guest_machine
from lxd_agent_harness.vm.config import (
    ARCH_FILE,
    DirectBoot,
    FirmwareBoot,
    GuestImage,
    VmConfig,
    VmFiles,
    qemu_args,
    qemu_conf_text,
)
from lxd_agent_harness.vm.firmware import Firmware, machine_arg, ovmf_files


def arm64_image(tmp_path: Path) -> GuestImage:
    image = GuestImage(tmp_path / "image")
    image.directory.mkdir()
    (image.directory / ARCH_FILE).write_text("arm64\n")
    return image


def value(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def test_every_architecture_has_its_machine_as_lxd_chooses_it() -> None:
    assert set(MACHINES) == set(Arch)
    assert guest_machine(Arch.AMD64).machine == "q35"
    assert guest_machine(Arch.ARM64).machine == "virt,gic-version=max"
    assert guest_machine(Arch.ARM64).qemu_binary == "qemu-system-aarch64"
    assert (guest_machine(Arch.AMD64).bios, guest_machine(Arch.ARM64).bios) == (True, False)


def test_an_arm64_image_boots_on_virt_with_its_console_on_the_pl011(tmp_path: Path) -> None:
    image = arm64_image(tmp_path)
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=Accel.TCG)
    assert config.guest_arch is Arch.ARM64  # from the image
    args = qemu_args(config, VmFiles(tmp_path / "run"))
    assert value(args, "-machine") == "virt,gic-version=max"
    assert value(args, "-cpu") == guest_machine(Arch.ARM64).tcg_cpu
    assert value(args, "-append") == "root=/dev/vda rw console=ttyAMA0"
    # LXD's serial bus and ports, as on amd64.
    assert "-readconfig" in args
    assert 'driver = "virtio-serial-pci"' in qemu_conf_text(config)


def test_an_image_of_one_architecture_is_not_booted_as_another(tmp_path: Path) -> None:
    config = VmConfig(
        layout=get_layout("lxd-5.20"),
        boot=DirectBoot(arm64_image(tmp_path)),
        accel=Accel.TCG,
        arch=Arch.AMD64,
    )
    with pytest.raises(VmError) as raised:
        qemu_args(config, VmFiles(tmp_path / "run"))
    assert "build the image with --arch amd64" in str(raised.value)


def test_arm64_boots_through_aavmf_and_never_a_bios(tmp_path: Path) -> None:
    files = ovmf_files(False, arch=Arch.ARM64)
    assert (files.code.name, files.vars_template.name) == ("AAVMF_CODE.fd", "AAVMF_VARS.fd")
    assert ovmf_files(True, arch=Arch.ARM64).vars_template.name == "AAVMF_VARS.ms.fd"
    boot = FirmwareBoot(tmp_path / "disk.qcow2", "qcow2", Firmware.UEFI, secure_boot=True)
    config = VmConfig(get_layout("lxd-5.20"), boot, Accel.TCG, arch=Arch.ARM64)
    args = qemu_args(config, VmFiles(tmp_path / "run"))
    assert value(args, "-machine") == "virt,gic-version=max"  # no SMM on arm64
    secure = ovmf_files(True, arch=Arch.ARM64)
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={secure.code}" in args
    assert "driver=cfi.pflash01,property=secure,value=on" not in args
    with pytest.raises(VmError) as raised:
        machine_arg(Firmware.BIOS, False, Arch.ARM64)
    assert "arm64 guests boot through UEFI only" in str(raised.value)
