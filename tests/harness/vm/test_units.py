"""Tests for lxd_agent_harness.vm.units: a unit's facts from `systemctl show`, asked of a
stand-in guest."""

from __future__ import annotations

import asyncio
from typing import cast

from lxd_agent_harness.vm.console import CommandResult
from lxd_agent_harness.vm.instance import Vm
from lxd_agent_harness.vm.units import (
    AGENT_UNIT,
    FACTS_PROPERTIES,
    UnitFacts,
    agent_unit,
    unit_properties,
)

RUNNING = """\
ActiveState=active
SubState=running
Result=success
NRestarts=0
ConditionResult=yes
StatusText=
Before=multi-user.target cloud-init.service
InactiveExitTimestampMonotonic=5000000
ActiveEnterTimestampMonotonic=5400000
"""


def test_unit_facts_read_systemctl_show() -> None:
    facts = UnitFacts.parse(RUNNING)
    assert (facts.active, facts.sub, facts.restarts) == ("active", "running", 0)
    assert facts.before == ("multi-user.target", "cloud-init.service")
    assert (facts.start_began_us, facts.active_at_us) == (5_000_000, 5_400_000)
    assert facts.summary() == "active (running)"
    skipped = UnitFacts.parse("ActiveState=inactive\nSubState=dead\nConditionResult=no\n")
    assert skipped.summary() == "inactive (dead), condition failed"


class Guest:
    """Stands in for a booted `Vm`: answers one `systemctl show` and keeps the command."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.commands: list[str] = []

    async def run(self, command: str, timeout: float = 10.0) -> CommandResult:
        self.commands.append(command)
        return CommandResult(command=command, status=0, output=self.output)


def test_unit_properties_asks_for_the_names_and_fills_the_missing_with_empty_text() -> None:
    guest = Guest("StatusText=reporting to x: a=b\nActiveState=active\n")
    props = asyncio.run(
        unit_properties(cast(Vm, guest), "lxd-agent.service", ["ActiveState", "StatusText", "Gone"])
    )
    assert guest.commands == ["systemctl show lxd-agent.service -p ActiveState,StatusText,Gone"]
    # In the names' order; a value keeps its own "=" and spaces.
    assert list(props.items()) == [
        ("ActiveState", "active"),
        ("StatusText", "reporting to x: a=b"),
        ("Gone", ""),
    ]


def test_the_agent_units_facts_come_from_the_guest_and_bad_numbers_read_as_zero() -> None:
    guest = Guest(RUNNING.replace("NRestarts=0", "NRestarts=many"))
    facts = asyncio.run(agent_unit(cast(Vm, guest)))
    assert guest.commands == [f"systemctl show {AGENT_UNIT} -p {','.join(FACTS_PROPERTIES)}"]
    assert facts.active == "active" and facts.restarts == 0
    assert facts.active_at_us == 5_400_000


def test_a_summary_names_a_result_the_restarts_and_the_status_before_its_colon() -> None:
    failed = UnitFacts.parse(
        "ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=3\n"
        "StatusText=skipped, no usable port: org.linuxcontainers.lxd hung up\n"
    )
    assert failed.summary() == (
        "failed (failed), Result=exit-code, NRestarts=3, skipped, no usable port"
    )
