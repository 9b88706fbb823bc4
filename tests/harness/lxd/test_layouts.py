"""Tests for lxd_agent_harness.lxd.layouts: the arguments each layout gives QEMU, and QEMU's
verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME
from lxd_agent_harness.base.errors import LayoutError, QemuError
from lxd_agent_harness.lxd.layouts import (
    BRIDGED,
    INCUS,
    LAYOUTS,
    LXD_5_19,
    LXD_5_20,
    SPICE_AGENT_PORT_NAME,
    SPICE_WEBDAV_PORT_NAME,
    Layout,
    ReadingRule,
    Ring,
    check_ring_size,
    describe_layouts,
    get_layout,
    lxd_ring_port,
)
from lxd_agent_harness.qemu.process import QemuProcess
from tests.helpers import MACHINE_NONE, MACHINE_PAUSED, run

BUS = ["-device", "virtio-serial-pci,id=dev-qemu_serial"]
SOCKET = Path("/tmp/vm/spice.sock")
# LXD's template ends every bus with these, in this order (driver_qemu_templates.go, qemuSerial).
SPICE = [
    "-chardev", "spicevmc,id=qemu_spice-chardev,name=vdagent",
    "-device", "virtserialport,id=qemu_spice,name=com.redhat.spice.0,"
    "chardev=qemu_spice-chardev,bus=dev-qemu_serial.0",
    "-chardev", "spiceport,id=qemu_spicedir-chardev,name=org.spice-space.webdav.0",
    "-device", "virtserialport,id=qemu_spicedir,name=org.spice-space.webdav.0,"
    "chardev=qemu_spicedir-chardev,bus=dev-qemu_serial.0",
    "-spice", f"unix=on,addr={SOCKET},disable-ticketing=on",
]  # fmt: skip


def test_layout_names_are_the_five_known_ones() -> None:
    assert list(LAYOUTS) == ["lxd-5.19", "lxd-5.20", "incus", "incus-6", "bridged"]
    assert all(LAYOUTS[name].name == name for name in LAYOUTS)
    assert set(describe_layouts()) == set(LAYOUTS)
    assert all(describe_layouts().values())


def test_lxd_5_19_has_one_ring_on_the_legacy_name_then_the_spice_ports() -> None:
    assert LXD_5_19.qemu_args(spice_socket=SOCKET) == [
        *BUS,
        "-chardev", "ringbuf,id=qemu_serial-chardev,size=16",
        "-device", f"virtserialport,id=qemu_serial,name={LEGACY_PORT_NAME},"
        "chardev=qemu_serial-chardev,bus=dev-qemu_serial.0",
        *SPICE,
    ]  # fmt: skip
    assert LXD_5_19.rings == (Ring(LEGACY_PORT_NAME, "qemu_serial-chardev"),)
    # Three ports on an LXD 5.19 VM: the count a saved state must match (facts §5).
    assert LXD_5_19.port_names == (LEGACY_PORT_NAME, SPICE_AGENT_PORT_NAME, SPICE_WEBDAV_PORT_NAME)


def test_lxd_5_20_rings_the_new_name_and_leaves_the_legacy_port_without_chardev() -> None:
    assert LXD_5_20.qemu_args(spice_socket=SOCKET) == [
        *BUS,
        "-chardev", "ringbuf,id=qemu_serial-chardev,size=16",
        "-device", f"virtserialport,id=qemu_serial,name={PORT_NAME},"
        "chardev=qemu_serial-chardev,bus=dev-qemu_serial.0",
        "-device", f"virtserialport,id=qemu_serial_legacy,name={LEGACY_PORT_NAME},"
        "bus=dev-qemu_serial.0",
        *SPICE,
    ]  # fmt: skip
    assert LXD_5_20.rings == (Ring(PORT_NAME, "qemu_serial-chardev"),)
    # Four ports on an LXD 5.20 VM.
    assert LXD_5_20.port_names == (
        PORT_NAME,
        LEGACY_PORT_NAME,
        SPICE_AGENT_PORT_NAME,
        SPICE_WEBDAV_PORT_NAME,
    )


def test_incus_rings_its_own_name_with_16_kib_and_reads_by_incus_rule() -> None:
    assert INCUS.qemu_args(spice_socket=SOCKET) == [
        *BUS,
        "-chardev", "ringbuf,id=qemu_serial-chardev,size=16384",
        "-device", f"virtserialport,id=qemu_serial,name={INCUS_PORT_NAME},"
        "chardev=qemu_serial-chardev,bus=dev-qemu_serial.0",
        "-device", f"virtserialport,id=qemu_serial_legacy,name={LEGACY_PORT_NAME},"
        "bus=dev-qemu_serial.0",
        *SPICE,
    ]  # fmt: skip
    assert INCUS.rings == (Ring(INCUS_PORT_NAME, "qemu_serial-chardev", ReadingRule.INCUS),)
    assert INCUS.ring_size == 16384
    # Before 7.3: the same ports, LXD's 16 B ring and LXD's rule.
    old = get_layout("incus-6")
    assert old.ports == INCUS.ports and (old.ring_size, old.rule) == (16, ReadingRule.LXD)


def test_bridged_gives_each_lxd_name_its_own_ring() -> None:
    assert BRIDGED.qemu_args(spice_socket=SOCKET) == [
        *BUS,
        "-chardev", "ringbuf,id=qemu_serial-chardev,size=16",
        "-device", f"virtserialport,id=qemu_serial,name={PORT_NAME},"
        "chardev=qemu_serial-chardev,bus=dev-qemu_serial.0",
        "-chardev", "ringbuf,id=qemu_serial_legacy-chardev,size=16",
        "-device", f"virtserialport,id=qemu_serial_legacy,name={LEGACY_PORT_NAME},"
        "chardev=qemu_serial_legacy-chardev,bus=dev-qemu_serial.0",
        *SPICE,
    ]  # fmt: skip
    assert BRIDGED.rings == (
        Ring(PORT_NAME, "qemu_serial-chardev"),
        Ring(LEGACY_PORT_NAME, "qemu_serial_legacy-chardev"),
    )


@pytest.mark.parametrize("layout", [LXD_5_19, LXD_5_20, BRIDGED], ids=["5.19", "5.20", "bridged"])
def test_lxd_layouts_read_by_lxd_rule(layout: Layout) -> None:
    assert layout.rule is ReadingRule.LXD
    assert all(ring.rule is ReadingRule.LXD for ring in layout.rings)


def test_a_layout_with_spice_ports_refuses_to_build_without_a_socket() -> None:
    with pytest.raises(LayoutError, match="SPICE socket"):
        LXD_5_20.qemu_args()


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_ring_size_reaches_every_ring_chardev(layout: Layout) -> None:
    args = layout.qemu_args(ring_size=64, spice_socket=SOCKET)
    chardevs = [arg for arg in args if arg.startswith("ringbuf,")]
    assert len(chardevs) == len(layout.rings) >= 1
    assert all(arg.endswith(",size=64") for arg in chardevs)
    assert f"size={layout.ring_size}" in layout.qemu_args(spice_socket=SOCKET)[3]


@pytest.mark.parametrize("size", [0, -16, 3, 15, 24, 1000, True, 16.0, "16"])
def test_ring_size_that_qemu_would_refuse_is_rejected_first(size: Any) -> None:
    with pytest.raises(LayoutError, match="power of two"):
        LXD_5_20.qemu_args(ring_size=size, spice_socket=SOCKET)


@pytest.mark.parametrize("size", [16, 4096, 16384, 1 << 20])
def test_ring_size_power_of_two_is_accepted(size: int) -> None:
    check_ring_size(size)


@pytest.mark.parametrize("size", [1, 2, 4, 8, 2 << 20, 1 << 40])
def test_ring_size_too_small_for_a_status_line_or_too_big_to_read_is_rejected(size: int) -> None:
    with pytest.raises(LayoutError, match=r"outside 16\.\.1048576 bytes"):
        check_ring_size(size)


def test_unknown_layout_error_lists_the_valid_names() -> None:
    with pytest.raises(LayoutError) as caught:
        get_layout("lxd-6.0")
    assert "'lxd-6.0'" in str(caught.value)
    for name in LAYOUTS:
        assert name in str(caught.value)
    assert get_layout("incus") is INCUS


def test_ring_for_finds_the_ring_behind_a_port_and_refuses_a_stub() -> None:
    assert LXD_5_20.ring_for(PORT_NAME).chardev_id == "qemu_serial-chardev"
    with pytest.raises(LayoutError, match="no ring buffer on port"):
        LXD_5_20.ring_for(LEGACY_PORT_NAME)


def test_the_agent_is_expected_on_the_first_name_it_tries_that_has_a_ring() -> None:
    assert lxd_ring_port(get_layout("lxd-5.20")) == PORT_NAME
    assert lxd_ring_port(get_layout("lxd-5.19")) == LEGACY_PORT_NAME
    assert lxd_ring_port(get_layout("bridged")) == PORT_NAME
    assert lxd_ring_port(get_layout("incus")) == INCUS_PORT_NAME
    assert lxd_ring_port(get_layout("incus-6")) == INCUS_PORT_NAME


# -- QEMU's verdict -----------------------------------------------------------------------------


async def _devices_in_qemu(
    layout: Layout, ring_size: int, socket: Path
) -> dict[str, tuple[str, str]]:
    """Start a paused q35 with the layout; each port's name and chardev, as QEMU reports them."""
    args = [*MACHINE_PAUSED, *layout.qemu_args(ring_size, spice_socket=socket)]
    async with QemuProcess(args) as qemu:
        chardevs = await qemu.qmp.execute("query-chardev")
        assert isinstance(chardevs, list)
        backends = {c["label"]: c["filename"] for c in chardevs}
        ring_labels = {label for label, kind in backends.items() if kind == "ringbuf"}
        assert ring_labels == {ring.chardev_id for ring in layout.rings}
        # Real SPICE chardevs, not stand-ins: QEMU names their backend.
        assert backends["qemu_spice-chardev"] == "spicevmc"
        assert backends["qemu_spicedir-chardev"] == "spiceport"
        spice = await qemu.qmp.execute("query-spice")
        assert isinstance(spice, dict) and spice["enabled"] is True
        assert socket.is_socket()

        peripherals = await qemu.qmp.execute("qom-list", {"path": "/machine/peripheral"})
        assert isinstance(peripherals, list)
        ports: dict[str, tuple[str, str]] = {}
        for child in peripherals:
            if child["type"] != "child<virtserialport>":
                continue
            path = f"/machine/peripheral/{child['name']}"
            name = await qemu.qmp.execute("qom-get", {"path": path, "property": "name"})
            chardev = await qemu.qmp.execute("qom-get", {"path": path, "property": "chardev"})
            assert isinstance(name, str) and isinstance(chardev, str)
            ports[name] = (child["name"], chardev)
        return ports


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_qemu_accepts_each_layout_and_wires_ports_as_declared(
    layout: Layout, tmp_path: Path
) -> None:
    ports = run(_devices_in_qemu(layout, layout.ring_size, tmp_path / "spice.sock"))
    assert ports == {port.name: (port.device_id, port.chardev_id or "") for port in layout.ports}


