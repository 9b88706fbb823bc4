"""Tests for lxd_agent_harness.lxd.qemu_conf: a layout as LXD's configuration sections, and
LXD's `raw.qemu.conf` rules, on the examples of LXD's own documentation
(`doc/howto/instance_qemu_config.md`) and on the serial devices of its template."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import QemuConfError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.qemu_conf import (
    Section,
    apply_overrides,
    layout_sections,
    parse_raw_qemu_conf,
    render,
)

# LXD's `qemuSerial` for LXD >= 5.20 (its template test, driver_qemu_templates_test.go, with
# com.canonical.lxd and LXD's 16 B ring), less the bus's `addr` and `bus` keys: LXD puts the bus
# on a PCIe root port of its own machine layout, which the harness's machine does not have.
LXD_5_20_SERIAL = """\
[device "dev-qemu_serial"]
driver = "virtio-serial-pci"

[chardev "qemu_serial-chardev"]
backend = "ringbuf"
size = "16B"

[device "qemu_serial"]
driver = "virtserialport"
name = "com.canonical.lxd"
chardev = "qemu_serial-chardev"
bus = "dev-qemu_serial.0"

[device "qemu_serial_legacy"]
driver = "virtserialport"
name = "org.linuxcontainers.lxd"
bus = "dev-qemu_serial.0"

[chardev "qemu_spice-chardev"]
backend = "spicevmc"
name = "vdagent"

[device "qemu_spice"]
driver = "virtserialport"
name = "com.redhat.spice.0"
chardev = "qemu_spice-chardev"
bus = "dev-qemu_serial.0"

[chardev "qemu_spicedir-chardev"]
backend = "spiceport"
name = "org.spice-space.webdav.0"

