"""A daemon's own QEMU configuration set against the harness's layout of that host.

A daemon writes the configuration it starts QEMU with (`-readconfig`) into the instance's log
directory: `qemu.conf`. Its virtio-serial part (the bus `dev-qemu_serial`, the chardevs its
ports use, every `virtserialport` on that bus) is what the agent sees, and what the harness's
layouts claim to reproduce (`lxd.qemu_conf.layout_sections`). `serial_differences` compares the
two, key by key, and says each difference in words; none means the harness's model of that host
holds. The bus's own placement (`bus`, `addr`, `multifunction`: its PCIe root port) is not
compared: the harness's machine has no such port. Pure functions. Host side only.
"""

from __future__ import annotations

from lxd_agent_harness.lxd.layouts import SERIAL_BUS, SERIAL_BUS_DEVICE_ID, Layout
from lxd_agent_harness.lxd.qemu_conf import Section, layout_sections, parse_raw_qemu_conf

_PLACEMENT = frozenset({"bus", "addr", "multifunction"})


def read_sections(text: str, source: str) -> list[Section]:
    """A whole QEMU configuration file (the daemon's `qemu.conf`) as sections, in order."""
    return [Section(o.name, o.entries) for o in parse_raw_qemu_conf(text, source)]


def serial_part(sections: list[Section]) -> dict[str, dict[str, str]]:
    """The virtio-serial bus, its ports and the chardevs they use, by section name."""
    by_name = {section.name: section for section in sections}
    part: dict[str, dict[str, str]] = {}
    bus = by_name.get(f'device "{SERIAL_BUS_DEVICE_ID}"')
    if bus is not None:
        part[bus.name] = {k: v for k, v in bus.entries if k not in _PLACEMENT}
    for section in sections:
        keys = dict(section.entries)
        if keys.get("driver") != "virtserialport" or keys.get("bus") != SERIAL_BUS:
            continue
        part[section.name] = keys
        chardev = keys.get("chardev")
        if chardev and (used := by_name.get(f'chardev "{chardev}"')) is not None:
            part[used.name] = dict(used.entries)
    return part


def serial_differences(
    daemon: list[Section], layout: Layout, ring_size: int | None = None
) -> list[str]:
    """Each way the daemon's virtio-serial part differs from `layout`'s, in words; [] if none."""
    theirs = serial_part(daemon)
    ours = serial_part(layout_sections(layout, ring_size))
    differences = []
    for name in sorted(ours.keys() - theirs.keys()):
        differences.append(f"[{name}] is in the {layout.name} layout, not in the daemon's")
    for name in sorted(theirs.keys() - ours.keys()):
        differences.append(
            f"[{name}] is in the daemon's configuration, not in the {layout.name} layout"
        )
    for name in sorted(ours.keys() & theirs.keys()):
        for key in sorted(ours[name].keys() | theirs[name].keys()):
            mine, its = ours[name].get(key), theirs[name].get(key)
            if mine != its:
                differences.append(
                    f"[{name}] {key}: the daemon has {_said(its)}, "
                    f"the {layout.name} layout {_said(mine)}"
                )
    return differences


def _said(value: str | None) -> str:
    return "none" if value is None else f'"{value}"'
