"""The agent's writes on Incus's port against the hosts' real reading rules, in any order of
writes and reads: why the state line is a switch, and that each setting keeps its promises.

The guest side is the agent's own `status_payload` and `state_line`; the host side is the
harness's `interpret_ring_text` (LXD's rule, which Incus before 7.3 applies to a 16 B ring, and
Incus 7.3's on a 16 KiB one), checked against a live QEMU in tests/harness/lxd. The ring keeps
its last `size` bytes and a read takes all of them, as QEMU's `ringbuf` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lxd_agent.guest.ports import status_payload
from lxd_agent.guest.state import MAX_STATE_BYTES, state_line
from lxd_agent.protocol import (
    DEFAULT_RING_SIZE,
    INCUS_PORT_NAME,
    LINES_PER_WRITE,
    MINIMAL_STATE_LINE,
    STARTED,
    STOPPED,
)
from lxd_agent_harness.lxd.layouts import INCUS_RING_SIZE, ReadingRule
from lxd_agent_harness.lxd.reading_rules import RingRead, interpret_ring_text

COPIES = LINES_PER_WRITE[INCUS_PORT_NAME]

# A state line as long as the agent ever writes: 8 KiB of interfaces, so that three unread
# refreshes wrap Incus's 16 KiB ring.
BIG_STATE = state_line(
    {
        "pid": 1,
        "processes": 42,
        "os_info": {"os": "Debian GNU/Linux", "hostname": "guest"},
        "network": {
            f"eth{i}": {"addresses": [{"family": "inet", "address": f"10.0.{i}.2"}]}
            for i in range(130)
        },
    }
)


@dataclass
class Ring:
    size: int
    data: bytes = b""

    def write(self, payload: bytes) -> None:
        self.data = (self.data + payload)[-self.size :]

    def read(self) -> bytes:
        data, self.data = self.data, b""
        return data


@dataclass
class Host:
    """A host's reader: its rule, its ring, what it believes after each read."""

    rule: ReadingRule
    ring: Ring
    status: str | None = None
    state: dict[str, Any] | None = None
    reads: list[RingRead] = field(default_factory=list)

    def read(self) -> RingRead:
        reading = interpret_ring_text(self.ring.read().decode("ascii"), self.rule)
        if reading.status is not None:
            self.status = reading.status
        if reading.sets_state:
            self.state = reading.state
        self.reads.append(reading)
        return reading


def incus_6() -> Host:
    return Host(ReadingRule.LXD, Ring(DEFAULT_RING_SIZE))


def incus_7_3() -> Host:
    return Host(ReadingRule.INCUS, Ring(INCUS_RING_SIZE))


def started(state: str | None) -> bytes:
    """One refresh of the agent on Incus's port, the state line on (a line) or off (None)."""
    return status_payload(STARTED, COPIES, state)


STOPPED_WRITE = status_payload(STOPPED, COPIES)

# A run: the agent's refreshes and the host's reads, in any order; True is a read. The host
# restarts when it likes: a restarted host is one whose reads start anew on the same ring.
RUNS = st.lists(st.booleans(), min_size=1, max_size=40)


def play(host: Host, run: list[bool], state: str | None) -> list[tuple[int, RingRead]]:
    """The agent starts (its first write), then `run`; each read with how many refreshes it
    followed."""
    host.ring.write(started(MINIMAL_STATE_LINE if state else None))
    unread = 1
    reads = []
    for is_read in run:
        if is_read:
            reads.append((unread, host.read()))
            unread = 0
        else:
            host.ring.write(started(state))
            unread += 1
    return reads


@settings(max_examples=300, deadline=None)
@given(RUNS)
def test_off_every_read_after_a_refresh_is_started_on_either_host(run: list[bool]) -> None:
    for host in (incus_6(), incus_7_3()):
        for unread, reading in play(host, run, state=None):
            if unread:
                assert reading.status == STARTED, (host.rule, run)
                assert reading.state is None
            else:
                assert reading.status is None and not reading.sets_state  # nothing changes


@settings(max_examples=300, deadline=None)
@given(RUNS)
def test_on_incus_7_3_holds_the_state_after_every_read_while_the_agent_runs(
    run: list[bool],
) -> None:
    host = incus_7_3()
    for unread, reading in play(host, run, state=BIG_STATE):
        if unread:
            assert reading.status == STARTED, run
        # Reads with nothing new change nothing: the state stays, it never flickers.
        assert host.state is not None and host.state["pid"] == 1, run
        assert host.status == STARTED
    # Which state the last read that carried one had: the minimal first one, or a refresh's.
    expected, refreshed = None, False
    for is_read in run:
        if is_read and (refreshed or expected is None):
            expected = BIG_STATE if refreshed else MINIMAL_STATE_LINE
            refreshed = False
        elif not is_read:
            refreshed = True
    assert host.state == (json.loads(expected) if expected else None), run


@settings(max_examples=300, deadline=None)
@given(RUNS, st.sampled_from([None, BIG_STATE]))
def test_stopped_reads_as_stopped_under_both_rules_whatever_is_unread(
    run: list[bool], state: str | None
) -> None:
    for host in (incus_6(), incus_7_3()):
        play(host, run, state)
        host.ring.write(STOPPED_WRITE)
        reading = host.read()
        assert reading.status == STOPPED, (host.rule, run, state is not None)
        assert host.status == STOPPED
        if host.rule is ReadingRule.INCUS:
            assert host.state is None  # the agent is gone: Incus falls back to its own view


def test_on_a_16_byte_ring_the_state_line_crowds_started_out_which_is_why_it_is_a_switch() -> None:
    host = incus_6()
    for state in (MINIMAL_STATE_LINE, BIG_STATE):
        host.ring.write(started(state))
        reading = host.read()
        assert reading.status is None, reading  # never STARTED: the JSON's tail is all there is
    assert host.status is None


def test_a_refresh_with_the_state_fits_the_ring_twice_over() -> None:
    assert len(BIG_STATE) <= MAX_STATE_BYTES
    assert len(BIG_STATE) > MAX_STATE_BYTES - 1024  # the example is near the bound
    assert 2 * len(started(BIG_STATE)) <= INCUS_RING_SIZE
