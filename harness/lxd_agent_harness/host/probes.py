"""What this machine lacks that a daemon's VMs need, found by probes; each way around it named.

A daemon is started as it comes (its own binaries, its own configuration), and changed only
where a probe shows a limit of this machine (facts §13), so that on a host with working KVM and
`vhost_vsock` nothing is adapted at all. Each adaptation carries its name and the probe's
finding; the verdict reports them (`host.adaptations`). Host side only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VHOST_VSOCK_MODULE = Path("/sys/module/vhost_vsock")
VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")


@dataclass(frozen=True)
class Adaptation:
    """One way around a limit of this machine: `name` (stable, for JSON) and `reason`."""

    name: str
    reason: str


def vsock_module_missing(module: Path = VHOST_VSOCK_MODULE) -> Adaptation | None:
    """Both daemons refuse VMs unless `vhost_vsock` is loaded, or `modprobe -b` loads it."""
    if module.exists():
        return None
    modprobe = shutil.which("modprobe")
    if modprobe is not None:
        done = subprocess.run(
            [modprobe, "-n", "-q", "vhost_vsock"], capture_output=True, check=False
        )
        if done.returncode == 0:
            return None
        why = "modprobe cannot load it"
    else:
        why = "and there is no modprobe"
    return Adaptation(
        "modprobe-stub",
        f"{module} is missing {why}: a modprobe that succeeds goes first on the daemon's "
        "PATH (the status ring does not use vsock)",
    )


def vsock_device_missing(device: Path = VHOST_VSOCK_DEVICE) -> Adaptation | None:
    """QEMU's `vhost-vsock-pci` needs the host's vsock device."""
    if device.exists():
        return None
    return Adaptation(
        "no-vsock-device",
        f'{device} is missing: the VM\'s raw.qemu.conf removes its [device "qemu_vsock"] '
        "(the daemon then cannot reach an agent over vsock: `exec` fails)",
    )


def vsock_host_missing(device: Path = VHOST_VSOCK_DEVICE) -> Adaptation | None:
    """Incus listens on vsock as the host and opens the vsock device for each VM."""
    if device.exists():
        return None
    return Adaptation(
        "vsock-stand-in",
        f"{device} is missing (this machine is itself a VM): the daemon runs under a seccomp "
        "supervisor that answers its vsock bind and listen with success, gives it /dev/null "
        "for the device and succeeds its guest-CID ioctl (host.launcher)",
    )


def memlock_fixed() -> Adaptation | None:
    """LXD 5.0 starts QEMU through `forklimits`, which raises RLIMIT_MEMLOCK to unlimited."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource as r; r.setrlimit(r.RLIMIT_MEMLOCK, (r.RLIM_INFINITY,) * 2)",
        ],
        capture_output=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    return Adaptation(
        "memlock-noop",
        "raising RLIMIT_MEMLOCK to unlimited is refused here (no CAP_SYS_RESOURCE): the daemon "
        "runs under a seccomp filter that makes that call succeed and change nothing",
    )


def qemu_major(qemu: str = "qemu-system-x86_64") -> int | None:
    """The major version of the QEMU on PATH, or None when there is none."""
    path = shutil.which(qemu)
    if path is None:
        return None
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"version (\d+)\.", done.stdout)
    return int(found[1]) if found else None


LXD_LAST_QEMU_MAJOR: dict[tuple[int, ...], int] = {(5, 0): 8}
"""The newest QEMU major each LXD series drives (5.0.2: `-runas` and its `add-fd` flags; facts
§13). A series not named here is taken to drive the host's QEMU."""


def qemu_too_new(daemon_version: tuple[int, ...], major: int | None) -> Adaptation | None:
    """Whether LXD `daemon_version` needs an older QEMU than the host's (`major`)."""
    last = LXD_LAST_QEMU_MAJOR.get(tuple(daemon_version[:2]))
    if last is None or major is None or major <= last:
        return None
    return Adaptation(
        "qemu-7.2",
        f"LXD {'.'.join(map(str, daemon_version))} drives QEMU up to {last}.x and this host "
        f"has QEMU {major}: Debian 12's QEMU 7.2 is unpacked into the cache and goes first "
        "on the daemon's PATH",
    )


def tcg(reason: str) -> Adaptation:
    """KVM cannot run guests here (the harness's own probe): the VM is told to use TCG."""
    return Adaptation(
        "tcg",
        f'{reason}: the VM\'s raw.qemu.conf sets [machine] accel = "tcg", its raw.qemu '
        "`-cpu max` (the daemon asks for `-cpu host`, which needs KVM) and one vCPU",
    )


def is_root() -> bool:
    return os.geteuid() == 0
