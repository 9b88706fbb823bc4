"""Tests for lxd_agent_harness.vm.config: the QEMU command line a `VmConfig` makes, without
booting anything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import (
    VmError,
)
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.qemu.migration import incoming_uri
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import (
    DirectBoot,
    FirmwareBoot,
    GuestImage,
    VmConfig,
    VmFiles,
    qemu_args,
)
from lxd_agent_harness.vm.firmware import Firmware
from tests.helpers import unbooted_config


def test_qemu_command_line_pauses_on_shutdown_and_writes_only_the_overlay(tmp_path: Path) -> None:
    config, files = unbooted_config(tmp_path, Accel.TCG)
    args = qemu_args(config, files)
    joined = " ".join(args)
    assert args[0] == "-S"
    assert "-action shutdown=pause,reboot=shutdown" in joined
    assert "-accel tcg" in joined and "-cpu host" not in joined
    assert f"file={files.overlay},format=qcow2" in joined
    assert "disk.raw" not in joined  # the base image is only the overlay's backing file
    assert "-nodefaults" in args and "-display none" in joined
    assert "-chardev pty,id=console" in joined
    layout_args = get_layout("lxd-5.20").qemu_args(16, spice_socket=files.spice_socket)
    assert " ".join(layout_args) in joined
    # LXD serves SPICE on a unix socket; ours is in the VM's temporary directory.
    assert f"-spice unix=on,addr={files.spice_socket},disable-ticketing=on" in joined
    assert files.spice_socket.parent == files.workdir
    # LXD's RNG: entropy from the host, not gathered by the guest under TCG.
    assert "-device virtio-rng-pci,id=dev-qemu_rng,rng=qemu_rng" in joined
    assert "-object rng-random,id=qemu_rng,filename=/dev/urandom" in joined


def test_a_restore_loads_the_state_onto_the_overlay_the_caller_keeps(tmp_path: Path) -> None:
    config, files = unbooted_config(tmp_path, Accel.TCG)
    kept, state = tmp_path / "kept.qcow2", tmp_path / "state"
    args = qemu_args(replace(config, overlay=kept, incoming=state), files)
    joined = " ".join(args)
    assert f"file={kept},format=qcow2" in joined and str(files.overlay) not in joined
    assert args[args.index("-incoming") + 1] == incoming_uri(state)
    assert "-incoming" not in qemu_args(replace(config, overlay=kept), files)


def test_a_uefi_boot_keeps_an_overlay_or_restores_only_with_its_variable_store(
    tmp_path: Path,
) -> None:
    boot = FirmwareBoot(tmp_path / "cloud.qcow2", "qcow2")
    config = VmConfig(layout=get_layout("lxd-5.19"), boot=boot, accel=Accel.TCG)
    files = VmFiles(tmp_path / "run")
    for kept in (replace(config, overlay=tmp_path / "o"), replace(config, incoming=tmp_path / "s")):
        with pytest.raises(VmError) as raised:
            qemu_args(kept, files)
        assert "VmConfig.uefi_vars" in str(raised.value)
        # With the store kept beside it, the boot runs on it instead of a fresh copy.
        args = qemu_args(replace(kept, uefi_vars=tmp_path / "vars.fd"), files)
        assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}" in args
    # BIOS keeps nothing of its own: its state is all in the saved machine.
    bios = replace(config, boot=replace(boot, firmware=Firmware.BIOS), overlay=tmp_path / "o")
    assert f"file={tmp_path / 'o'},format=qcow2,if=virtio,cache=unsafe,discard=unmap" in qemu_args(
        bios, files
    )


def test_each_layout_gets_its_own_ring_size_unless_the_boot_overrides_it(tmp_path: Path) -> None:
    files = VmFiles(tmp_path / "run")
    image = GuestImage(tmp_path / "image")

    def ring_args(layout: str, ring_size: int | None) -> list[str]:
        config = VmConfig(get_layout(layout), DirectBoot(image), Accel.TCG, ring_size=ring_size)
        return [a for a in qemu_args(config, files) if a.startswith("ringbuf,")]

    assert ring_args("lxd-5.20", None) == ["ringbuf,id=qemu_serial-chardev,size=16"]
    assert ring_args("incus", None) == ["ringbuf,id=qemu_serial-chardev,size=16384"]
    assert ring_args("incus", 64) == ["ringbuf,id=qemu_serial-chardev,size=64"]


def test_kvm_gets_the_host_cpu_and_auto_is_refused_undecided(tmp_path: Path) -> None:
    config, files = unbooted_config(tmp_path, Accel.KVM)
    assert "-accel kvm -cpu host" in " ".join(qemu_args(config, files))
    undecided, _ = unbooted_config(tmp_path, Accel.AUTO)
    with pytest.raises(VmError, match="choose_accel"):
        qemu_args(undecided, files)


@pytest.mark.parametrize("secure_boot", [False, True], ids=["uefi", "uefi-secure-boot"])
def test_a_firmware_boot_has_no_kernel_and_its_own_vars_in_the_vm_dir(
    tmp_path: Path, secure_boot: bool
) -> None:
    files = VmFiles(tmp_path / "run")
    boot = FirmwareBoot(tmp_path / "user.qcow2", "qcow2", Firmware.UEFI, secure_boot)
    args = qemu_args(VmConfig(get_layout("lxd-5.20"), boot, Accel.TCG), files)
    joined = " ".join(args)
    assert "-kernel" not in args and "-append" not in args
    assert f"if=pflash,format=raw,unit=1,file={files.uefi_vars}" in joined
    assert files.uefi_vars.parent == files.workdir
    assert "user.qcow2" not in joined  # only the overlay's backing file
    assert args[args.index("-machine") + 1] == ("q35,smm=on" if secure_boot else "q35")


def test_a_bios_boot_has_no_pflash(tmp_path: Path) -> None:
    boot = FirmwareBoot(tmp_path / "user.qcow2", "qcow2", Firmware.BIOS)
    args = qemu_args(VmConfig(get_layout("lxd-5.20"), boot, Accel.TCG), VmFiles(tmp_path))
    assert not any("if=pflash" in arg for arg in args) and "-kernel" not in args
