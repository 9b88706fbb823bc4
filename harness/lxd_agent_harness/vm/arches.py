"""What a guest of each architecture boots on: QEMU's binary, machine and CPU, its serial console.

LXD's own choices where QEMU under TCG allows them (facts §9): `q35` on amd64, `virt` with
`gic-version=max` on arm64, where the firmware is UEFI only (AAVMF). Under TCG the CPU model is
the one measured fastest here for a Debian guest (README, "Architectures"); under KVM, `host`, as
LXD. Host side only: it names things, `vm.config` builds the command line from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxd_agent_harness.base.arch import Arch


@dataclass(frozen=True)
class GuestMachine:
    arch: Arch
    qemu_binary: str
    machine: str
    """QEMU's `-machine` for a boot without secure boot."""
    tcg_cpu: str
    console: str
    """The guest's name for its first serial port (the harness's console)."""
    bios: bool
    """Whether it boots through a BIOS too (SeaBIOS), not only UEFI."""
    uefi_dir: Path
    uefi_code: str
    uefi_vars: str
    uefi_secure_code: str
    uefi_secure_vars: str
    """Debian's firmware files: OVMF (`ovmf`) on amd64, AAVMF (`qemu-efi-aarch64`) on arm64."""


MACHINES = {
    Arch.AMD64: GuestMachine(
        arch=Arch.AMD64,
        qemu_binary="qemu-system-x86_64",
        machine="q35",
        # The plain default model boots faster than `max` under TCG (fewer features to emulate).
        tcg_cpu="qemu64",
        console="ttyS0",
        bios=True,
        uefi_dir=Path("/usr/share/OVMF"),
        uefi_code="OVMF_CODE_4M.fd",
        uefi_vars="OVMF_VARS_4M.fd",
        uefi_secure_code="OVMF_CODE_4M.secboot.fd",
        uefi_secure_vars="OVMF_VARS_4M.ms.fd",
    ),
    Arch.ARM64: GuestMachine(
        arch=Arch.ARM64,
        qemu_binary="qemu-system-aarch64",
        machine="virt,gic-version=max",
        # Measured here (Debian 12's cloud kernel, 2 vCPUs, QEMU start -> STARTED): `max` 47.2 s
        # (its architected pointer authentication is costly to emulate), cortex-a57 21.8 s,
        # cortex-a53 19.8 s, `max` with QEMU's cheap IMPDEF pauth algorithm 17.7 s.
        tcg_cpu="max,pauth-impdef=on",
        console="ttyAMA0",
        bios=False,
        uefi_dir=Path("/usr/share/AAVMF"),
        uefi_code="AAVMF_CODE.fd",
        uefi_vars="AAVMF_VARS.fd",
        uefi_secure_code="AAVMF_CODE.ms.fd",
        uefi_secure_vars="AAVMF_VARS.ms.fd",
    ),
}


def guest_machine(arch: Arch) -> GuestMachine:
    return MACHINES[arch]
