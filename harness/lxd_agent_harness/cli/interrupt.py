"""Ctrl-C, SIGTERM and SIGHUP end a harness command the same way: cleaned up, then 128+signum.

A signal becomes an `Interrupted` exception, so every `with`/`async with`/`finally` on the way
out runs: QEMU is reaped, build directories and temporary directories are removed, mounts are
detached. In synchronous code (an image build) the signal handler raises it where the main
thread is; in `run_interruptible` the signal cancels the main task instead (as `asyncio.run`
does for Ctrl-C), so async context managers close in order, and `Interrupted` is raised once the
loop is done. Only the first signal counts: later ones are ignored while the cleanup runs
(a person who must stop it anyway has SIGKILL, and QEMU dies with the harness).

Exit status: 128 + the signal's number, the shell's convention: 130 for Ctrl-C (SIGINT),
143 for SIGTERM, 129 for SIGHUP. Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from types import FrameType
from typing import Any, Coroutine, Iterator, TypeVar

T = TypeVar("T")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """The harness got `signum`; raised where it was, after which everything unwinds.

    A `KeyboardInterrupt`, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class _Handlers:
    """The signal handlers of one command: the first signal raises, later ones are ignored."""

    def __init__(self) -> None:
        self.received: int | None = None

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def install(self) -> None:
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self.on_signal)


_current: _Handlers | None = None


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise `Interrupted` (once). The old handlers after."""
    global _current
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    outer, _current = _current, _Handlers()
    _current.install()
    try:
        yield
    finally:
        _current = outer
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_interruptible(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coroutine)`, where a handled signal cancels it and raises `Interrupted`.

    Inside `signals_interrupt()`; elsewhere it is plain `asyncio.run`.
    """
    handlers = _current
    if handlers is None:
        return asyncio.run(coroutine)

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if handlers.received is None:
                handlers.received = signum
                task.cancel()

        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await coroutine
        finally:
            # Taken back before the loop closes: closing it would reset them to the defaults.
            for signum in HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
            handlers.install()

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        if handlers.received is not None:
            raise Interrupted(handlers.received) from None
        raise
    if handlers.received is not None:
        raise Interrupted(handlers.received)  # the coroutine swallowed the cancellation
    return result
