"""The guests' CPU architectures: amd64 (x86_64) and arm64 (aarch64), by their Debian names.

LXD and Incus run VMs of both (facts §9: machine `q35` on x86_64, `virt` on aarch64). This module
names them and tells the host's own; what each needs (QEMU's binary, machine, firmware, kernel
package) belongs to the layer that uses it (`vm.machines`, `image.rootfs`). Host side only.
"""

from __future__ import annotations

import enum
import platform

from lxd_agent_harness.base.errors import HarnessError


class Arch(str, enum.Enum):
    """A guest architecture, by its Debian name (what apt and mmdebstrap call it)."""

    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def kernel_name(self) -> str:
        """What `uname -m` says on it (and QEMU's binary suffix)."""
        return {Arch.AMD64: "x86_64", Arch.ARM64: "aarch64"}[self]


class ArchError(HarnessError):
    """An architecture the harness does not build or boot, or cannot on this host."""


def host_arch(machine: str | None = None) -> Arch:
    """This host's architecture (`machine`: `uname -m`'s answer, for tests)."""
    name = machine if machine is not None else platform.machine()
    for arch in Arch:
        if arch.kernel_name == name:
            return arch
    raise ArchError(
        f"this host is {name}; the harness builds and boots {', '.join(a.value for a in Arch)} "
        "guests and runs on an amd64 or arm64 host"
    )
