"""The guest's machine: what it boots, its devices, and QEMU's whole command line in one place.

`VmConfig` says what a boot is made of (the layout, the boot path, the accelerator, the seed);
`qemu_args` turns it into QEMU's arguments, top to bottom. Host side only: it runs nothing
(`lxd_agent_harness.vm.instance` does).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.lxd.layouts import Layout
from lxd_agent_harness.lxd.qemu_conf import (
    SPICE_BACKENDS,
    Override,
    Section,
    apply_overrides,
    layout_sections,
    render,
)
from lxd_agent_harness.qemu.migration import incoming_uri
from lxd_agent_harness.qemu.process import qemu_version, version_number
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.arches import GuestMachine, guest_machine
from lxd_agent_harness.vm.firmware import Firmware, firmware_args, machine_arg

CONSOLE_ID = "console"
ARCH_FILE = "arch"
"""In an image's directory: the architecture it was built for (none: amd64, the first one)."""
DEFAULT_MEMORY_MIB = 1024
# Two vCPUs use both host cores under multi-threaded TCG: login in 11 s instead of 22 s.
DEFAULT_CPUS = 2
# Where a person or a CI sets the vCPUs of every guest that is not given its own (the project's
# own tests set 1: two 1-vCPU guests side by side beat two 2-vCPU guests in turn, vm.lock).
VCPUS_ENV = "LXD_AGENT_HARNESS_VCPUS"
# QEMU before 8.1 could translate guest code while another vCPU thread was rewriting it and keep
# the stale translation (fixed by "accel/tcg: Always lock pages before translation"): a Linux
# guest patching a static key through an int3 then dies of "int3" at random (seen once in CI on
# Debian 12's 7.2: a Debian 13 guest, 1.3 s into its boot). Under an older QEMU a guest with more
# than one vCPU runs them on one thread: slower (that guest to STARTED in 31 s instead of 21 s
# under 7.2) but never stale.
MTTCG_FIXED_IN = (8, 1)


def default_cpus() -> int:
    """A guest's vCPUs unless its config says: `$LXD_AGENT_HARNESS_VCPUS`, else `DEFAULT_CPUS`."""
    value = os.environ.get(VCPUS_ENV, "").strip()
    if not value:
        return DEFAULT_CPUS
    if not value.isdigit() or int(value) < 1:
        raise VmError(
            f"{VCPUS_ENV}={value!r} is not a number of vCPUs; set it to 1 or more, or unset it "
            f"for {DEFAULT_CPUS}"
        )
    return int(value)


class Network(str, enum.Enum):
    """The guest's NIC: none, or one on QEMU's user network (DHCP at 10.0.2.15)."""

    NONE = "none"
    ISOLATED = "isolated"  # `restrict=on`: no way out, to the host or beyond; DHCP still answers
    OPEN = "open"  # NAT to the outside (a user's cloud image fetching packages with apt)


# systemd's credential names: no "/", no control characters; the harness keeps to the plain
# ones an Incus config key can carry (`systemd.credential.NAME`).
CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


def credential_arg(name: str, value: str) -> str:
    """QEMU's `-smbios` value for one systemd credential, as Incus passes
    `systemd.credential.NAME=VALUE` (an SMBIOS type 11 string systemd 252+ imports)."""
    if not CREDENTIAL_NAME.fullmatch(name):
        raise VmError(f"credential name {name!r}: use letters, digits and _ . @ - only")
    if "," in value or not value.isprintable():
        raise VmError(
            f"credential {name}: the value {value!r} may hold no comma or control character"
        )
    return f"type=11,value=io.systemd.credential:{name}={value}"


def parse_credential(text: str) -> tuple[str, str]:
    """`NAME=VALUE` (a `--credential` option) as (name, value), checked as QEMU will get it."""
    name, sep, value = text.partition("=")
    if not sep:
        raise VmError(f"credential {text!r}: give NAME=VALUE, e.g. lxd-agent.state=on")
    credential_arg(name, value)
    return name, value


