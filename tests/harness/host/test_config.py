"""Tests for lxd_agent_harness.host.config: a daemon's qemu.conf set against a layout.

The text below is the virtio-serial part of LXD 5.0.2's `qemu.conf`, as its template writes it
(`qemuSerial`, lxd/instance/drivers/driver_qemu_templates.go at lxd-5.0.2, with its comments
and the bus's PCIe placement); the real daemon's own file is compared in
tests/harness/scenarios/test_host_check.py.
"""

from __future__ import annotations

from lxd_agent_harness.host.config import read_sections, serial_differences
from lxd_agent_harness.lxd.layouts import get_layout

LXD_5_0_SERIAL = """
# Machine
[machine]
graphics = "off"
type = "q35"
accel = "kvm"

# Virtual serial bus
[device "dev-qemu_serial"]
driver = "virtio-serial-pci"
bus = "qemu_pcie1"
addr = "00.0"

# LXD serial identifier
[chardev "qemu_serial-chardev"]
backend = "ringbuf"
size = "16B"

[device "qemu_serial"]
driver = "virtserialport"
name = "org.linuxcontainers.lxd"
chardev = "qemu_serial-chardev"
bus = "dev-qemu_serial.0"

# Spice agent
[chardev "qemu_spice-chardev"]
backend = "spicevmc"
name = "vdagent"

[device "qemu_spice"]
driver = "virtserialport"
name = "com.redhat.spice.0"
chardev = "qemu_spice-chardev"
bus = "dev-qemu_serial.0"

# Spice folder
[chardev "qemu_spicedir-chardev"]
backend = "spiceport"
name = "org.spice-space.webdav.0"

[device "qemu_spicedir"]
driver = "virtserialport"
name = "org.spice-space.webdav.0"
chardev = "qemu_spicedir-chardev"
bus = "dev-qemu_serial.0"
"""


def test_lxd_5_0s_serial_part_is_the_lxd_5_19_layout() -> None:
    assert (
        serial_differences(read_sections(LXD_5_0_SERIAL, "qemu.conf"), get_layout("lxd-5.19")) == []
    )


def test_against_the_lxd_5_20_layout_each_difference_is_named() -> None:
    differences = serial_differences(
        read_sections(LXD_5_0_SERIAL, "qemu.conf"), get_layout("lxd-5.20")
    )
    assert differences == [
        '[device "qemu_serial_legacy"] is in the lxd-5.20 layout, not in the daemon\'s',
        '[device "qemu_serial"] name: the daemon has "org.linuxcontainers.lxd", '
        'the lxd-5.20 layout "com.canonical.lxd"',
    ]


def test_a_ring_of_another_size_differs() -> None:
    bigger = LXD_5_0_SERIAL.replace('size = "16B"', 'size = "32B"')
    assert serial_differences(read_sections(bigger, "qemu.conf"), get_layout("lxd-5.19")) == [
        '[chardev "qemu_serial-chardev"] size: the daemon has "32B", the lxd-5.19 layout "16B"'
    ]


def test_a_port_on_another_bus_is_not_the_agents() -> None:
    other = LXD_5_0_SERIAL + '\n[device "x"]\ndriver = "virtserialport"\nname = "x"\nbus = "b.0"\n'
    assert serial_differences(read_sections(other, "qemu.conf"), get_layout("lxd-5.19")) == []