def test_qemu_accepts_incus_sized_ring(tmp_path: Path) -> None:
    ports = run(_devices_in_qemu(INCUS, 16384, tmp_path / "spice.sock"))
    assert ports[INCUS_PORT_NAME][1] == "qemu_serial-chardev"


def test_qemu_refuses_a_spiceport_without_spice_so_the_layout_adds_it() -> None:
    args = LXD_5_20.qemu_args(spice_socket=SOCKET)
    without_spice = args[: args.index("-spice")]

    async def start() -> None:
        async with QemuProcess([*MACHINE_PAUSED, *without_spice]):
            pass

    with pytest.raises(QemuError) as caught:
        run(start())
    assert any("spice" in line.lower() for line in caught.value.output)


@pytest.mark.parametrize("size", [15, 24])
def test_qemu_refuses_the_sizes_the_layout_check_refuses(size: int) -> None:
    async def start() -> None:
        async with QemuProcess([*MACHINE_NONE, "-chardev", f"ringbuf,id=r,size={size}"]):
            pass

    with pytest.raises(QemuError, match="exited with status 1") as caught:
        run(start())
    assert any("must be power of two" in line for line in caught.value.output)
    with pytest.raises(LayoutError):
        check_ring_size(size)


def test_qemu_refuses_a_second_port_on_one_chardev() -> None:
    args = [
        *MACHINE_PAUSED,
        *BUS,
        "-chardev", "ringbuf,id=shared,size=16",
        "-device", f"virtserialport,name={PORT_NAME},chardev=shared,bus=dev-qemu_serial.0",
        "-device", f"virtserialport,name={LEGACY_PORT_NAME},chardev=shared,bus=dev-qemu_serial.0",
    ]  # fmt: skip

    async def start() -> None:
        async with QemuProcess(args):
            pass

    with pytest.raises(QemuError) as caught:
        run(start())
    # QEMU 7.2: "Device 'shared' is in use"; 10.0: "chardev 'shared' is already in use".
    assert any("'shared'" in line and "in use" in line for line in caught.value.output)
