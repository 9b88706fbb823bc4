"""A layout as LXD writes it: `-readconfig` sections, and LXD's `raw.qemu.conf` rules on them.

LXD starts QEMU with `-readconfig qemu.conf`, a file of `[group "id"]` sections of
`key = "value"` lines (`driver_qemu_templates.go`; facts §11). This module writes a layout's
virtio-serial part the same way, in LXD's order (`qemuSerial`): the bus `dev-qemu_serial`, the
ring chardev, the status port, LXD 5.20's legacy stub, then the SPICE chardevs and ports. LXD's
`addr` and `bus` keys of the bus (its PCIe root port) are left out: the harness's machine has no
such port, and QEMU puts the bus on the root complex.

`raw.qemu.conf` (LXD's `doc/howto/instance_qemu_config.md`, `qemuRawCfgOverride`) changes those
sections before QEMU reads them: a key in a known section replaces that key, `key = ""` removes
it, a section named with no keys is removed, `[name][N]` addresses the Nth section of that name
(from 0), and a section the configuration does not have is added. `parse_raw_qemu_conf` reads
such a text and says exactly which line is wrong; `apply_overrides` applies it. Pure functions:
no I/O. Host side only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lxd_agent_harness.base.errors import QemuConfError
from lxd_agent_harness.lxd.layouts import (
    SERIAL_BUS,
    SERIAL_BUS_DEVICE_ID,
    Backend,
    Layout,
    check_ring_size,
)

SPICE_BACKENDS = (Backend.SPICEVMC.value, Backend.SPICEPORT.value)
"""The chardev backends that need SPICE configured (`-spice`)."""


@dataclass(frozen=True)
class Section:
    """One `[name]` of a QEMU configuration file and its keys, in order."""

    name: str
    entries: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        return next((value for k, value in self.entries if k == key), None)


def layout_sections(layout: Layout, ring_size: int | None = None) -> list[Section]:
    """The layout's virtio-serial devices as LXD's configuration sections, in its order."""
    size = layout.ring_size if ring_size is None else ring_size
    check_ring_size(size)
    sections = [Section(f'device "{SERIAL_BUS_DEVICE_ID}"', (("driver", "virtio-serial-pci"),))]
    for port in layout.ports:
        chardev = port.chardev
        if chardev is not None:
            if chardev.backend is Backend.RINGBUF:
                keys: tuple[tuple[str, str], ...] = (("backend", "ringbuf"), ("size", f"{size}B"))
            else:
                keys = (("backend", chardev.backend.value), ("name", chardev.name or ""))
            sections.append(Section(f'chardev "{chardev.id}"', keys))
        device = [("driver", "virtserialport"), ("name", port.name)]
        if chardev is not None:
            device.append(("chardev", chardev.id))
        device.append(("bus", SERIAL_BUS))
        sections.append(Section(f'device "{port.device_id}"', tuple(device)))
    return sections


def render(sections: list[Section]) -> str:
    """The configuration file's text, as QEMU's `-readconfig` reads it."""
    blocks = []
    for section in sections:
        lines = [f"[{section.name}]"]
        lines += [f'{key} = "{value}"' for key, value in section.entries]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# -- raw.qemu.conf ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """One section of a `raw.qemu.conf`: the section it names (the `index`th of that name) and
    its keys; a value of "" removes the key, no keys at all removes the section."""

    name: str
    index: int
    entries: tuple[tuple[str, str], ...]
    line_number: int


_SECTION = re.compile(r"\[(?P<name>[^\[\]]+)\](?:\[(?P<index>\d+)\])?")
# LXD's own pattern takes `key = "value"` and, unquoted, `key = value` (to the line's end).
_ENTRY = re.compile(r'(?P<key>[^=\s"\[\]]+)\s*=\s*(?:"(?P<quoted>[^"]*)"|(?P<plain>[^"]*))')


def parse_raw_qemu_conf(text: str, source: str = "raw.qemu.conf") -> list[Override]:
    """`text` as LXD reads a `raw.qemu.conf`; a `QemuConfError` naming the first bad line.

    Blank lines and `#` comments are skipped. Every other line is `[name]`, `[name][N]` or
    `key = "value"` (or, as LXD also takes it, `key = value`) under a section. Stricter than
    LXD, which skips a line it cannot read and appends a section for any index: here either
    is an error, so that a typo does not silently leave the VM as it was.
    """
    overrides: list[Override] = []
    current: tuple[str, int, int] | None = None
    entries: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION.fullmatch(line)
        if section is not None:
            if current is not None:
                overrides.append(Override(current[0], current[1], tuple(entries), current[2]))
            name = section["name"].strip()
            current, entries = (name, int(section["index"] or 0), number), []
            continue
        entry = _ENTRY.fullmatch(line)
        if entry is None:
            raise QemuConfError(source, number, raw, 'neither a [section] nor key = "value"')
        if current is None:
            raise QemuConfError(source, number, raw, "a key before any [section]")
        value = entry["quoted"] if entry["quoted"] is not None else entry["plain"].strip()
        entries.append((entry["key"], value))
    if current is not None:
        overrides.append(Override(current[0], current[1], tuple(entries), current[2]))
    return overrides


def read_raw_qemu_conf(path: Path) -> tuple[Override, ...]:
    """The file's `raw.qemu.conf`, parsed; a `QemuConfError` for a file that cannot be read
    or a line LXD's rules do not allow. Checked against the sections a VM's configuration has
    when it is applied (`apply_overrides`), before QEMU starts."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise QemuConfError(str(path), 0, "", f"cannot read it ({problem})") from None
    return tuple(parse_raw_qemu_conf(text, source=str(path)))


def apply_overrides(
    sections: list[Section], overrides: list[Override], source: str = "raw.qemu.conf"
) -> list[Section]:
    """`sections` as LXD's `raw.qemu.conf` rules leave them (module docstring)."""
    result: list[Section | None] = list(sections)
    for override in overrides:
        same = [i for i, s in enumerate(result) if s is not None and s.name == override.name]
        if override.index >= len(same):
            if override.index == 0 or override.index == len(same):
                # A section the configuration lacks is added (the next index of its name too).
                if override.entries:
                    kept = tuple((k, v) for k, v in override.entries if v != "")
                    result.append(Section(override.name, kept))
                continue
            raise QemuConfError(
                source,
                override.line_number,
                f"[{override.name}][{override.index}]",
                f"there are only {len(same)} [{override.name}] sections (indexes from 0)",
            )
        position = same[override.index]
        target = result[position]
        assert target is not None
        if not override.entries:
            result[position] = None
            continue
        keys = dict(target.entries)
        for key, value in override.entries:
            if value == "":
                keys.pop(key, None)
            else:
                keys[key] = value
        result[position] = Section(target.name, tuple(keys.items()))
    return [section for section in result if section is not None]
