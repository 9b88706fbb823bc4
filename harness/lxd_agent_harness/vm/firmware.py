"""The firmware a disk boots through: UEFI (OVMF, as LXD) or BIOS (SeaBIOS), and its dead ends.

`firmware_args` gives QEMU's firmware arguments for a `FirmwareBoot`: under UEFI, Debian's
`ovmf` code as read-only pflash and a fresh writable copy of the matching variable store per
boot (so one boot's boot entries never leak into the next); with secure boot, the `secboot`
build with Microsoft's keys enrolled (which Debian's shim is signed for) on SMM-protected
pflash. BIOS is QEMU's default SeaBIOS. `DEAD_ENDS` are what the console shows when a boot
cannot go on (a firmware shell, no bootable device, a refused signature, a GRUB or initramfs
prompt); `watch_firmware_boot` raises as soon as the console shows one (or no kernel came in
time), so a bad image fails at once with the reason instead of at the boot timeout.

Host side only. It chooses files and arguments and reads the console; it never starts QEMU
(that is `vm.instance`).
"""

from __future__ import annotations

import asyncio
import enum
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import BootStuck, VmError
from lxd_agent_harness.vm.arches import guest_machine
from lxd_agent_harness.vm.console import SerialConsole

OVMF_DIR = guest_machine(Arch.AMD64).uefi_dir


class Firmware(str, enum.Enum):
    UEFI = "uefi"
    BIOS = "bios"


@dataclass(frozen=True)
class OvmfFiles:
    """An OVMF build: its code (read-only) and the variable store it starts from."""

    code: Path
    vars_template: Path


def ovmf_files(
    secure_boot: bool, ovmf_dir: Path | None = None, arch: Arch = Arch.AMD64
) -> OvmfFiles:
    """Debian's UEFI for `arch`: plain, or secure boot with Microsoft's keys enrolled (`.ms`).

    amd64: the 4 MiB OVMF (`ovmf`); arm64: AAVMF (`qemu-efi-aarch64`). `ovmf_dir` overrides
    where they are looked for (tests).
    """
    machine = guest_machine(arch)
    directory = ovmf_dir or machine.uefi_dir
    if secure_boot:
        files = OvmfFiles(
            directory / machine.uefi_secure_code, directory / machine.uefi_secure_vars
        )
    else:
        files = OvmfFiles(directory / machine.uefi_code, directory / machine.uefi_vars)
    missing = [str(p) for p in (files.code, files.vars_template) if not p.is_file()]
    if missing:
        package = "ovmf" if arch is Arch.AMD64 else "qemu-efi-aarch64"
        bios = " or boot with --firmware bios" if machine.bios else ""
        raise VmError(
            f"looked for UEFI firmware {', '.join(missing)} and found nothing; install Debian's "
            f"{package} package (`make setup`){bios}"
        )
    return files


def machine_arg(firmware: Firmware, secure_boot: bool, arch: Arch = Arch.AMD64) -> str:
    """The machine as LXD uses it for `arch` (q35; virt with gic-version=max). On amd64 secure
    boot's variable store needs SMM to be protected; arm64 boots through UEFI only."""
    if secure_boot and firmware is not Firmware.UEFI:
        raise VmError("secure boot needs UEFI firmware; drop --secure-boot or use --firmware uefi")
    machine = guest_machine(arch)
    if firmware is Firmware.BIOS and not machine.bios:
        raise VmError(f"{arch.value} guests boot through UEFI only; use --firmware uefi")
    if secure_boot and arch is Arch.AMD64:
        return f"{machine.machine},smm=on"
    return machine.machine


def fresh_vars(
    secure_boot: bool, vars_copy: Path, ovmf_dir: Path | None = None, arch: Arch = Arch.AMD64
) -> None:
    """A new writable UEFI variable store for one boot, from the matching template."""
    shutil.copyfile(ovmf_files(secure_boot, ovmf_dir, arch).vars_template, vars_copy)


