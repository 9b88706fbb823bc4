"""Run one QEMU process with a QMP connection, and always clean it up.

`QemuProcess` is an async context manager: it makes a private temporary directory, listens on a
QMP unix socket there (QEMU connects to us, so there is no race on the socket appearing), starts
QEMU with the caller's arguments, hands back a connected `qemu.qmp.QMPClient`, and on every exit
path (an exception, a failed test, Ctrl-C, task cancellation) kills QEMU, waits for it and
removes the directory. QEMU also gets SIGKILL from the kernel if this Python process dies
(`PR_SET_PDEATHSIG`), so no QEMU outlives the harness.

It knows nothing of layouts, guests or ring buffers: callers (the monitor, the VM launcher, the
tests) bring their own arguments. Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Sequence

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.events import EventFilter, EventNames
from qemu.qmp.message import Message

from lxd_agent_harness.base.errors import QemuError, VmError
from lxd_agent_harness.base.sockets import socket_base

DEFAULT_QEMU_BINARY = "qemu-system-x86_64"

# QMP events QEMU can emit are unbounded (a guest can open and close a port in a loop):
# keep only this many pending/past events per listener.
DEFAULT_EVENT_BACKLOG = 1000

# QEMU's last output lines a `QemuError` carries: its own error and what led to it.
OUTPUT_LINES = 10

_PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=None)
def qemu_version(binary: str = DEFAULT_QEMU_BINARY) -> str:
    """QEMU's own version line (`QEMU emulator version 10.0.2 (Debian ...)`)."""
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise VmError(
            f"could not ask {binary} for its version ({e}); install Debian's qemu-system-x86"
        ) from None
    return done.stdout.splitlines()[0] if done.stdout else ""


def version_number(version_line: str) -> tuple[int, int] | None:
    """(major, minor) from QEMU's version line; None if the line does not say."""
    match = re.search(r"version (\d+)\.(\d+)", version_line)
    return (int(match.group(1)), int(match.group(2))) if match else None


class BoundedEventListener(EventListener):
    """An `EventListener` that keeps at most `maxlen` pending and `maxlen` past events.

    `qemu.qmp`'s own listener keeps every event it ever saw in `history` and queues without
    limit; an untrusted guest can make QEMU emit events without end. When full, the oldest
    event is dropped and `dropped` counts it.
    """

    def __init__(
        self,
        names: EventNames = None,
        event_filter: EventFilter | None = None,
        maxlen: int = DEFAULT_EVENT_BACKLOG,
    ) -> None:
        super().__init__(names, event_filter)
        if maxlen < 1:
            raise ValueError(f"an event listener keeps at least 1 event, not {maxlen}")
        self._maxlen = maxlen
        self.dropped = 0
        self._pending: collections.deque[Message] = collections.deque()
        self._past: collections.deque[Message] = collections.deque(maxlen=maxlen)
        self._wakeup = asyncio.Event()

    @property
    def maxlen(self) -> int:
        """How many pending and how many past events are kept (fixed at creation)."""
        return self._maxlen

    @property
    def history(self) -> tuple[Message, ...]:
        return tuple(self._past)

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        self._past.append(event)
        if len(self._pending) >= self._maxlen:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(event)
        self._wakeup.set()

    async def get(self) -> Message:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._pending.popleft()

    def empty(self) -> bool:
        return not self._pending

    def clear(self) -> list[Message]:
        cleared = list(self._pending)
        self._pending.clear()
        return cleared


def bounded_qmp_client(name: str = "qemu", backlog: int = DEFAULT_EVENT_BACKLOG) -> QMPClient:
    """A `QMPClient` whose default `events` listener is a `BoundedEventListener`."""
    client = QMPClient(name)
    unbounded = client.events
    # remove_listener refuses to remove the *current* default, so swap it in first.
    client.events = BoundedEventListener(maxlen=backlog)
    client.remove_listener(unbounded)
    client.register_listener(client.events)
    return client


