"""Tests for lxd_agent_harness.vm.units: a unit's facts from `systemctl show`'s lines."""

from __future__ import annotations

from lxd_agent_harness.vm.units import UnitFacts

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