# SeaBIOS prints to the screen only, and the harness has none: this fw_cfg file (the port, as a
# little-endian integer) makes it mirror its text, "No bootable device" included, on ttyS0.
SERCON_PORT = struct.pack("<H", 0x3F8)


def sercon_file(path: Path) -> None:
    """Write the fw_cfg file that turns on SeaBIOS's serial console."""
    path.write_bytes(SERCON_PORT)


def firmware_args(
    firmware: Firmware,
    secure_boot: bool,
    vars_copy: Path,
    sercon: Path,
    ovmf_dir: Path | None = None,
    arch: Arch = Arch.AMD64,
) -> list[str]:
    """QEMU's firmware arguments, for the files `fresh_vars` (UEFI) or `sercon_file` made."""
    if firmware is Firmware.BIOS:
        return ["-fw_cfg", f"name=etc/sercon-port,file={sercon}"]  # QEMU's own SeaBIOS
    ovmf = ovmf_files(secure_boot, ovmf_dir, arch)
    args = []
    if secure_boot and arch is Arch.AMD64:
        # Only SMM code may write the variables, or the guest could turn secure boot off.
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    args += [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]  # fmt: skip
    return args


@dataclass(frozen=True)
class DeadEnd:
    """A console line after which a boot cannot go on by itself, and what it means."""

    pattern: re.Pattern[bytes]
    meaning: str


DEAD_ENDS = (
    DeadEnd(
        re.compile(rb"Shell> |UEFI Interactive Shell"), "the UEFI firmware dropped to its shell"
    ),
    DeadEnd(
        re.compile(rb"No bootable option or device"), "the UEFI firmware found nothing to boot"
    ),
    # OVMF tries the network only once every disk failed; the harness never netboots.
    DeadEnd(re.compile(rb"Start PXE over IPv4"), "UEFI firmware found no boot loader on a disk"),
    DeadEnd(re.compile(rb"No bootable device"), "BIOS found no bootable device"),
    DeadEnd(
        re.compile(rb"Verification failed|Security Violation|Access Denied"),
        "secure boot refused a boot loader or kernel signature",
    ),
    DeadEnd(re.compile(rb"grub rescue> |\ngrub> "), "GRUB found no configuration or root"),
    DeadEnd(re.compile(rb"\(initramfs\) "), "the initramfs found no root file system"),
    DeadEnd(re.compile(rb"Kernel panic - not syncing"), "the kernel panicked"),
)
"""In the order they are checked; the first found names the failure."""

NO_KERNEL_IN_TIME = "no kernel started in time"
"""`BootStuck.dead_end` when no console line named the dead end."""

# Under TCG on 2 cores, OVMF reaches the kernel in well under a minute; past this bound the
# boot is stuck in the firmware (a network boot attempt, a hang), and waiting on is pointless.
KERNEL_START_TIMEOUT = 180.0


async def watch_firmware_boot(
    console: SerialConsole, seconds: Callable[[], float], firmware: str
) -> NoReturn:
    """Raise `BootStuck` once the console shows a dead end or no kernel came in time.

    `seconds` gives the time since QEMU started; `firmware` names the boot in the message.
    """
    while True:
        for dead_end in DEAD_ENDS:
            if console.search(dead_end.pattern, 0) is not None:
                raise BootStuck(
                    f"{dead_end.meaning} ({firmware}, {seconds():.0f} s after QEMU start); is "
                    "the image a bootable cloud image for it? See the console tail",
                    dead_end=dead_end.meaning,
                )
        if "kernel up" not in console.milestones and seconds() > KERNEL_START_TIMEOUT:
            raise BootStuck(
                f"no kernel started within {KERNEL_START_TIMEOUT:g} s of QEMU start "
                f"({firmware}); the boot is stuck before Linux: see the console",
                dead_end=NO_KERNEL_IN_TIME,
            )
        await asyncio.sleep(0.2)
