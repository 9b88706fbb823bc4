"""Tests for lxd_agent_harness.qemu.process: QEMU starts with QMP, and is always killed and
reaped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from qemu.qmp.message import Message

from lxd_agent_harness.base.errors import QemuError
from lxd_agent_harness.qemu.process import (
    BoundedEventListener,
    QemuProcess,
    process_exists,
    qemu_version,
    version_number,
)
from tests.helpers import MACHINE_NONE, run


def test_qemu_process_connects_qmp_and_leaves_nothing_behind() -> None:
    async def scenario() -> tuple[int, Path, object]:
        async with QemuProcess(MACHINE_NONE) as qemu:
            assert process_exists(qemu.pid)
            assert qemu.qmp_path.is_socket()
            status = await qemu.qmp.execute("query-status")
            return qemu.pid, qemu.workdir, status

    pid, workdir, status = run(scenario())
    assert isinstance(status, dict) and status["status"] == "running"
    assert not process_exists(pid)
    assert not workdir.exists()


def test_qemu_process_is_reaped_when_the_body_fails() -> None:
    pids: list[int] = []

    async def scenario() -> None:
        async with QemuProcess(MACHINE_NONE) as qemu:
            pids.append(qemu.pid)
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        run(scenario())
    assert pids and not process_exists(pids[0])


def test_qemu_process_is_reaped_when_its_task_is_cancelled() -> None:
    pids: list[int] = []

    async def hold() -> None:
        async with QemuProcess(MACHINE_NONE) as qemu:
            pids.append(qemu.pid)
            await asyncio.sleep(3600)

    async def scenario() -> None:
        task = asyncio.ensure_future(hold())
        while not pids:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert not process_exists(pids[0])


def test_qemu_that_exits_at_start_reports_its_own_message() -> None:
    async def scenario() -> None:
        async with QemuProcess([*MACHINE_NONE, "-chardev", "ringbuf,id=r,size=3"]):
            pass

    with pytest.raises(QemuError, match=r"exited with status 1 before QMP was ready") as caught:
        run(scenario())
    # QEMU's words are in the field, line by line, and not glued onto the message.
    assert any("must be power of two" in line for line in caught.value.output)
    assert "power of two" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_qemu_binary_says_to_run_make_setup() -> None:
    async def scenario() -> None:
        async with QemuProcess(MACHINE_NONE, binary="qemu-system-does-not-exist"):
            pass

    with pytest.raises(QemuError, match="not found on PATH; install Debian's qemu-system-x86"):
        run(scenario())


def test_wait_returns_the_exit_status_after_quit() -> None:
    async def scenario() -> int:
        async with QemuProcess(MACHINE_NONE) as qemu:
            with pytest.raises(QemuError, match=r"still running after 0\.1 s"):
                await qemu.wait(timeout=0.1)
            await qemu.qmp.execute("quit")
            return await qemu.wait(timeout=10.0)

    assert run(scenario()) == 0


def test_bounded_event_listener_keeps_only_the_latest_events() -> None:
    async def scenario() -> BoundedEventListener:
        listener = BoundedEventListener(maxlen=10)
        for number in range(1000):
            await listener.put(Message({"event": "VSERPORT_CHANGE", "data": {"n": number}}))
        first = await listener.get()
        assert first["data"] == {"n": 990}
        return listener

    listener = run(scenario())
    assert listener.dropped == 990
    assert len(listener.history) == 10
    assert len(listener.clear()) == 9
    assert listener.empty()


def test_default_qmp_listener_is_bounded() -> None:
    async def scenario() -> None:
        async with QemuProcess([*MACHINE_NONE, "-S"], event_backlog=5) as qemu:
            assert isinstance(qemu.qmp.events, BoundedEventListener)
            for _ in range(20):
                await qemu.qmp.execute("cont")
                await qemu.qmp.execute("stop")
            await asyncio.sleep(0.2)
            assert len(qemu.qmp.events.history) <= 5
            assert qemu.qmp.events.dropped > 0

    run(scenario())


def test_the_installed_qemu_says_a_version_we_can_read() -> None:
    line = qemu_version()
    assert line.startswith("QEMU emulator version "), line
    assert version_number(line) is not None


@pytest.mark.parametrize(
    ("line", "number"),
    [
        ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", (7, 2)),
        ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0)),
        ("QEMU emulator version 8.1.0", (8, 1)),
        ("", None),
        ("qemu-system-x86_64: not a version line", None),
    ],
)
def test_version_numbers_are_read_from_qemus_version_line(
    line: str, number: tuple[int, int] | None
) -> None:
    assert version_number(line) == number
