"""The QEMU device layouts that LXD and its forks give a VM, as `-chardev`/`-device` arguments.

Each `Layout` names the virtio-serial ports a VM gets, in LXD's order, and the chardev behind
each: a ring buffer (the rings the host monitor reads, each with the reading rule of the host
that made it), one of SPICE's two chardevs, or none (LXD's legacy stub). `Layout.qemu_args` is
the one place the arguments are built. Device and chardev ids follow LXD's template
(`dev-qemu_serial`, `qemu_serial-chardev`, `qemu_spice`, `qemu_spicedir`, ...). Our port names
come from `lxd_agent.protocol`, never retyped here.

Host side only: the guest agent never imports this module. It builds arguments and checks them;
it does not start QEMU (see `lxd_agent_harness.qemu.process`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from lxd_agent.protocol import (
    CANDIDATE_PORT_NAMES,
    DEFAULT_RING_SIZE,
    INCUS_PORT_NAME,
    LEGACY_PORT_NAME,
    PORT_NAME,
)
from lxd_agent_harness.base.errors import LayoutError

SERIAL_BUS_DEVICE_ID = "dev-qemu_serial"
"""The `virtio-serial-pci` controller's id, as LXD names it."""

SERIAL_BUS = f"{SERIAL_BUS_DEVICE_ID}.0"
"""The bus every port hangs on."""

INCUS_RING_SIZE = 16384
"""Incus (since v7.3) gives its status ring 16 KiB: room for a JSON state line. Before 7.3 it
was LXD's 16 B (Debian 13's Incus 6.0 among them)."""

MIN_RING_SIZE = DEFAULT_RING_SIZE
"""The smallest ring the harness runs: LXD's own 16 B. A ring under 8 B can never hold
`STARTED\n`, and one under 16 B loses the status line to any byte written after it."""

MAX_RING_SIZE = 1 << 20
"""The largest ring the harness runs: 1 MiB, 64 times Incus's. The monitor reads a ring whole
on every read (a full 1 MiB ring: 0.25 s here; 16 MiB: past the monitor's 10 s bound), and
QEMU silently shrinks sizes it cannot hold (2^40 boots with far less)."""

# SPICE's own port names: the vdagent's channel and the shared-folder (webdav) port.
SPICE_AGENT_PORT_NAME = "com.redhat.spice.0"
SPICE_WEBDAV_PORT_NAME = "org.spice-space.webdav.0"


class ReadingRule(str, enum.Enum):
    """How a host takes the status line from a ring read (`monitor.interpret_ring_read`)."""

    LXD = "lxd"  # the last complete line (LXD; Incus before 7.3)
    INCUS = "incus"  # Incus 7.3's: with more than one line, the line before last is read as a
    # JSON state and the status is the one before it (`lxd.reading_rules`)


class Backend(str, enum.Enum):
    """The QEMU chardev backends a layout's ports sit on."""

    RINGBUF = "ringbuf"
    SPICEVMC = "spicevmc"
    SPICEPORT = "spiceport"


@dataclass(frozen=True)
class Chardev:
    """A `-chardev`: its id, its backend, and the SPICE channel or port name for SPICE ones."""

    id: str
    backend: Backend
    name: str | None = None

    def arg(self, ring_size: int) -> str:
        if self.backend is Backend.RINGBUF:
            return f"ringbuf,id={self.id},size={ring_size}"
        return f"{self.backend.value},id={self.id},name={self.name}"


@dataclass(frozen=True)
class Ring:
    """A ring-buffer chardev and the port it backs: what the monitor reads, and by which rule."""

    port_name: str
    chardev_id: str
    rule: ReadingRule = ReadingRule.LXD


@dataclass(frozen=True)
class Port:
    """One `virtserialport`. `chardev` is None for a port with no backend (LXD's legacy stub)."""

    name: str
    device_id: str
    chardev: Chardev | None

    @property
    def chardev_id(self) -> str | None:
        return self.chardev.id if self.chardev is not None else None


@dataclass(frozen=True)
class Identity:
    """Who the host says it is: the SMBIOS type 2 (baseboard) strings it passes QEMU, which a
    guest reads as `/sys/class/dmi/id/board_vendor` and `board_name` (LXD's 2026 agent
    generator starts its agent on `board_name == LXD`)."""

    manufacturer: str
    product: str

    @property
    def smbios(self) -> str:
        """QEMU's `-smbios` value, as the host passes it."""
        return f"type=2,manufacturer={self.manufacturer},product={self.product}"