def _die_with_parent() -> None:
    """Runs in the forked child before exec: the kernel kills QEMU if the harness dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuProcess:
    """An async context manager around one QEMU process and its QMP client.

    ``args`` are QEMU's arguments without the binary and without any QMP/monitor option (this
    class adds `-chardev socket,...` and `-mon ...,mode=control` for its own QMP socket).
    Use::

        async with QemuProcess(["-machine", "none", "-nodefaults", "-display", "none"]) as qemu:
            await qemu.qmp.execute("query-status")

    Attributes, valid inside the ``async with``: `qmp` (connected `QMPClient`), `workdir` (the
    private temporary directory, removed afterwards: put sockets, overlays, logs there),
    `qmp_path`, `pid`, `argv`. QEMU's stdout and stderr go to `workdir`/qemu.log;
    `output_tail()` reads it (errors and `char device redirected to ...` lines land there).
    `qmp.events` (the client's default listener) keeps only the last `event_backlog` events;
    register your own listener (a `BoundedEventListener` if a guest can flood it) to wait for one.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        binary: str = DEFAULT_QEMU_BINARY,
        name: str = "qemu",
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        event_backlog: int = DEFAULT_EVENT_BACKLOG,
    ) -> None:
        self.args = list(args)
        self.binary = binary
        self.name = name
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.qmp = bounded_qmp_client(name, event_backlog)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- paths and state -------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._tmp is None:
            raise QemuError(f"{self.name}: workdir used outside `async with QemuProcess(...)`")
        return Path(self._tmp.name)

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def argv(self) -> list[str]:
        """The full command line QEMU runs with (for printing and for `--keep`)."""
        return [
            self.binary,
            *self.args,
            "-chardev",
            f"socket,id=harness-qmp,path={self.qmp_path}",
            "-mon",
            "chardev=harness-qmp,mode=control",
        ]

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise QemuError(f"{self.name}: not started; use `async with QemuProcess(...)`")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs (or before it started)."""
        return None if self._proc is None else self._proc.poll()

    def output_tail(self, lines: int = 20) -> list[str]:
        """The last `lines` lines QEMU printed (stdout and stderr), oldest first."""
        try:
            text = self.log_path.read_bytes().decode("utf-8", errors="replace")
        except (OSError, QemuError):
            return []
        return text.splitlines()[-lines:]

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> QemuProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start QEMU and connect QMP. Prefer `async with`, which always calls `stop()`."""
        if shutil.which(self.binary) is None:
            raise QemuError(
                f"{self.binary} not found on PATH; install Debian's qemu-system-x86 "
                "(in a clone of the project: `make setup`) and try again"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="lxd-agent-qemu-", dir=socket_base())
        await self.qmp.start_server(str(self.qmp_path))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        accept = asyncio.ensure_future(self.qmp.accept())
        exited = asyncio.ensure_future(self._wait_exit())
        try:
            done, _ = await asyncio.wait(
                {accept, exited},
                timeout=self.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (accept, exited):
                task.cancel()
            # A cancelled accept() can still end in an error inside qemu.qmp; collect it here
            # so asyncio does not log "exception was never retrieved".
            await asyncio.gather(accept, exited, return_exceptions=True)
        if accept in done and accept.exception() is None:
            return
        if accept in done:
            # QEMU connects to QMP before it checks its -device options, so a refused option
            # shows up as a dropped connection: give it a moment to exit with its message.
            await self._wait_exit(timeout=1.0)
        output = self.output_tail(OUTPUT_LINES)
        if self.returncode is not None:
            raise QemuError(
                f"{self.name}: {self.binary} exited with status {self.returncode} before "
                "QMP was ready; its output says why",
                output=output,
                exit_status=self.returncode,
            )
        if accept in done:
            raise QemuError(
                f"{self.name}: QMP connection to {self.binary} failed ({accept.exception()}); "
                "see its output",
                output=output,
            )
        raise QemuError(
            f"{self.name}: {self.binary} did not connect to QMP within {self.start_timeout} s; "
            "is the machine overloaded? See its output",
            output=output,
        )

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit on its own; its status. A `QemuError` after `timeout` s."""
        code = await self._wait_exit(timeout)
        if code is None:
            raise QemuError(f"{self.name}: QEMU (pid {self.pid}) still running after {timeout} s")
        return code

    async def stop(self) -> None:
        """Disconnect QMP, stop QEMU (SIGTERM, then SIGKILL), wait for it, remove workdir.

        Safe to call more than once, and from any state. The kill and the wait happen even if
        this coroutine is cancelled part-way.
        """
        try:
            # disconnect() re-raises what ended the reader (EOFError when QEMU has exited, e.g.
            # after a guest power-off): nothing to act on while tearing down.
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                await self._wait_exit(self.stop_timeout)
        finally:
            # Synchronous on purpose: runs even when the awaits above were cancelled.
            if self._proc is not None:
                if self._proc.poll() is None:
                    self._proc.kill()
                self._proc.wait()
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def _wait_exit(self, timeout: float | None = None) -> int | None:
        """QEMU's exit status, or None if it still runs after `timeout` s.

        Polls rather than using `asyncio.wait_for`, which before Python 3.12 can swallow a
        cancellation that arrives as its inner wait ends.
        """
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            code = self._proc.poll()
            if code is not None or (deadline is not None and loop.time() >= deadline):
                return code
            await asyncio.sleep(0.02)


def process_exists(pid: int) -> bool:
    """Whether process `pid` exists (a zombie counts): tests use it to prove QEMU was reaped."""
    return os.path.exists(f"/proc/{pid}")