[device "qemu_spicedir"]
driver = "virtserialport"
name = "org.spice-space.webdav.0"
chardev = "qemu_spicedir-chardev"
bus = "dev-qemu_serial.0"
"""

# The piece of LXD's configuration its documentation shows, with a GPU device beside it.
DOCUMENTED = [
    Section('device "qemu_gpu"', (("driver", "virtio-gpu-pci"), ("bus", "qemu_pcie3"))),
    Section("global", (("driver", "ICH9-LPC"), ("property", "disable_s3"), ("value", "1"))),
    Section("global", (("driver", "ICH9-LPC"), ("property", "disable_s4"), ("value", "1"))),
]


def applied(text: str, sections: list[Section] = DOCUMENTED) -> list[Section]:
    return apply_overrides(sections, parse_raw_qemu_conf(text))


def test_lxd_5_20s_serial_devices_are_its_templates_sections_in_its_order() -> None:
    assert render(layout_sections(get_layout("lxd-5.20"))) == LXD_5_20_SERIAL


def test_the_ring_size_is_written_as_lxd_writes_it() -> None:
    sections = layout_sections(get_layout("incus"))
    assert sections[1] == Section(
        'chardev "qemu_serial-chardev"', (("backend", "ringbuf"), ("size", "16384B"))
    )


def test_documented_a_key_is_replaced() -> None:
    result = applied('[device "qemu_gpu"]\ndriver = "qxl-vga"\n')
    assert result[0].entries == (("driver", "qxl-vga"), ("bus", "qemu_pcie3"))
    assert result[1:] == DOCUMENTED[1:]


def test_documented_a_section_with_no_keys_is_removed() -> None:
    assert applied('[device "qemu_gpu"]\n') == DOCUMENTED[1:]


def test_documented_an_empty_value_removes_the_key() -> None:
    assert applied('[device "qemu_gpu"]\ndriver = ""\n')[0].entries == (("bus", "qemu_pcie3"),)


def test_documented_an_index_picks_the_nth_section_of_a_name() -> None:
    result = applied('[global][1]\nvalue = "0"\n')
    assert result[1] == DOCUMENTED[1]
    assert result[2].entries == (("driver", "ICH9-LPC"), ("property", "disable_s4"), ("value", "0"))


def test_documented_a_section_the_configuration_lacks_is_added() -> None:
    result = applied('[device "extra"]\ndriver = "virtio-rng-pci"\n')
    assert result[:3] == DOCUMENTED and result[3] == Section(
        'device "extra"', (("driver", "virtio-rng-pci"),)
    )


def test_unquoted_values_comments_and_blank_lines_as_lxd_reads_them() -> None:
    result = applied('# a comment\n\n  [device "qemu_gpu"]  \n  driver = qxl-vga  \n')
    assert result[0].entries[0] == ("driver", "qxl-vga")


def test_the_way_through_removes_lxd_5_20s_legacy_stub_and_keeps_5_19s_port_count() -> None:
    result = applied('[device "qemu_serial_legacy"]\n', layout_sections(get_layout("lxd-5.20")))
    ports = [s for s in result if s.get("driver") == "virtserialport"]
    assert [p.get("name") for p in ports] == [
        "com.canonical.lxd",
        "com.redhat.spice.0",
        "org.spice-space.webdav.0",
    ]
    assert len(ports) == len(get_layout("lxd-5.19").ports)


@pytest.mark.parametrize(
    ("text", "line_number", "problem"),
    [
        ('[device "qemu_gpu"]\ndriver "qxl-vga"\n', 2, 'neither a [section] nor key = "value"'),
        ('driver = "qxl-vga"\n', 1, "a key before any [section]"),
        ('[global]\nvalue = "0"\n[device "x"\n', 3, 'neither a [section] nor key = "value"'),
        ('\n[global][5]\nvalue = "0"\n', 2, "there are only 2 [global] sections (indexes from 0)"),
    ],
)
def test_bad_input_is_one_error_naming_the_line(text: str, line_number: int, problem: str) -> None:
    with pytest.raises(QemuConfError) as caught:
        apply_overrides(DOCUMENTED, parse_raw_qemu_conf(text, source="vm.conf"), source="vm.conf")
    error = caught.value
    assert (error.source, error.line_number, error.problem) == ("vm.conf", line_number, problem)
    assert str(error).startswith(f"vm.conf:{line_number}: {problem}")


# -- QEMU reads them ----------------------------------------------------------------------------


def qom_names(conf: Path, spice_socket: Path, devices: list[str]) -> dict[str, object]:
    """Start a paused QEMU 7.2 on `conf` (`-readconfig`, as LXD does), ask each device's
    `name` and port `nr` over QMP, quit; what it answered, by device (an error's class too)."""
    commands: list[dict[str, object]] = [{"execute": "qmp_capabilities"}]
    for device in devices:
        for prop in ("name", "nr"):
            path = f"/machine/peripheral/{device}"
            commands.append({"execute": "qom-get", "arguments": {"path": path, "property": prop}})
    commands.append({"execute": "quit"})
    command = ["qemu-system-x86_64", "-S", "-machine", "q35", "-nodefaults", "-display", "none"]
    command += ["-readconfig", str(conf), "-qmp", "stdio"]
    command += ["-spice", f"unix=on,addr={spice_socket},disable-ticketing=on"]
    done = subprocess.run(
        command,
        input="".join(json.dumps(c) + "\n" for c in commands),
        capture_output=True,
        text=True,
        timeout=60,
    )
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answers = [r for r in replies if "return" in r or "error" in r][1:]  # after capabilities
    found: dict[str, object] = {}
    for index, device in enumerate(devices):
        name, nr = answers[2 * index], answers[2 * index + 1]
        found[device] = (
            (name["return"], nr["return"]) if "return" in name else name["error"]["class"]
        )
    return found


def test_qemu_reads_the_sections_and_the_way_through_leaves_5_19s_port_numbers(
    tmp_path: Path,
) -> None:
    devices = ["qemu_serial", "qemu_serial_legacy", "qemu_spice", "qemu_spicedir"]
    conf = tmp_path / "qemu.conf"
    conf.write_text(render(layout_sections(get_layout("lxd-5.20"))))
    assert qom_names(conf, tmp_path / "spice.sock", devices) == {
        "qemu_serial": ("com.canonical.lxd", 1),
        "qemu_serial_legacy": ("org.linuxcontainers.lxd", 2),
        "qemu_spice": ("com.redhat.spice.0", 3),
        "qemu_spicedir": ("org.spice-space.webdav.0", 4),
    }
    conf.write_text(
        render(applied('[device "qemu_serial_legacy"]', layout_sections(get_layout("lxd-5.20"))))
    )
    through = qom_names(conf, tmp_path / "spice.sock", devices)
    conf.write_text(render(layout_sections(get_layout("lxd-5.19"))))
    before = qom_names(conf, tmp_path / "spice.sock", devices)
    assert through == {
        "qemu_serial": ("com.canonical.lxd", 1),
        "qemu_serial_legacy": "DeviceNotFound",
        "qemu_spice": ("com.redhat.spice.0", 2),
        "qemu_spicedir": ("org.spice-space.webdav.0", 3),
    }
    # The same port numbers as LXD 5.19's VM: only the first one's name differs.
    assert before == {**through, "qemu_serial": ("org.linuxcontainers.lxd", 1)}
