"""Tests for lxd_agent_harness.testing.host_guest without a daemon: the daemon's agent flag,
as a scripted sequence, becomes the states a test waits for. The real daemon's are in
tests/harness/testing/test_plugin.py (`--lxd-host lxd`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from lxd_agent.protocol import LEGACY_PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.host.instance import AgentFlag, HostVm
from lxd_agent_harness.testing import host_guest
from lxd_agent_harness.testing.host_guest import HostGuest

UP, DOWN = AgentFlag.UP, AgentFlag.DOWN


@dataclass
class Info:
    kind: str = "lxd"
    version: str = "5.0.2"
    version_tuple: tuple[int, ...] = (5, 0, 2)


@dataclass
class ScriptedVm:
    """What `HostGuest` asks of a `HostVm`: the flag, in the order given (the last one stays)."""

    flags: list[AgentFlag]
    info: Info = field(default_factory=Info)
    asked: int = 0

    async def agent_flag(self) -> AgentFlag:
        self.asked += 1
        return self.flags.pop(0) if len(self.flags) > 1 else self.flags[0]

    def seconds(self) -> float:
        return float(self.asked)


@pytest.fixture
def guest_of(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(host_guest, "FLAG_POLL", 0.001)
    made: list[HostGuest] = []

    def make(*flags: AgentFlag) -> HostGuest:
        guest = HostGuest(cast(HostVm, ScriptedVm(list(flags))))
        guest._thread.start()
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.close()


def test_the_flag_going_up_then_down_is_started_then_stopped(guest_of: Any) -> None:
    guest = guest_of(DOWN, DOWN, UP, UP, DOWN)
    assert guest.port == LEGACY_PORT_NAME  # LXD 5.0.2: the lxd-5.19 layout
    started = guest.wait_for(STARTED, timeout=5)
    assert (started.text, started.port, started.seconds) == ("unknown -> STARTED", guest.port, 3)
    assert guest.wait_for(STOPPED, timeout=5).text == "STARTED -> STOPPED"
    assert guest.started() == started
    assert [line.split("s  ", 1)[1] for line in guest.timeline] == [
        f"state  {LEGACY_PORT_NAME}: unknown -> STARTED [the daemon's agent flag went up]",
        f"state  {LEGACY_PORT_NAME}: STARTED -> STOPPED [the daemon's agent flag went down]",
    ]


def test_a_flag_never_up_is_no_stopped_and_the_wait_says_so(guest_of: Any) -> None:
    guest = guest_of(DOWN)
    assert guest.state() is None
    with pytest.raises(VmError) as raised:
        guest.wait_for(STOPPED, timeout=0.2)
    assert "its agent flag: never up" in str(raised.value)
    assert raised.value.timeline == []


def test_a_started_seen_before_the_wait_is_returned_at_once(guest_of: Any) -> None:
    guest = guest_of(UP)
    assert guest.state() == STARTED
    assert guest.wait_for(STARTED, timeout=5).text == "unknown -> STARTED"


def test_what_a_daemon_cannot_answer_is_an_error_not_a_guess(guest_of: Any) -> None:
    guest = guest_of(UP)
    with pytest.raises(VmError, match=r"reads org\.linuxcontainers\.lxd only"):
        guest.wait_for(STARTED, port="com.canonical.lxd")
    with pytest.raises(VmError, match="no QMP socket"):
        guest.qmp("query-status")
    assert guest.instance_state() is None and guest.events() == [] and not guest.warm