# Read in the daemons' own binaries (`driver_qemu.go`'s string): Debian's LXD 5.0.2, our rename
# build of it, and Incus 6.0.4 (bookworm-backports); facts §14 for LXD >= 5.20.
LXD_IDENTITY = Identity("Canonical Ltd.", "LXD")
INCUS_IDENTITY = Identity("LinuxContainers", "Incus")


@dataclass(frozen=True)
class Layout:
    """One VM's virtio-serial ports, in the order QEMU gets them, and how its host reads them."""

    name: str
    description: str
    ports: tuple[Port, ...]
    ring_size: int = DEFAULT_RING_SIZE
    """The ring size this host gives its status ring (a boot may override it)."""
    rule: ReadingRule = ReadingRule.LXD
    identity: Identity = LXD_IDENTITY
    """The SMBIOS baseboard this host passes every VM."""

    @property
    def port_names(self) -> tuple[str, ...]:
        return tuple(port.name for port in self.ports)

    @property
    def rings(self) -> tuple[Ring, ...]:
        """The ports that have a ring buffer behind them, with that ring's chardev id."""
        return tuple(
            Ring(port_name=port.name, chardev_id=port.chardev.id, rule=self.rule)
            for port in self.ports
            if port.chardev is not None and port.chardev.backend is Backend.RINGBUF
        )

    @property
    def uses_spice(self) -> bool:
        """Whether a port sits on a SPICE chardev: QEMU then needs `-spice` configured."""
        return any(
            port.chardev is not None and port.chardev.backend is not Backend.RINGBUF
            for port in self.ports
        )

    def port_named(self, device_id: str) -> str | None:
        """The name of the port whose device id is `device_id` (QMP events name devices)."""
        return next((port.name for port in self.ports if port.device_id == device_id), None)

    def ring_for(self, port_name: str) -> Ring:
        """The ring behind `port_name`; a `LayoutError` if that port has none in this layout."""
        for ring in self.rings:
            if ring.port_name == port_name:
                return ring
        raise LayoutError(
            f"layout {self.name!r} has no ring buffer on port {port_name!r}; "
            f"its rings are on: {', '.join(r.port_name for r in self.rings)}"
        )

    def qemu_args(
        self, ring_size: int | None = None, spice_socket: Path | None = None
    ) -> list[str]:
        """The `-chardev`/`-device` arguments, in LXD's order, each chardev before its port:
        the same devices as `lxd.qemu_conf.layout_sections` on the command line. A VM gets the
        sections (`-readconfig`, as LXD starts QEMU); the tests of QEMU's own behaviour on a
        bare machine (rings, migration) start QEMU with these.

        Rings are `ring_size` bytes (default: this layout's). A layout with SPICE ports needs
        `spice_socket`, the unix socket QEMU serves SPICE on, as LXD does: Debian's QEMU
        refuses a `spiceport` chardev while SPICE is not configured.
        """
        size = self.ring_size if ring_size is None else ring_size
        check_ring_size(size)
        if self.uses_spice and spice_socket is None:
            raise LayoutError(
                f"layout {self.name!r} has SPICE ports and needs a SPICE socket; "
                "pass spice_socket (a path in the VM's temporary directory)"
            )
        args = ["-device", f"virtio-serial-pci,id={SERIAL_BUS_DEVICE_ID}"]
        for port in self.ports:
            backend = ""
            if port.chardev is not None:
                args += ["-chardev", port.chardev.arg(size)]
                backend = f",chardev={port.chardev.id}"
            args += [
                "-device",
                f"virtserialport,id={port.device_id},name={port.name}{backend},bus={SERIAL_BUS}",
            ]
        if self.uses_spice:
            args += ["-spice", f"unix=on,addr={spice_socket},disable-ticketing=on"]
        return args


def check_ring_size(ring_size: int) -> None:
    """Reject, before QEMU runs, what QEMU would refuse (`size of ringbuf chardev must be power
    of two`) and what could not work: under `MIN_RING_SIZE` or over `MAX_RING_SIZE`."""
    # bool is an int subclass: `True` would pass as a size of 1 without this check.
    if isinstance(ring_size, bool) or not isinstance(ring_size, int):
        raise LayoutError(
            f"ring size {ring_size!r} is not an integer; give a power of two such as "
            f"{DEFAULT_RING_SIZE} (LXD's) or 16384 (Incus's)"
        )
    if ring_size <= 0 or ring_size & (ring_size - 1):
        raise LayoutError(
            f"ring size {ring_size} is not a positive power of two, which QEMU requires; "
            f"give one such as {DEFAULT_RING_SIZE} (LXD's) or 16384 (Incus's)"
        )
    if not MIN_RING_SIZE <= ring_size <= MAX_RING_SIZE:
        raise LayoutError(
            f"ring size {ring_size} is outside {MIN_RING_SIZE}..{MAX_RING_SIZE} bytes: "
            f"under {MIN_RING_SIZE} (LXD's) a status line does not survive, over "
            f"{MAX_RING_SIZE} each read is too slow and QEMU may shrink it; give e.g. "
            f"{DEFAULT_RING_SIZE} or 16384"
        )


