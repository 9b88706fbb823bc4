"""Bounded waits that never lose a cancellation: what the harness uses instead of `wait_for`.

Before Python 3.12, `asyncio.wait_for` swallows a cancellation that arrives in the same turn
of the event loop as its inner result (CPython gh-86296): it returns the result instead, and
the cancelled task carries on. A task that polls QEMU in a loop (`Vm._watch_qemu` asks for the
run state every 0.5 s) then never ends, and whoever cancelled it waits for it forever. Debian
12 has Python 3.11. `asyncio.wait` never takes the caller's cancellation for itself, so both
helpers here are built on it; ruff bans `asyncio.wait_for` in this package (pyproject.toml).

Host side only.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence, TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], timeout: float) -> T:
    """`awaitable`'s result, or `asyncio.TimeoutError` after `timeout` s (it is cancelled then).

    A cancellation of the caller always propagates, and cancels `awaitable` too.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise asyncio.TimeoutError
    return task.result()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` s for `event`; whether it was set."""
    try:
        await bounded(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def in_turn(starts: Sequence[Callable[[], Awaitable[T]]], jobs: int) -> list[T]:
    """Each of `starts` called and awaited, at most `jobs` at a time, in their order; the results
    in that order.

    Made for scenarios whose parts are guests that spend much of their time waiting (a bound
    that runs out, a power-off held): each guest still waits for its own cores (`vm.lock`).
    The first exception cancels the parts still running and propagates.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    turns = asyncio.Semaphore(jobs)
    failed = False

    async def one(start: Callable[[], Awaitable[T]]) -> T:
        nonlocal failed
        async with turns:
            if failed:  # the turn came as a part failed: this one never starts
                raise asyncio.CancelledError
            try:
                return await start()
            except BaseException:
                failed = True
                raise

    tasks = [asyncio.ensure_future(one(start)) for start in starts]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # gather leaves the others running when one fails: no guest outlives the scenario.
        running = [task for task in tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
