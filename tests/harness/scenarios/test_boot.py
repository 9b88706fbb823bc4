"""Tests for lxd_agent_harness.scenarios.boot: the boot verdict, the check that the agent stood
aside where no LXD port has a ring (against a stand-in guest), and a boot that cannot start (no
QEMU runs: its image does not exist). The boots themselves are in tests/in_vm."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import GuestStateMismatch, VmError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.boot import BootVerdict, boot_and_check, check_agent_stood_aside
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from lxd_agent_harness.vm.console import CommandResult
from lxd_agent_harness.vm.instance import E, Vm

SKIPPED = (
    "ActiveState=inactive\nResult=success\nNRestarts=0\n"
    "StatusText=skipped, no usable port: com.canonical.lxd has no host behind it\n"
)


class Guest:
    """Stands in for a booted `Vm`: answers `systemctl` as a guest would, keeps the notes."""

    def __init__(self, system_state: str, agent_unit: str) -> None:
        self.answers = {"systemctl is-system-running": system_state, "systemctl show": agent_unit}
        self.notes: list[str] = []
        self.logged_in = False

    async def login(self, timeout: float) -> None:
        self.logged_in = True

    async def run(self, command: str, timeout: float = 30.0) -> CommandResult:
        output = next(out for start, out in self.answers.items() if command.startswith(start))
        return CommandResult(command, 0, output)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def error(self, message: str) -> VmError:
        return VmError(message)

    def fill(self, error: E) -> E:
        return error


def _stood_aside(guest: Guest) -> str:
    return asyncio.run(check_agent_stood_aside(cast(Vm, guest), timeout=5.0))


def test_an_agent_skipped_cleanly_in_a_running_guest_stood_aside() -> None:
    guest = Guest("running\n", SKIPPED)
    shown = _stood_aside(guest)
    assert guest.logged_in
    assert shown.startswith("ActiveState=inactive Result=success NRestarts=0 StatusText=skipped")
    assert any(note.startswith("guest: lxd-agent: ActiveState=inactive") for note in guest.notes)


@pytest.mark.parametrize(
    ("unit", "why"),
    [
        (SKIPPED.replace("inactive", "failed"), "ActiveState=failed"),
        (SKIPPED.replace("NRestarts=0", "NRestarts=4"), "NRestarts=4"),
        (SKIPPED.replace("skipped, no usable port", "waiting for a port"), "waiting for a port"),
        ("ActiveState=inactive\nResult=success\n", "StatusText=;"),
    ],
    ids=["failed", "restarted", "not-skipped", "said-nothing"],
)
def test_an_agent_that_did_not_stand_aside_cleanly_fails_with_what_systemd_said(
    unit: str, why: str
) -> None:
    with pytest.raises(GuestStateMismatch) as caught:
        _stood_aside(Guest("running\n", unit))
    assert caught.value.subject == "lxd-agent.service"
    assert why in " ".join(f"{k}={v};" for k, v in caught.value.seen.items())


def test_a_boot_that_did_not_complete_fails_before_the_unit_is_asked() -> None:
    guest = Guest("degraded\n", SKIPPED)
    with pytest.raises(GuestStateMismatch) as caught:
        _stood_aside(guest)
    assert caught.value.subject == "system"
    assert caught.value.seen == {"SystemState": "degraded"}
    assert not any(note.startswith("guest: lxd-agent:") for note in guest.notes)


def test_the_verdict_lists_one_ports_changes_and_reads_and_passes_without_an_error() -> None:
    entries = [
        TimelineEntry(0.0, EntryKind.NOTE, "QEMU started"),
        TimelineEntry(9.0, EntryKind.READ, "'STARTED\\n'", PORT_NAME, "VSERPORT_CHANGE"),
        TimelineEntry(9.0, EntryKind.STATE, f"unknown -> {STARTED}", PORT_NAME),
        TimelineEntry(9.5, EntryKind.READ, "'x\\n'", LEGACY_PORT_NAME, "idle 10 s"),
        TimelineEntry(20.0, EntryKind.STATE, f"{STARTED} -> {STOPPED}", PORT_NAME),
    ]
    verdict = BootVerdict(layout="bridged", port=PORT_NAME, entries=entries)
    assert verdict.state_changes(PORT_NAME) == [f"unknown -> {STARTED}", f"{STARTED} -> {STOPPED}"]
    assert verdict.state_changes(LEGACY_PORT_NAME) == []
    assert verdict.reads(PORT_NAME) == ["'STARTED\\n'"]
    assert verdict.reads(LEGACY_PORT_NAME) == ["'x\\n'"]
    assert verdict.passed
    verdict.error = VmError("no STOPPED within 30 s")
    assert not verdict.passed


@pytest.mark.parametrize(
    ("layout", "port"),
    [("lxd-5.19", LEGACY_PORT_NAME), ("lxd-5.20", PORT_NAME), ("incus", INCUS_PORT_NAME)],
)
def test_a_boot_that_cannot_start_is_a_failed_verdict_not_an_exception(
    layout: str, port: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a VM lock of this test's own
    config = VmConfig(get_layout(layout), DirectBoot(GuestImage(tmp_path / "none")), Accel.TCG)
    verdict = asyncio.run(boot_and_check(config, timeout=5.0))
    assert (verdict.layout, verdict.port) == (layout, port)
    assert not verdict.passed and isinstance(verdict.error, VmError)
    assert "could not make an overlay" in str(verdict.error)
    assert verdict.started is None and verdict.stopped is None and verdict.entries == []