@dataclass(frozen=True)
class GuestImage:
    """A built image: a raw ext4 root filesystem, its kernel and its initrd (`image.rootfs` makes
    and caches them; the VM only boots them)."""

    directory: Path
    disk: Path = field(init=False)
    kernel: Path = field(init=False)
    initrd: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "disk", self.directory / "disk.raw")
        object.__setattr__(self, "kernel", self.directory / "vmlinuz")
        object.__setattr__(self, "initrd", self.directory / "initrd.img")

    def is_complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd))

    @property
    def arch(self) -> Arch:
        try:
            return Arch((self.directory / ARCH_FILE).read_text().strip())
        except FileNotFoundError:
            return Arch.AMD64
        except ValueError as e:
            raise VmError(f"{self.directory / ARCH_FILE} names no architecture ({e})") from None


def kernel_append(arch: Arch) -> str:
    """The kernel command line of a direct boot: the bare ext4 root, the console on the
    architecture's first serial port."""
    return f"root=/dev/vda rw console={guest_machine(arch).console}"


@dataclass(frozen=True)
class DirectBoot:
    """The project's image: QEMU loads its kernel and initrd; the disk is a bare ext4 root."""

    image: GuestImage
    append: str | None = None
    """The kernel command line; None: `kernel_append` for the image's architecture."""


@dataclass(frozen=True)
class FirmwareBoot:
    """A cloud image (ours or a user's), booted through the firmware from its own boot loader."""

    disk: Path
    disk_format: str
    firmware: Firmware = Firmware.UEFI
    secure_boot: bool = False


Boot = Union[DirectBoot, FirmwareBoot]


@dataclass(frozen=True)
class VmConfig:
    layout: Layout
    boot: Boot
    accel: Accel = Accel.TCG
    arch: Arch | None = None
    """The guest's architecture; None: a direct boot's image's, else this host's."""
    ring_size: int | None = None
    """The status rings' size; None: the layout's own (LXD's 16 B, Incus's 16 KiB)."""
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = field(default_factory=default_cpus)
    seed: Path | None = None
    network: Network = Network.NONE
    credentials: tuple[tuple[str, str], ...] = ()
    """systemd credentials for the guest, as (name, value): SMBIOS type 11 strings, the way
    Incus hands a VM its `systemd.credential.*` config keys."""
    raw_qemu_conf: tuple[Override, ...] = ()
    """LXD's `raw.qemu.conf`, parsed (`lxd.qemu_conf.parse_raw_qemu_conf`): applied to the
    layout's configuration sections before QEMU reads them, as LXD applies it at every start."""
    # A second QMP socket for a person (`--keep`), a second host reader (the soak's monitor
    # restart, a host upgraded while the VM runs): the harness's own is taken by the harness.
    user_qmp: bool = False
    allow_reboot: bool = False
    """Let a guest reboot inside the same QEMU (the soak). Otherwise a reboot powers it off,
    so nothing boots again behind the harness's back."""
    overlay: Path | None = None
    """The disk's qcow2 overlay, kept by the caller across QEMUs (a snapshot's disk, a warm
    start's); None: a fresh one in the VM's temporary directory, gone with it."""
    uefi_vars: Path | None = None
    """A UEFI boot's variable store, kept by the caller with `overlay` (a firmware boot's state
    includes what the firmware wrote there); None: a fresh copy in the temporary directory."""
    incoming: Path | None = None
    """A saved state to restore (`-incoming`) instead of booting; it belongs to `overlay` (and,
    through UEFI, to `uefi_vars`)."""

    def disk(self, files: VmFiles) -> Path:
        """The overlay this boot runs on."""
        return self.overlay if self.overlay is not None else files.overlay

    def vars_file(self, files: VmFiles) -> Path:
        """The UEFI variable store this boot runs on."""
        return self.uefi_vars if self.uefi_vars is not None else files.uefi_vars

    @property
    def guest_arch(self) -> Arch:
        if self.arch is not None:
            return self.arch
        if isinstance(self.boot, DirectBoot):
            return self.boot.image.arch
        return host_arch()

    @property
    def machine(self) -> GuestMachine:
        return guest_machine(self.guest_arch)

    @property
    def uses_uefi(self) -> bool:
        """Whether UEFI firmware runs: a firmware boot through UEFI, or a direct boot of an
        architecture without a BIOS (arm64: AAVMF loads the kernel QEMU hands it, and gives the
        guest the ACPI tables its power button needs: the cloud kernel has no gpio-keys)."""
        if isinstance(self.boot, FirmwareBoot):
            return self.boot.firmware is Firmware.UEFI
        return not self.machine.bios

    @property
    def secure_boot(self) -> bool:
        return isinstance(self.boot, FirmwareBoot) and self.boot.secure_boot


