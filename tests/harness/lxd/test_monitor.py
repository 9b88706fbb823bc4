"""Tests for lxd_agent_harness.lxd.monitor: the ring monitor against a real QEMU (what it concludes,
when it reads, an untrusted guest); the reading rules' own table is in test_reading_rules.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from lxd_agent.protocol import CONNECTED, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import MonitorError, MonitorTimeout
from lxd_agent_harness.lxd import monitor as monitor_module
from lxd_agent_harness.lxd.layouts import BRIDGED, INCUS_RING_SIZE, ReadingRule, Ring
from lxd_agent_harness.lxd.monitor import EntryKind, RingbufMonitor, Timeline
from tests.harness.lxd.test_reading_rules import CASES, Case
from tests.helpers import TEST_DEADLINE, monitored_ring, ring_qemu, run, write_ring

# -- the reading rule's table through QEMU's ring buffer ----------------------------------------


def _prior(case: Case) -> str:
    """A state the case's read must change (or, for an ignored read, must leave alone)."""
    return STOPPED if case.status == STARTED else STARTED


async def _through_qemu(case: Case) -> tuple[bytes, str | None]:
    size = case.ring_size
    async with monitored_ring(size=size, rule=case.rule, read_size=size, poll_interval=60.0) as (
        qemu,
        mon,
    ):
        await write_ring(qemu, "ring", f"{_prior(case)}\n".encode())
        await mon.read_rings()
        assert mon.state() == _prior(case)
        if case.written:
            await write_ring(qemu, "ring", case.written)
        read = await mon.read_rings()
        return read[PORT_NAME], mon.state()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_monitor_reads_qemu_ring_and_concludes_as_the_host(case: Case) -> None:
    read, state = run(_through_qemu(case))
    assert read == case.ring  # QEMU keeps the ring's last bytes, as the table assumes
    assert state == (case.status or _prior(case))


def test_incus_7_3s_instance_state_is_held_until_a_read_without_it_clears_it() -> None:
    state = {"pid": 1, "os_info": {"os": "Debian GNU/Linux", "os_version": "12"}}
    line = json.dumps(state).encode()

    async def scenario() -> list[object]:
        seen: list[object] = []
        async with monitored_ring(
            size=INCUS_RING_SIZE, rule=ReadingRule.INCUS, read_size=INCUS_RING_SIZE
        ) as (qemu, mon):
            for written in (b"STARTED\n" + line + b"\n", b"", b"STARTED\nSTARTED\n"):
                if written:
                    await write_ring(qemu, "ring", written)
                await mon.read_rings()
                seen.append(mon.instance_states.get(PORT_NAME))
            notes = [e.text for e in mon.timeline.entries if e.text.startswith("instance state")]
            seen.append(notes)
        return seen

    with_state, after_empty_read, after_plain, notes = run(scenario())
    assert with_state == state
    assert after_empty_read == state  # a read of nothing leaves it (one piece: no SetState)
    assert after_plain is None  # a plain STARTED read clears it, as Incus 7.3 does
    assert notes == [
        "instance state: Debian GNU/Linux 12",
        "instance state: none (the host shows what it learns by itself)",
    ]


def test_monitor_read_consumes_the_ring() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        async with ring_qemu("ring") as qemu:
            mon = RingbufMonitor(qemu.qmp, [Ring(PORT_NAME, "ring")])
            await write_ring(qemu, "ring", b"STARTED\n")
            first = await mon.read_rings()
            second = await mon.read_rings()
            return first[PORT_NAME], second[PORT_NAME]

    assert run(scenario()) == (b"STARTED\n", b"")


# -- when the monitor reads ---------------------------------------------------------------------


def test_qmp_event_triggers_a_read_without_waiting_for_the_timer() -> None:
    async def scenario() -> float:
        # Paused QEMU: `cont` makes it emit RESUME, standing in for a guest's VSERPORT_CHANGE.
        async with ring_qemu("ring", paused=True) as qemu, RingbufMonitor(
            qemu.qmp, [Ring(PORT_NAME, "ring")], poll_interval=600.0
        ) as mon:
            await write_ring(qemu, "ring", b"STARTED\n")
            await qemu.qmp.execute("cont")
            entry = await mon.wait_for(STARTED, port=PORT_NAME, timeout=5.0)
            kinds = [(e.kind, e.text.split()[0]) for e in mon.timeline.entries]
            assert (EntryKind.EVENT, "RESUME") in kinds
            assert any(
                e.kind is EntryKind.READ and e.trigger == "RESUME" for e in mon.timeline.entries
            )
            return entry.seconds

    assert run(scenario()) < 5.0


