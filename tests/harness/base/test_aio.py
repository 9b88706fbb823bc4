"""Tests for lxd_agent_harness.base.aio: bounded waits, and a cancellation that lands as the answer
does.

The race these guard against hung a CI run: a `wait_for_state` whose STARTED had come cancelled
its QEMU watcher just as a `query-status` answer landed; `asyncio.wait_for` (Python 3.11) gave
the watcher the answer instead of the cancellation, it polled on, and the test waited for it
until its 300 s deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lxd_agent_harness.base.aio import bounded, in_turn, wait_event


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


def test_in_turn_runs_at_most_jobs_at_once_and_keeps_the_order() -> None:
    running: list[int] = []
    most = 0

    def part(n: int) -> Any:
        async def run() -> int:
            nonlocal most
            running.append(n)
            most = max(most, len(running))
            await asyncio.sleep(0.01 * (5 - n))  # the later parts end first
            running.remove(n)
            return n * 10

        return run

    assert asyncio.run(in_turn([part(n) for n in range(5)], jobs=2)) == [0, 10, 20, 30, 40]
    assert most == 2
    assert asyncio.run(in_turn([part(n) for n in range(3)], jobs=1)) == [0, 10, 20]
    assert most == 2 and running == []


def test_in_turn_cancels_the_running_parts_when_one_fails() -> None:
    cancelled: list[int] = []

    def slow(n: int) -> Any:
        async def run() -> int:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(n)
                raise
            return n

        return run

    async def fails() -> int:
        await asyncio.sleep(0.01)
        raise OSError("no disk")

    with pytest.raises(OSError, match="no disk"):
        asyncio.run(in_turn([slow(0), fails, slow(2), slow(3)], jobs=3))
    assert cancelled == [0, 2]  # 3 never started: it waited for its turn


def test_in_turn_wants_at_least_one_job() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(in_turn([], jobs=0))
