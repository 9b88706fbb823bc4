"""The guest's systemd units as `systemctl show` describes them, read through the serial console.

One place runs `systemctl show` and parses its `Name=value` lines for the scenarios (the tests
and benchmarks use it too, except where they assert on systemctl's own words). Host side only:
it runs commands in a guest through `Vm.run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.vm.instance import Vm

AGENT_UNIT = "lxd-agent.service"
FACTS_PROPERTIES = (
    "ActiveState",
    "SubState",
    "Result",
    "NRestarts",
    "ConditionResult",
    "StatusText",
    "Before",
    "InactiveExitTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
)
"""What `UnitFacts` is made of."""


def parse_properties(shown: str) -> dict[str, str]:
    """`systemctl show`'s `Name=value` lines as a dict (a value may hold `=` and spaces)."""
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


async def unit_properties(vm: Vm, unit: str, names: Sequence[str]) -> dict[str, str]:
    """`names`' values for `unit` in the guest (`""`: the service manager itself); a property
    systemd did not print is `""`."""
    shown = await vm.run(f"systemctl show {unit} -p {','.join(names)}")
    props = parse_properties(shown.output)
    return {name: props.get(name, "") for name in names}


AGENT_DIAGNOSTICS = (
    "systemctl status lxd-agent --no-pager -l 2>&1 | head -40; "
    "journalctl -b -u lxd-agent --no-pager 2>&1 | tail -40; "
    "ls -l /dev/virtio-ports 2>&1; grep -H . /sys/class/virtio-ports/*/name 2>&1"
)
"""What a failure report shows of the agent from inside the guest: its unit, its journal, the
ports udev linked and the names the kernel gave them."""


async def agent_diagnostics(vm: Vm, timeout: float = 20.0) -> str:
    """`AGENT_DIAGNOSTICS`' output, or why the guest's console did not give it. Never raises a
    `HarnessError`: it is for reports of failures that have their own error."""
    try:
        return (await vm.run(AGENT_DIAGNOSTICS, timeout=timeout)).output
    except HarnessError as e:
        return f"(the guest's console did not answer: {e})"


async def agent_unit(vm: Vm) -> UnitFacts:
    """The agent unit's facts in the guest now."""
    return UnitFacts.from_properties(await unit_properties(vm, AGENT_UNIT, FACTS_PROPERTIES))


@dataclass(frozen=True)
class UnitFacts:
    """A unit as `systemctl show` describes it (the agent's, after the boot)."""

    active: str
    sub: str
    result: str
    restarts: int
    condition_met: bool
    status_text: str
    before: tuple[str, ...]
    start_began_us: int
    """When its start job began (CLOCK_MONOTONIC µs); 0: never started."""
    active_at_us: int
    """When it became active (after READY=1 for Type=notify); 0: never."""

    @classmethod
    def parse(cls, shown: str) -> UnitFacts:
        """From `systemctl show`'s output (`Name=value` lines)."""
        return cls.from_properties(parse_properties(shown))

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> UnitFacts:
        """From the properties `unit_properties` returns (missing ones read as empty)."""

        def number(name: str) -> int:
            try:
                return int(props.get(name, "0") or "0")
            except ValueError:
                return 0

        return cls(
            active=props.get("ActiveState", ""),
            sub=props.get("SubState", ""),
            result=props.get("Result", ""),
            restarts=number("NRestarts"),
            condition_met=props.get("ConditionResult", "yes") != "no",
            status_text=props.get("StatusText", ""),
            before=tuple(props.get("Before", "").split()),
            start_began_us=number("InactiveExitTimestampMonotonic"),
            active_at_us=number("ActiveEnterTimestampMonotonic"),
        )

    def summary(self) -> str:
        """e.g. `active (running)`, `inactive (dead), condition failed`, `failed, NRestarts=3`."""
        parts = [f"{self.active} ({self.sub})"]
        if not self.condition_met:
            parts.append("condition failed")
        if self.result not in ("", "success"):
            parts.append(f"Result={self.result}")
        if self.restarts:
            parts.append(f"NRestarts={self.restarts}")
        if self.status_text:
            parts.append(self.status_text.split(":", 1)[0])
        return ", ".join(parts)
