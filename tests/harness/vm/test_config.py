"""Tests for lxd_agent_harness.vm.config: the QEMU command line a `VmConfig` makes, without
booting anything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import (
    VmError,
)
from lxd_agent_harness.lxd.layouts import LAYOUTS, get_layout
from lxd_agent_harness.lxd.qemu_conf import layout_sections, parse_raw_qemu_conf, render
from lxd_agent_harness.qemu.migration import incoming_uri
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import (
    DirectBoot,
    FirmwareBoot,
    GuestImage,
    VmConfig,
    VmFiles,
    host_cores,
    qemu_args,
    qemu_conf_text,
    qemu_sections,
    tcg_accel,
)
from lxd_agent_harness.vm.firmware import Firmware
from tests.helpers import unbooted_config


def test_qemu_command_line_pauses_on_shutdown_and_writes_only_the_overlay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever QEMU this host has: the thread mode is test_tcg_runs_vcpus_on_one_thread_...'s.
    monkeypatch.setattr("lxd_agent_harness.vm.config.qemu_version", lambda _: BACKPORTS_QEMU)
    config, files = unbooted_config(tmp_path, Accel.TCG)
    args = qemu_args(config, files)
    joined = " ".join(args)
    assert args[0] == "-S"
    assert "-action shutdown=pause,reboot=shutdown" in joined
    assert args[args.index("-accel") + 1] == "tcg" and "-cpu host" not in joined
    assert f"file={files.overlay},format=qcow2" in joined
    assert "disk.raw" not in joined  # the base image is only the overlay's backing file
    assert "-nodefaults" in args and "-display none" in joined
    assert "-chardev pty,id=console" in joined
    # The layout as LXD passes it: configuration sections, read with -readconfig.
    assert args[args.index("-readconfig") + 1] == str(files.qemu_conf)
    assert qemu_conf_text(config) == render(layout_sections(get_layout("lxd-5.20"), 16))
    assert "virtserialport" not in joined
    # LXD serves SPICE on a unix socket; ours is in the VM's temporary directory.
    assert f"-spice unix=on,addr={files.spice_socket},disable-ticketing=on" in joined
    assert files.spice_socket.parent == files.workdir
    # LXD's RNG: entropy from the host, not gathered by the guest under TCG.
    assert "-device virtio-rng-pci,id=dev-qemu_rng,rng=qemu_rng" in joined
    assert "-object rng-random,id=qemu_rng,filename=/dev/urandom" in joined


def test_raw_qemu_conf_changes_the_sections_and_spice_goes_with_its_last_chardev(
    tmp_path: Path,
) -> None:
    config, files = unbooted_config(tmp_path, Accel.TCG)
    no_stub = replace(
        config, raw_qemu_conf=tuple(parse_raw_qemu_conf('[device "qemu_serial_legacy"]'))
    )
    assert 'device "qemu_serial_legacy"' in qemu_conf_text(config)
    assert 'device "qemu_serial_legacy"' not in qemu_conf_text(no_stub)
    assert "-spice" in qemu_args(no_stub, files)
    no_spice = replace(
        config,
        raw_qemu_conf=tuple(
            parse_raw_qemu_conf(
                '[chardev "qemu_spice-chardev"]\n[device "qemu_spice"]\n'
                '[chardev "qemu_spicedir-chardev"]\n[device "qemu_spicedir"]\n'
            )
        ),
    )
    assert "-spice" not in qemu_args(no_spice, files)


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
    image = GuestImage(tmp_path / "image")

    def ring_size(layout: str, ring_size: int | None) -> list[str | None]:
        config = VmConfig(get_layout(layout), DirectBoot(image), Accel.TCG, ring_size=ring_size)
        return [s.get("size") for s in qemu_sections(config) if s.get("backend") == "ringbuf"]

    assert ring_size("lxd-5.20", None) == ["16B"]
    assert ring_size("incus", None) == ["16384B"]
    assert ring_size("incus", 64) == ["64B"]


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


DEBIAN_12_QEMU = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
BACKPORTS_QEMU = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"


@pytest.mark.parametrize(
    ("version_line", "cpus", "accel"),
    [
        (DEBIAN_12_QEMU, 2, "tcg,thread=single"),  # the race: vCPUs on one thread
        (DEBIAN_12_QEMU, 1, "tcg"),  # one vCPU has nobody to race with
        ("QEMU emulator version 8.0.4", 4, "tcg,thread=single"),
        ("QEMU emulator version 8.1.0", 2, "tcg"),  # the fix's release
        (BACKPORTS_QEMU, 2, "tcg"),
        ("something else entirely", 2, "tcg"),  # unknown: QEMU's default
    ],
)
def test_tcg_runs_vcpus_on_one_thread_only_under_a_qemu_with_the_stale_code_race(
    version_line: str, cpus: int, accel: str
) -> None:
    chosen, why = tcg_accel(version_line, cpus)
    assert chosen == accel
    assert (why is None) == (accel == "tcg")


def test_the_reason_names_the_qemu_and_the_version_that_fixed_it() -> None:
    _, why = tcg_accel(DEBIAN_12_QEMU, 2)
    assert why is not None and "QEMU 7.2 is older than 8.1" in why and "2 vCPUs" in why


def test_the_command_line_asks_the_installed_qemu_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, files = unbooted_config(tmp_path, Accel.TCG)
    config = replace(config, cpus=2)  # one thread matters only with more than one vCPU
    asked: list[str] = []

    def old_qemu(binary: str) -> str:
        asked.append(binary)
        return DEBIAN_12_QEMU

    monkeypatch.setattr("lxd_agent_harness.vm.config.qemu_version", old_qemu)
    args = qemu_args(config, files)
    assert args[args.index("-accel") + 1] == "tcg,thread=single"
    assert asked == [config.machine.qemu_binary]
    kvm = qemu_args(replace(config, accel=Accel.KVM), files)
    assert kvm[kvm.index("-accel") + 1] == "kvm" and asked == [config.machine.qemu_binary]


def test_every_layout_passes_its_hosts_smbios_baseboard_as_lxd_and_incus_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lxd_agent_harness.vm.config.qemu_version", lambda _: BACKPORTS_QEMU)
    config, files = unbooted_config(tmp_path, Accel.TCG)
    passed = {}
    for name in LAYOUTS:
        args = qemu_args(replace(config, layout=get_layout(name)), files)
        passed[name] = [args[i + 1] for i, arg in enumerate(args) if arg == "-smbios"]
    lxd, incus = (
        ["type=2,manufacturer=Canonical Ltd.,product=LXD"],
        ["type=2,manufacturer=LinuxContainers,product=Incus"],
    )
    assert passed == {
        "lxd-5.19": lxd,
        "lxd-5.20": lxd,
        "incus": incus,
        "incus-6": incus,
        "bridged": lxd,
    }
    # A credential is one more SMBIOS string (type 11), after the baseboard.
    with_credential = qemu_args(replace(config, credentials=(("a", "b"),)), files)
    assert [with_credential[i + 1] for i, a in enumerate(with_credential) if a == "-smbios"] == [
        *lxd,
        "type=11,value=io.systemd.credential:a=b",
    ]


def test_a_guest_on_one_tcg_thread_keeps_one_core_busy_whatever_its_vcpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, _ = unbooted_config(tmp_path, Accel.TCG)
    two = replace(config, cpus=2)
    monkeypatch.setattr("lxd_agent_harness.vm.config.qemu_version", lambda _: DEBIAN_12_QEMU)
    assert (host_cores(config), host_cores(two)) == (1, 1)  # QEMU 7.2: thread=single
    monkeypatch.setattr("lxd_agent_harness.vm.config.qemu_version", lambda _: BACKPORTS_QEMU)
    assert (host_cores(config), host_cores(two)) == (1, 2)  # a thread per vCPU
    assert host_cores(replace(two, accel=Accel.KVM)) == 2