# The ring on the port a layout's host reads is `qemu_serial`, as LXD names it; a second ring
# (bridged) or a chardev-less stub gets the `_legacy` suffix.
_MAIN = "qemu_serial"
_LEGACY = "qemu_serial_legacy"


def _ring_port(name: str, device_id: str) -> Port:
    return Port(name, device_id, Chardev(f"{device_id}-chardev", Backend.RINGBUF))


def _stub_port(name: str, device_id: str) -> Port:
    return Port(name, device_id, None)


# LXD's template ends the bus with these two, always (Incus: when SPICE is on).
SPICE_PORTS = (
    Port(
        SPICE_AGENT_PORT_NAME,
        "qemu_spice",
        Chardev("qemu_spice-chardev", Backend.SPICEVMC, "vdagent"),
    ),
    Port(
        SPICE_WEBDAV_PORT_NAME,
        "qemu_spicedir",
        Chardev("qemu_spicedir-chardev", Backend.SPICEPORT, SPICE_WEBDAV_PORT_NAME),
    ),
)

LXD_5_19 = Layout(
    name="lxd-5.19",
    description=f"LXD <= 5.19: one ring buffer on {LEGACY_PORT_NAME}, two SPICE ports",
    ports=(_ring_port(LEGACY_PORT_NAME, _MAIN), *SPICE_PORTS),
)

LXD_5_20 = Layout(
    name="lxd-5.20",
    description=f"LXD >= 5.20: ring buffer on {PORT_NAME}, {LEGACY_PORT_NAME} with no chardev, "
    "two SPICE ports",
    ports=(_ring_port(PORT_NAME, _MAIN), _stub_port(LEGACY_PORT_NAME, _LEGACY), *SPICE_PORTS),
)

INCUS = Layout(
    name="incus",
    description=f"Incus >= 7.3: 16 KiB ring buffer on {INCUS_PORT_NAME} read by 7.3's rule "
    f"(a JSON state line), {LEGACY_PORT_NAME} with no chardev, two SPICE ports",
    ports=(
        _ring_port(INCUS_PORT_NAME, _MAIN),
        _stub_port(LEGACY_PORT_NAME, _LEGACY),
        *SPICE_PORTS,
    ),
    ring_size=INCUS_RING_SIZE,
    rule=ReadingRule.INCUS,
    identity=INCUS_IDENTITY,
)

INCUS_6 = Layout(
    name="incus-6",
    description=f"Incus < 7.3 (Debian 13's 6.0): 16 B ring buffer on {INCUS_PORT_NAME} read by "
    f"LXD's rule, {LEGACY_PORT_NAME} with no chardev, two SPICE ports",
    ports=INCUS.ports,
    identity=INCUS_IDENTITY,
)

BRIDGED = Layout(
    name="bridged",
    description=f"both LXD names on their own ring buffers: {PORT_NAME} and {LEGACY_PORT_NAME}, "
    "two SPICE ports",
    ports=(_ring_port(PORT_NAME, _MAIN), _ring_port(LEGACY_PORT_NAME, _LEGACY), *SPICE_PORTS),
)

LAYOUTS: Mapping[str, Layout] = {
    layout.name: layout for layout in (LXD_5_19, LXD_5_20, INCUS, INCUS_6, BRIDGED)
}
"""Every layout by name, in the order a help text should list them."""


def get_layout(name: str) -> Layout:
    """The layout called `name`; a `LayoutError` naming the valid ones otherwise."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown layout {name!r}; choose one of: {', '.join(LAYOUTS)}") from None


def describe_layouts() -> dict[str, str]:
    """Name to one-line description, for `--help` texts."""
    return {name: layout.description for name, layout in LAYOUTS.items()}


def lxd_ring_port(layout: Layout) -> str | None:
    """The port whose ring the agent should report on: the first of the names it tries
    (`CANDIDATE_PORT_NAMES`: LXD's new, LXD's old, Incus's) with a ring; None without one."""
    ringed = {ring.port_name for ring in layout.rings}
    return next((name for name in CANDIDATE_PORT_NAMES if name in ringed), None)
