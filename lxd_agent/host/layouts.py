"""The QEMU device layouts that LXD and its forks give a VM, as `-chardev`/`-device` arguments.

Each `Layout` names the virtio-serial ports a VM gets and which of them sit on a ring buffer (the
rings the host monitor reads). `Layout.qemu_args` is the one place the arguments are built.
Device ids follow LXD's (`dev-qemu_serial`, bus `dev-qemu_serial.0`). Port names come from
`lxd_agent.protocol`, never retyped here.

Host side only: the guest agent never imports this module. It builds arguments and checks them;
it does not start QEMU (see `lxd_agent.host.qemu`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from lxd_agent.host.errors import LayoutError
from lxd_agent.protocol import DEFAULT_RING_SIZE, INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME

SERIAL_BUS_DEVICE_ID = "dev-qemu_serial"
"""The `virtio-serial-pci` controller's id, as LXD names it."""

SERIAL_BUS = f"{SERIAL_BUS_DEVICE_ID}.0"
"""The bus every port hangs on."""


@dataclass(frozen=True)
class Ring:
    """A ring-buffer chardev and the port it backs: what the monitor reads."""

    port_name: str
    chardev_id: str


@dataclass(frozen=True)
class Port:
    """One `virtserialport`. `chardev_id` is None for a port with no backend (LXD's legacy stub)."""

    name: str
    device_id: str
    chardev_id: str | None


@dataclass(frozen=True)
class Layout:
    """One VM's virtio-serial ports, in the order QEMU gets them."""

    name: str
    description: str
    ports: tuple[Port, ...]

    @property
    def port_names(self) -> tuple[str, ...]:
        return tuple(port.name for port in self.ports)

    @property
    def rings(self) -> tuple[Ring, ...]:
        """The ports that have a ring buffer behind them, with that ring's chardev id."""
        return tuple(
            Ring(port_name=port.name, chardev_id=port.chardev_id)
            for port in self.ports
            if port.chardev_id is not None
        )

    def ring_for(self, port_name: str) -> Ring:
        """The ring behind `port_name`; a `LayoutError` if that port has none in this layout."""
        for ring in self.rings:
            if ring.port_name == port_name:
                return ring
        raise LayoutError(
            f"layout {self.name!r} has no ring buffer on port {port_name!r}; "
            f"its rings are on: {', '.join(r.port_name for r in self.rings)}"
        )

    def qemu_args(self, ring_size: int = DEFAULT_RING_SIZE) -> list[str]:
        """The `-chardev`/`-device` arguments for this layout, each ring `ring_size` bytes."""
        check_ring_size(ring_size)
        args = ["-device", f"virtio-serial-pci,id={SERIAL_BUS_DEVICE_ID}"]
        for ring in self.rings:
            args += ["-chardev", f"ringbuf,id={ring.chardev_id},size={ring_size}"]
        for port in self.ports:
            backend = f",chardev={port.chardev_id}" if port.chardev_id is not None else ""
            args += [
                "-device",
                f"virtserialport,id={port.device_id},name={port.name}{backend},bus={SERIAL_BUS}",
            ]
        return args


def check_ring_size(ring_size: int) -> None:
    """Reject what QEMU would refuse (`size of ringbuf chardev must be power of two`), earlier."""
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


# The ring on the port a layout's host reads is `qemu_serial`, as LXD names it; a second ring
# (bridged) or a chardev-less stub gets the `_legacy` suffix.
_MAIN = "qemu_serial"
_LEGACY = "qemu_serial_legacy"


def _ring_port(name: str, device_id: str) -> Port:
    return Port(name=name, device_id=device_id, chardev_id=f"{device_id}-chardev")


def _stub_port(name: str, device_id: str) -> Port:
    return Port(name=name, device_id=device_id, chardev_id=None)


LXD_5_19 = Layout(
    name="lxd-5.19",
    description=f"LXD <= 5.19: one ring buffer on {LEGACY_PORT_NAME}",
    ports=(_ring_port(LEGACY_PORT_NAME, _MAIN),),
)

LXD_5_20 = Layout(
    name="lxd-5.20",
    description=f"LXD >= 5.20: ring buffer on {PORT_NAME}, {LEGACY_PORT_NAME} with no chardev",
    ports=(_ring_port(PORT_NAME, _MAIN), _stub_port(LEGACY_PORT_NAME, _LEGACY)),
)

INCUS = Layout(
    name="incus",
    description=f"Incus: ring buffer on {INCUS_PORT_NAME}, {LEGACY_PORT_NAME} with no chardev",
    ports=(_ring_port(INCUS_PORT_NAME, _MAIN), _stub_port(LEGACY_PORT_NAME, _LEGACY)),
)

BRIDGED = Layout(
    name="bridged",
    description=f"both LXD names on their own ring buffers: {PORT_NAME} and {LEGACY_PORT_NAME}",
    ports=(_ring_port(PORT_NAME, _MAIN), _ring_port(LEGACY_PORT_NAME, _LEGACY)),
)

LAYOUTS: Mapping[str, Layout] = {
    layout.name: layout for layout in (LXD_5_19, LXD_5_20, INCUS, BRIDGED)
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
