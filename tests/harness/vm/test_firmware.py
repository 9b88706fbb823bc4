"""Tests for lxd_agent_harness.vm.firmware: OVMF's files and arguments, and the boot's dead ends
(on a console, and in a real boot of a disk with nothing to boot, marked vm)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import cast

import pytest

from lxd_agent_harness.base.errors import BootStuck, VmError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.scenarios.boot import boot_and_check
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import FirmwareBoot, VmConfig
from lxd_agent_harness.vm.console import SerialConsole
from lxd_agent_harness.vm.firmware import (
    DEAD_ENDS,
    KERNEL_START_TIMEOUT,
    NO_KERNEL_IN_TIME,
    Firmware,
    firmware_args,
    fresh_vars,
    machine_arg,
    ovmf_files,
    sercon_file,
    watch_firmware_boot,
)
from tests.helpers import run
from tests.vms import Figures


def test_uefi_maps_ovmf_code_read_only_and_a_per_boot_vars_copy(tmp_path: Path) -> None:
    copy = tmp_path / "OVMF_VARS.fd"
    fresh_vars(False, copy)
    template = ovmf_files(False).vars_template
    assert copy.read_bytes() == template.read_bytes()
    copy.write_bytes(b"written by a guest")  # the template is never what the guest writes
    assert template.read_bytes() != copy.read_bytes()
    args = firmware_args(Firmware.UEFI, False, copy, tmp_path / "unused")
    assert args == [
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive", f"if=pflash,format=raw,unit=1,file={copy}",
    ]  # fmt: skip
    assert machine_arg(Firmware.UEFI, False) == "q35"


def test_secure_boot_takes_the_secboot_build_with_microsofts_keys_on_smm(tmp_path: Path) -> None:
    files = ovmf_files(True)
    assert files.code.name == "OVMF_CODE_4M.secboot.fd"
    assert files.vars_template.name == "OVMF_VARS_4M.ms.fd"
    args = firmware_args(Firmware.UEFI, True, tmp_path / "vars.fd", tmp_path / "unused")
    assert args[:2] == ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    assert f"readonly=on,file={files.code}" in args[3]
    assert machine_arg(Firmware.UEFI, True) == "q35,smm=on"


def test_bios_is_qemus_own_seabios_on_the_serial_console_and_refuses_secure_boot(
    tmp_path: Path,
) -> None:
    sercon = tmp_path / "sercon"
    sercon_file(sercon)
    assert sercon.read_bytes() == b"\xf8\x03"  # COM1's port, as SeaBIOS reads an integer
    args = firmware_args(Firmware.BIOS, False, tmp_path / "unused", sercon)
    assert args == ["-fw_cfg", f"name=etc/sercon-port,file={sercon}"]
    with pytest.raises(VmError, match="secure boot needs UEFI"):
        machine_arg(Firmware.BIOS, True)


def test_missing_ovmf_says_which_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="ovmf package") as caught:
        ovmf_files(False, ovmf_dir=tmp_path)
    assert str(tmp_path / "OVMF_CODE_4M.fd") in str(caught.value)


@pytest.mark.parametrize(
    ("console", "meaning"),
    [
        (b"Press ESC in 5 seconds to skip startup.nsh\r\nShell> ", "shell"),
        (b"BdsDxe: No bootable option or device was found.", "nothing to boot"),
        (b'BdsDxe: failed to load Boot0001 "UEFI Misc Device"\r\n>>Start PXE over IPv4.', "disk"),
        (b"Booting from Hard Disk...\r\nNo bootable device.", "no bootable device"),
        (b"Verification failed: (0x1A) Security Violation", "secure boot refused"),
        (b"error: no such device: 1234.\r\ngrub rescue> ", "GRUB"),
        (b"Gave up waiting for root file system device.\r\n(initramfs) ", "initramfs"),
        (b"Kernel panic - not syncing: VFS: Unable to mount root fs", "panicked"),
    ],
)
def test_each_dead_end_is_recognised_on_the_console(console: bytes, meaning: str) -> None:
    found = [d.meaning for d in DEAD_ENDS if d.pattern.search(console)]
    assert found and meaning in found[0]


def test_a_normal_boot_hits_no_dead_end() -> None:
    console = (
        b'BdsDxe: loading Boot0001 "UEFI Misc Device"\r\n'
        b"Welcome to GRUB!\r\n  Booting `Debian GNU/Linux'\r\n"
        b"[    0.000000] Linux version 6.1.0-56-cloud-amd64\r\n"
        b"Welcome to Debian GNU/Linux 12 (bookworm)!\r\n"
        b"lxd-agent-guest login: root (automatic login)\r\nroot@lxd-agent-guest:~# "
    )
    assert [d.meaning for d in DEAD_ENDS if d.pattern.search(console)] == []


class ConsoleSoFar:
    """What `watch_firmware_boot` reads of a console: its text and the milestones it passed."""

    def __init__(self, text: bytes, milestones: dict[str, float]) -> None:
        self.text = text
        self.milestones = milestones

    def search(self, pattern: re.Pattern[bytes], start: int) -> re.Match[bytes] | None:
        return pattern.search(self.text, start)


@pytest.mark.parametrize(
    ("text", "milestones", "seconds", "dead_end"),
    [
        (b"BdsDxe: No bootable option or device was found.", {}, 5.0, "nothing to boot"),
        (b"BdsDxe: loading Boot0001", {}, KERNEL_START_TIMEOUT + 1, NO_KERNEL_IN_TIME),
        # A dead end after the kernel came still counts.
        (
            b"Gave up waiting for root file system device.\r\n(initramfs) ",
            {"kernel up": 9},
            300,
            "initramfs",
        ),
    ],
    ids=["dead-end", "no-kernel-in-time", "dead-end-after-the-kernel"],
)
def test_the_firmware_boot_watcher_names_the_dead_end(
    text: bytes, milestones: dict[str, float], seconds: float, dead_end: str
) -> None:
    console = cast(SerialConsole, ConsoleSoFar(text, milestones))
    with pytest.raises(BootStuck) as caught:
        asyncio.run(watch_firmware_boot(console, lambda: seconds, "uefi with secure boot"))
    assert dead_end in caught.value.dead_end
    assert "uefi with secure boot" in str(caught.value)


def test_the_firmware_boot_watcher_waits_while_the_boot_goes_on() -> None:
    console = cast(SerialConsole, ConsoleSoFar(b"Welcome to GRUB!", {"kernel up": 9}))

    async def for_a_while() -> bool:
        watcher = asyncio.ensure_future(watch_firmware_boot(console, lambda: 300.0, "bios"))
        done, _ = await asyncio.wait({watcher}, timeout=0.5)
        watcher.cancel()
        return bool(done)

    assert not asyncio.run(for_a_while())


# -- a real boot of a disk with nothing to boot (marked vm) ------------------------------------

SEED_BOOT_TIMEOUT = 420.0
# A bad image must fail well before the boot timeout: the firmware's dead end shows in seconds.
BAD_IMAGE_BOUND = 120.0
TEST_DEADLINE = 600.0


@pytest.mark.vm
@pytest.mark.parametrize("firmware", [Firmware.UEFI, Firmware.BIOS], ids=["uefi", "bios"])
def test_a_disk_with_nothing_to_boot_fails_fast_with_the_firmwares_reason(
    firmware: Firmware,
    tmp_path: Path,
    figures: Figures,
) -> None:
    blank = tmp_path / "blank.raw"
    blank.write_bytes(b"\0" * (4 << 20))
    started = time.monotonic()
    config = VmConfig(get_layout("lxd-5.20"), FirmwareBoot(blank, "raw", firmware), Accel.TCG)
    verdict = run(boot_and_check(config, SEED_BOOT_TIMEOUT, progress=print), TEST_DEADLINE)
    took = time.monotonic() - started
    figures[f"blank disk, {firmware.value}: QEMU start -> failure"] = f"{took:.1f} s"
    error = verdict.error
    assert isinstance(error, BootStuck), error
    assert took < BAD_IMAGE_BOUND, str(error)
    # OVMF says it in one of its ways (its shell, no boot option, a network boot after the
    # disks); SeaBIOS in one.
    firmwares_words = {d.meaning for d in DEAD_ENDS if firmware.value.upper() in d.meaning}
    assert firmwares_words and error.dead_end in firmwares_words, error.dead_end
    assert error.console_tail, "the error carries the console's last lines"
    assert verdict.started is None
