"""Tests for base.aio: bounded waits, and a cancellation that lands as the answer does.

The race these guard against hung a CI run: a `wait_for_state` whose STARTED had come cancelled
its QEMU watcher just as a `query-status` answer landed; `asyncio.wait_for` (Python 3.11) gave
the watcher the answer instead of the cancellation, it polled on, and the test waited for it
until its 300 s deadline.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from lxd_agent_harness.base.aio import bounded, wait_event
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.vm import instance as vm
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig


async def cancelled_as_it_completes(inner: asyncio.Future[str], waiter: Any) -> Any:
    """Cancel a task awaiting `waiter` in the same turn of the loop as `inner` gets its result.

    What the task then ended with: the result (the cancellation was lost) or the exception.
    """
    task = asyncio.ensure_future(waiter)
    await asyncio.sleep(0)  # the task is now waiting on `inner`
    inner.set_result("running")
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the cancelled task did not end"
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception() or task.result()


def test_bounded_gives_the_result_or_a_timeout_after_which_the_inner_is_cancelled() -> None:
    async def scenario() -> None:
        assert await bounded(asyncio.sleep(0, result="answer"), 1) == "answer"
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await bounded(never, 0.05)
        await asyncio.sleep(0)
        assert never.cancelled()

    asyncio.run(scenario())


def test_a_cancellation_that_lands_with_the_answer_is_not_lost() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        inner: asyncio.Future[str] = loop.create_future()
        ended = await cancelled_as_it_completes(inner, bounded(inner, 10))
        assert isinstance(ended, asyncio.CancelledError), f"the task ended with {ended!r}"

        event = asyncio.Event()
        waiting = asyncio.ensure_future(wait_event(event, 10))
        await asyncio.sleep(0)
        event.set()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())


def test_a_vm_qmp_command_cancelled_as_qemu_answers_ends_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's `query-status`: cancelled as the answer lands, it must not poll on."""

    async def scenario() -> None:
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        class Qmp:
            async def execute(self, command: str, arguments: object = None) -> str:
                return await answer

        class Qemu:
            qmp = Qmp()
            returncode = None

        config = VmConfig(get_layout("lxd-5.20"), DirectBoot(GuestImage(tmp_path)), Accel.TCG)
        machine = vm.Vm(config)
        monkeypatch.setattr(machine, "_qemu", Qemu())
        ended = await cancelled_as_it_completes(answer, machine.execute("query-status"))
        assert isinstance(ended, asyncio.CancelledError), f"the command ended with {ended!r}"

    asyncio.run(scenario())