def test_timer_reads_when_no_event_comes() -> None:
    async def scenario() -> str:
        async with monitored_ring(poll_interval=0.1) as (qemu, mon):
            await write_ring(qemu, "ring", b"STOPPED\n")
            entry = await mon.wait_for(STOPPED, timeout=5.0)
            read = [e for e in mon.timeline.entries if e.kind is EntryKind.READ]
            assert read[-1].trigger == "idle 0.1 s"
            assert read[-1].render().endswith("[idle 0.1 s]")
            return entry.text

    assert run(scenario()) == f"unknown -> {STOPPED}"


def test_every_qmp_event_whatever_its_type_sets_off_a_read_named_after_it() -> None:
    """LXD's host reads after any QMP event, not only VSERPORT_CHANGE (facts §1)."""

    async def scenario() -> list[tuple[str | None, str | None]]:
        async with monitored_ring(poll_interval=600.0) as (qemu, mon):
            await write_ring(qemu, "ring", b"STARTED\n")
            await qemu.qmp.execute("stop")  # QEMU emits STOP
            await mon.wait_for(STARTED, timeout=5.0)
            await write_ring(qemu, "ring", b"STOPPED\n")
            await qemu.qmp.execute("cont")  # QEMU emits RESUME
            await mon.wait_for(STOPPED, timeout=5.0)
            await write_ring(qemu, "ring", b"CONNECTED\n")
            await mon.read_rings("guest off")  # a caller's own reason
            return [(e.trigger, e.port) for e in mon.timeline.entries if e.kind is EntryKind.READ]

    assert run(scenario()) == [("STOP", PORT_NAME), ("RESUME", PORT_NAME), ("guest off", PORT_NAME)]


def test_the_first_read_is_at_start_and_the_idle_read_comes_after_lxds_10_s() -> None:
    assert monitor_module.DEFAULT_POLL_SECONDS == 10.0

    async def scenario() -> list[str | None]:
        async with ring_qemu("ring") as qemu:
            await write_ring(qemu, "ring", b"STARTED\n")
            async with RingbufMonitor(qemu.qmp, [Ring(PORT_NAME, "ring")]) as mon:
                return [e.trigger for e in mon.timeline.entries if e.kind is EntryKind.READ]

    assert run(scenario()) == ["start"]


def test_initial_read_sees_what_was_written_before_the_monitor_started() -> None:
    async def scenario() -> str | None:
        async with ring_qemu("ring") as qemu:
            await write_ring(qemu, "ring", b"STARTED\n")
            async with RingbufMonitor(
                qemu.qmp, [Ring(PORT_NAME, "ring")], poll_interval=600.0
            ) as mon:
                return mon.state(PORT_NAME)

    assert run(scenario()) == STARTED


def test_wait_for_timeout_says_what_and_shows_the_timeline() -> None:
    async def scenario() -> None:
        async with monitored_ring(poll_interval=600.0) as (qemu, mon):
            mon.note("QEMU started")
            await write_ring(qemu, "ring", b"CONNECTED\n")
            await mon.read_rings()
            await mon.wait_for(STARTED, port=PORT_NAME, timeout=0.3)

    with pytest.raises(MonitorTimeout) as caught:
        run(scenario())
    message = str(caught.value)
    assert f"no {STARTED} on {PORT_NAME} within 0.3 s" in message
    assert "\n" not in message and "CONNECTED" not in message  # the timeline is a field
    timeline = caught.value.timeline
    assert any(line.endswith("note   QEMU started") for line in timeline), timeline
    assert any("'CONNECTED\\n' (no change)" in line for line in timeline), timeline


def test_wait_for_rejects_a_port_without_ring_and_an_unknown_state() -> None:
    async def scenario(port: str, status: str) -> None:
        async with monitored_ring() as (_, mon):
            await mon.wait_for(status, port=port, timeout=1.0)

    with pytest.raises(MonitorError, match="has no ring buffer here"):
        run(scenario(LEGACY_PORT_NAME, STARTED))
    with pytest.raises(MonitorError, match="cannot wait for 'CONNECTED'"):
        run(scenario(PORT_NAME, CONNECTED))


def test_bridged_rings_are_read_together_and_kept_apart() -> None:
    async def scenario() -> None:
        ids = [ring.chardev_id for ring in BRIDGED.rings]
        async with ring_qemu(*ids) as qemu, RingbufMonitor(
            qemu.qmp, BRIDGED.rings, poll_interval=0.1
        ) as mon:
            legacy = BRIDGED.ring_for(LEGACY_PORT_NAME).chardev_id
            await write_ring(qemu, legacy, b"STARTED\n")
            entry = await mon.wait_for(STARTED, timeout=5.0)  # either ring
            assert entry.port == LEGACY_PORT_NAME
            assert mon.states == {PORT_NAME: None, LEGACY_PORT_NAME: STARTED}
            assert mon.state() == STARTED  # the latest any ring said
            await write_ring(qemu, BRIDGED.ring_for(PORT_NAME).chardev_id, b"STOPPED\n")
            await mon.wait_for(STOPPED, port=PORT_NAME, timeout=5.0)
            assert mon.state() == STOPPED
            assert mon.state(LEGACY_PORT_NAME) == STARTED
            with pytest.raises(MonitorTimeout):
                await mon.wait_for(STARTED, port=PORT_NAME, timeout=0.3)

    run(scenario())