@dataclass(frozen=True)
class VmFiles:
    """Where one boot's files go, all inside its temporary directory."""

    workdir: Path

    @property
    def overlay(self) -> Path:
        return self.workdir / "overlay.qcow2"

    @property
    def user_qmp(self) -> Path:
        return self.workdir / "qmp-user.sock"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_conf(self) -> Path:
        """The layout's configuration sections, for `-readconfig` (LXD's `qemu.conf`)."""
        return self.workdir / "qemu.conf"

    @property
    def spice_socket(self) -> Path:
        return self.workdir / "spice.sock"

    @property
    def uefi_vars(self) -> Path:
        return self.workdir / "OVMF_VARS.fd"

    @property
    def sercon(self) -> Path:
        return self.workdir / "seabios-sercon-port"


def qemu_sections(config: VmConfig) -> list[Section]:
    """The layout's configuration sections, with the VM's `raw.qemu.conf` applied."""
    sections = layout_sections(config.layout, config.ring_size)
    return apply_overrides(sections, list(config.raw_qemu_conf))


def qemu_conf_text(config: VmConfig) -> str:
    """What the VM writes to `VmFiles.qemu_conf` for QEMU's `-readconfig`."""
    return render(qemu_sections(config))


def uses_spice(config: VmConfig) -> bool:
    """Whether a SPICE chardev is left in the configuration: QEMU then needs `-spice`."""
    return any(
        section.name.startswith("chardev ") and section.get("backend") in SPICE_BACKENDS
        for section in qemu_sections(config)
    )


def tcg_accel(version_line: str, cpus: int) -> tuple[str, str | None]:
    """`-accel` under TCG for the QEMU whose version line is given, and why, if not the default.

    Multi-threaded TCG (QEMU's default) unless the QEMU predates `MTTCG_FIXED_IN` and the guest
    has more than one vCPU; a QEMU whose version cannot be read keeps the default.
    """
    version = version_number(version_line)
    if cpus < 2 or version is None or version >= MTTCG_FIXED_IN:
        return "tcg", None
    fixed = ".".join(map(str, MTTCG_FIXED_IN))
    return "tcg,thread=single", (
        f"QEMU {version[0]}.{version[1]} is older than {fixed}: its multi-threaded TCG can run a "
        f"stale translation of kernel text a vCPU is patching, so the {cpus} vCPUs share one "
        f"thread (slower; install QEMU {fixed} or later, e.g. from bookworm-backports)"
    )


def config_tcg_accel(config: VmConfig) -> tuple[str, str | None]:
    """`tcg_accel` for the QEMU binary that runs `config` (its version is asked once per run)."""
    return tcg_accel(qemu_version(config.machine.qemu_binary), config.cpus)


def host_cores(config: VmConfig) -> int:
    """How many of this machine's cores the guest can keep busy: one per vCPU, but one in all
    when TCG runs its vCPUs on a single thread (QEMU before 8.1 with more than one vCPU)."""
    if config.accel is Accel.TCG and config_tcg_accel(config)[0].endswith("thread=single"):
        return 1
    return config.cpus


