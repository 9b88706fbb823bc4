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

from lxd_agent_harness.base.aio import bounded, wait_event


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