def test_monitor_fails_fast_when_qemu_goes_away() -> None:
    async def scenario() -> float:
        async with monitored_ring(poll_interval=0.1) as (qemu, mon):
            await qemu.qmp.execute("quit")
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(MonitorError, match="stopped reading the rings") as caught:
                await mon.wait_for(STARTED, timeout=20.0)
            assert any("monitor stopped" in line for line in caught.value.timeline)
            return loop.time() - start

    assert run(scenario()) < 10.0


def test_a_read_that_qemu_never_answers_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_module, "READ_TIMEOUT", 0.5)

    async def scenario() -> None:
        async with monitored_ring(poll_interval=600.0) as (qemu, mon):
            os.kill(qemu.pid, signal.SIGSTOP)  # wedged: the socket stays open, nothing answers
            try:
                with pytest.raises(MonitorError, match=r"got no answer within 0\.5 s"):
                    await mon.read_rings("test")
            finally:
                os.kill(qemu.pid, signal.SIGCONT)

    run(scenario())


def test_missing_chardev_is_a_clear_error_at_start() -> None:
    async def scenario() -> None:
        async with ring_qemu("ring") as qemu, RingbufMonitor(
            qemu.qmp, [Ring(PORT_NAME, "not-there")]
        ):
            pass

    with pytest.raises(MonitorError, match=r"'not-there'.*not found"):
        run(scenario())


def test_monitor_tasks_are_gone_after_exit_even_on_error() -> None:
    async def scenario() -> None:
        async with ring_qemu("ring") as qemu:
            before = asyncio.all_tasks()
            with pytest.raises(RuntimeError):
                async with RingbufMonitor(qemu.qmp, [Ring(PORT_NAME, "ring")]):
                    assert len(asyncio.all_tasks() - before) >= 2
                    raise RuntimeError("test body failed")
            assert asyncio.all_tasks() - before == set()

    run(scenario())


def test_a_monitor_stopped_early_can_be_left_by_its_context_manager() -> None:
    """A caller may stop the monitor (a host that goes away) before its `async with` ends."""

    async def scenario() -> None:
        async with monitored_ring() as (_qemu, monitor):
            await monitor.stop()
            await monitor.stop()

    run(scenario())


# -- an untrusted guest --------------------------------------------------------------------------


def test_junk_long_lines_and_event_flood_neither_crash_nor_grow_the_monitor() -> None:
    size = 4096

    async def scenario() -> RingbufMonitor:
        async with ring_qemu("ring", size=size, paused=True) as qemu, RingbufMonitor(
            qemu.qmp,
            [Ring(PORT_NAME, "ring")],
            read_size=size,
            poll_interval=600.0,
            max_timeline=50,
            text_limit=40,
        ) as mon:
            for _ in range(200):
                await write_ring(qemu, "ring", os.urandom(size))
                await qemu.qmp.execute("cont")
                await qemu.qmp.execute("stop")
            # Still reading, still right, after the flood.
            await write_ring(qemu, "ring", b"\nSTARTED\n")
            await qemu.qmp.execute("cont")
            await mon.wait_for(STARTED, timeout=10.0)
            return mon

    mon = run(scenario())
    assert len(mon.timeline.entries) <= 50
    assert mon.timeline.dropped > 300  # 400 events + reads went by
    assert mon.reads >= 2  # start, then at least one event-driven read
    assert all(len(entry.text) < 120 for entry in mon.timeline.entries)
    assert "entries left out" in "\n".join(mon.render_timeline())


def test_timeline_keeps_first_and_latest_entries() -> None:
    timeline = Timeline(t0=0.0, max_entries=6)
    for number in range(100):
        timeline.add(EntryKind.NOTE, f"n{number}")
    texts = [entry.text for entry in timeline.entries]
    assert texts == ["n0", "n1", "n2", "n97", "n98", "n99"]
    assert timeline.dropped == 94
    rendered = timeline.render()
    assert "94 entries left out" in rendered[3]
    assert rendered[0].endswith("note   n0")


def test_stopping_a_monitor_twice_is_harmless() -> None:
    # A restarted host reader (Vm.restart_monitor) stops the old monitor, and the VM's exit
    # stops it again.
    async def scenario() -> bool:
        async with monitored_ring(poll_interval=60.0) as (_qemu, mon):
            await mon.stop()
            await mon.stop()
        return True

    assert run(scenario(), TEST_DEADLINE)