def qemu_args(config: VmConfig, files: VmFiles) -> list[str]:
    """QEMU's whole command line after the binary, top to bottom.

    The harness's own QMP socket is added by `QemuProcess` (it listens before QEMU starts).
    """
    if config.accel is Accel.AUTO:
        raise VmError("qemu_args needs a decided accelerator; call choose_accel() first")
    kvm = config.accel is Accel.KVM
    boot = config.boot
    arch = config.guest_arch
    guest = guest_machine(arch)
    machine = guest.machine
    if isinstance(boot, DirectBoot) and boot.image.arch is not arch:
        raise VmError(
            f"the image {boot.image.directory} is {boot.image.arch.value}, the VM "
            f"{arch.value}; build the image with --arch {arch.value}"
        )
    kept = config.overlay is not None or config.incoming is not None
    if kept and config.uses_uefi and config.uefi_vars is None:
        raise VmError(
            "a kept overlay or a restored state through UEFI needs its variable store "
            "kept too (VmConfig.uefi_vars): the firmware wrote its boot entries there"
        )
    if isinstance(boot, FirmwareBoot):
        machine = machine_arg(boot.firmware, boot.secure_boot, arch)
    args = [
        # Start paused: the console reader and the monitor attach before the first byte.
        "-S",
        "-name", f"lxd-agent-harness-{config.layout.name}",
        "-machine", machine,
        "-accel", "kvm" if kvm else config_tcg_accel(config)[0],
        # Under TCG the model measured fastest for the architecture (vm.arches).
        "-cpu", "host" if kvm else guest.tcg_cpu,
        "-m", str(config.memory_mib),
        "-smp", str(config.cpus),
        "-nodefaults",
        "-display", "none",
        # A powered-off guest stays (paused) so the final ring can still be read; a reboot
        # counts as a power-off unless the caller asked for reboots (see VmConfig).
        "-action", f"shutdown=pause,reboot={'reset' if config.allow_reboot else 'shutdown'}",
    ]  # fmt: skip
    if isinstance(boot, DirectBoot):
        args += [
            "-kernel", str(boot.image.kernel),
            "-initrd", str(boot.image.initrd),
            "-append", boot.append or kernel_append(arch),
        ]  # fmt: skip
        if config.uses_uefi:
            args += firmware_args(
                Firmware.UEFI, False, config.vars_file(files), files.sercon, arch=arch
            )
    else:
        args += firmware_args(
            boot.firmware, boot.secure_boot, config.vars_file(files), files.sercon, arch=arch
        )
    # LXD's template gives every VM a virtio RNG fed from the host's /dev/urandom: guests
    # start with entropy instead of gathering it under a slow emulated CPU.
    args += [
        "-object", "rng-random,id=qemu_rng,filename=/dev/urandom",
        "-device", "virtio-rng-pci,id=dev-qemu_rng,rng=qemu_rng",
    ]  # fmt: skip
    # The overlay takes every write; the base image under it is never opened for writing.
    args += [
        "-drive",
        f"file={config.disk(files)},format=qcow2,if=virtio,cache=unsafe,discard=unmap",
    ]
    if config.seed is not None:
        args += ["-drive", f"file={config.seed},format=raw,if=virtio,readonly=on"]
    if config.network is not Network.NONE:
        restrict = ",restrict=on" if config.network is Network.ISOLATED else ""
        # No option ROM: the BIOS must not try a network boot before it gives up on the disk.
        args += [
            "-netdev", f"user,id=net0{restrict}",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
        ]  # fmt: skip
    # The host's identity, as LXD and Incus pass it to every VM (x86_64 and aarch64; a guest
    # booted straight into its kernel on aarch64 has no firmware to give it SMBIOS tables).
    args += ["-smbios", config.layout.identity.smbios]
    for name, value in config.credentials:
        args += ["-smbios", credential_arg(name, value)]
    # The layout as LXD passes it: configuration sections QEMU reads with -readconfig (written
    # by the VM from `qemu_conf_text`). SPICE itself stays on the command line, right after,
    # where LXD's start puts it (`-readconfig`, then `-spice`, in driver_qemu.go): QEMU 7.2
    # would read a [spice] group too, but LXD's raw.qemu.conf never sees one.
    args += ["-readconfig", str(files.qemu_conf)]
    if uses_spice(config):
        args += ["-spice", f"unix=on,addr={files.spice_socket},disable-ticketing=on"]
    if config.user_qmp:
        args += ["-qmp", f"unix:{files.user_qmp},server=on,wait=off"]
    if config.incoming is not None:
        # The saved devices must match these (QEMU checks the count of serial ports).
        args += ["-incoming", incoming_uri(config.incoming)]
    args += [
        "-chardev", f"pty,id={CONSOLE_ID}",
        "-serial", f"chardev:{CONSOLE_ID}",
    ]  # fmt: skip
    return args
