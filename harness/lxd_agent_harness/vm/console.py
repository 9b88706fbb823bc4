"""The guest's serial console, read from the host: a log file, milestones, waiting for text.

`SerialConsole` reads the pty QEMU gives the guest's first serial port with pyserial, in a thread,
into a log file (everything) and memory (bounded), notes the boot's milestones as they show, and
lets async callers wait for a pattern and write keystrokes. The patterns of what a boot prints
live here too.

It knows nothing of QEMU, layouts or ring buffers: the VM (`vm.instance`) opens it on the
pty it asked QEMU for. Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Protocol

import serial

from lxd_agent_harness.base.errors import GuestPanicked, VmError

LOGIN_PROMPT = re.compile(rb"login: ")
"""getty's prompt (or the autologin's line that repeats it): the boot got that far."""

# What the console shows at each step of a boot, for the timeline.
CONSOLE_MILESTONES = (
    ("kernel up", re.compile(rb"Linux version \d")),
    ("systemd up", re.compile(rb"Welcome to ")),
    ("login prompt", LOGIN_PROMPT),
)
SHELL_PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")
# The kernel's own line, at the start of a console line (after its printk time, if any): not
# the `---[ end Kernel panic ...` trailer, nor an old panic a command prints (journalctl -k).
KERNEL_PANIC = re.compile(rb"(?m)^(?:\[ *\d+\.\d+\] )?Kernel panic - not syncing: ([^\r\n]*)")
# What the kernel prints first when it dies: `Oops: int3: 0000 [#1] ...` (6.12), `int3: 0000
# [#1] ...` and `general protection fault, ...: 0000 [#1]` (6.1), arm64's `Internal error:
# Oops: 0000000096000004 [#1]`, `BUG: kernel NULL pointer ...`, `kernel BUG at mm/...`.
KERNEL_OOPS = re.compile(
    rb"\] ((?:Oops: |BUG: |kernel BUG at |Internal error: )[^\r\n]*"
    rb"|[^\r\n]*: [0-9a-f]+ \[#1\][^\r\n]*)"
)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")

# A guest can print without end: keep this much of the console in memory (the log has it all).
CONSOLE_MEMORY_BYTES = 4 << 20


class NoAutologin(VmError):
    """The guest's console shows a login prompt and never a root shell: commands cannot run."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    output: str


class UnixSocketPort:
    """A console that QEMU serves on a unix socket (`-chardev socket,server=on`), read and
    written as the reader thread reads a pty: what a daemon's VM offers (LXD's `qemu.console`).
    """

    def __init__(self, path: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.connect(path)
        except OSError as e:
            self._socket.close()
            raise serial.SerialException(f"cannot connect to {path}: {e.strerror}") from None
        self._socket.settimeout(0.1)

    @property
    def in_waiting(self) -> int:
        return 0  # the reader asks for at least one byte and gets what there is

    def read(self, size: int = 1) -> bytes:
        try:
            data = self._socket.recv(max(size, 4096))
        except TimeoutError:
            return b""
        if not data:
            raise OSError("the console socket was closed")
        return data

    def write(self, b: bytes, /) -> int:
        self._socket.sendall(b)
        return len(b)

    def close(self) -> None:
        self._socket.close()


class ConsolePort(Protocol):
    """What the reader thread needs of a console: pyserial's `Serial` has it."""

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, b: bytes, /) -> int | None: ...

    def close(self) -> None: ...


class SerialConsole:
    """The guest's serial console on a pty, read by a thread into a log file and memory.

    A context manager: the reader thread stops and the port closes on exit. `opener`: how to
    open a console that is not a pty (`device` names it in errors): a unix socket QEMU serves
    it on (`UnixSocketPort`), a daemon's console API (`host.websocket`).
    """

    def __init__(
        self,
        device: str,
        log_path: Path,
        on_milestone: Callable[[str], None] | None = None,
        opener: Callable[[], ConsolePort] | None = None,
    ) -> None:
        self.device = device
        self.opener = opener
        self.log_path = log_path
        self._on_milestone = on_milestone
        self._port: ConsolePort | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._data = bytearray()
        self._base = 0  # offset of _data[0] in everything ever received
        self._pending_milestones = list(CONSOLE_MILESTONES)
        self.milestones: dict[str, float] = {}
        self._panic: tuple[str, str] | None = None  # (reason, oops) once the kernel panicked
        self._panic_end = 0  # where the panic line ends, in everything ever received

    def __enter__(self) -> SerialConsole:
        try:
            if self.opener is not None:
                self._port = self.opener()
            else:
                self._port = serial.Serial(self.device, baudrate=115200, timeout=0.1)
        except serial.SerialException as e:
            raise VmError(f"could not open the guest console {self.device}: {e}") from None
        self._thread = threading.Thread(target=self._read_loop, name="console", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and close the pty (a person can then attach to it). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._port is not None:
            self._port.close()

    @property
    def received(self) -> int:
        """Bytes received so far: an offset for `wait_for(..., start=)`."""
        with self._lock:
            return self._base + len(self._data)

    def _read_loop(self) -> None:
        assert self._port is not None
        with self.log_path.open("ab") as log:
            while not self._stop.is_set():
                try:
                    chunk = self._port.read(max(1, self._port.in_waiting))
                except (serial.SerialException, OSError):
                    return  # QEMU went away and closed the pty
                if not chunk:
                    continue
                log.write(chunk)
                log.flush()
                with self._lock:
                    self._data += chunk
                    if len(self._data) > CONSOLE_MEMORY_BYTES:
                        cut = len(self._data) - CONSOLE_MEMORY_BYTES // 2
                        del self._data[:cut]
                        self._base += cut
                    self._check_milestones()
                    if self._panic is None:
                        self._check_panic(len(chunk))

    def _check_milestones(self) -> None:
        # Milestones come in boot order; only the tail of the buffer needs looking at.
        while self._pending_milestones:
            name, pattern = self._pending_milestones[0]
            if not pattern.search(self._data, max(0, len(self._data) - 64 * 1024)):
                return
            self._pending_milestones.pop(0)
            self.milestones[name] = time.monotonic()
            if self._on_milestone is not None:
                self._on_milestone(name)

    def _check_panic(self, new_bytes: int) -> None:
        panic = KERNEL_PANIC.search(self._data, max(0, len(self._data) - new_bytes - 256))
        if panic is None or panic.end() >= len(self._data):
            return  # not yet, or its line still coming
        oops = KERNEL_OOPS.search(self._data, max(0, panic.start() - 64 * 1024), panic.start())
        reason = panic.group(1).decode(errors="replace").strip()
        first = oops.group(1).decode(errors="replace").strip() if oops else ""
        self._panic = (reason, first)
        self._panic_end = self._base + panic.end()
        if self._on_milestone is not None:
            self._on_milestone(f"kernel panic: {reason}")

    def panicked(self) -> GuestPanicked | None:
        """A new `GuestPanicked` with the console around the panic line if the guest's kernel
        panicked, else None."""
        if self._panic is None:
            return None
        reason, oops = self._panic
        return GuestPanicked(
            f"the guest's kernel panicked: {reason}" + (f" (after {oops!r})" if oops else ""),
            panic=reason,
            oops=oops,
            console_tail=self._around_panic(),
        )

    def _around_panic(self, lines: int = 30) -> list[str]:
        """The console's lines up to the panic line and what followed it by now (`lines` each way):
        the kernel's trace goes on after the panic line, and a plain tail taken a moment later
        may have left the panic line behind."""
        with self._lock:
            end = max(0, self._panic_end - self._base)
            before = bytes(self._data[max(0, end - 64 * 1024) : end])
            after = bytes(self._data[end:])

        def text(raw: bytes) -> list[str]:
            return ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace")).splitlines()

        return text(before)[-lines:] + [line for line in text(after) if line][:lines]

    def raise_if_panicked(self) -> None:
        """Raise `panicked()` if there is one."""
        panic = self.panicked()
        if panic is not None:
            raise panic

    def search(self, pattern: re.Pattern[bytes], start: int) -> re.Match[bytes] | None:
        with self._lock:
            return pattern.search(self._data, max(0, start - self._base))

    def last_groups(self, pattern: re.Pattern[bytes]) -> tuple[bytes | None, ...] | None:
        """The groups of `pattern`'s last match in what is kept of the console, or None."""
        with self._lock:
            last = None
            for last in pattern.finditer(self._data):  # noqa: B007 (the last one is wanted)
                pass
            return None if last is None else tuple(bytes(g) if g else g for g in last.groups())

    def text_between(self, start: int, end: int) -> str:
        with self._lock:
            raw = bytes(self._data[max(0, start - self._base) : max(0, end - self._base)])
        return ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))

    async def wait_for(
        self, pattern: re.Pattern[bytes], timeout: float, start: int = 0, what: str = ""
    ) -> tuple[int, int]:
        """Wait until `pattern` shows after offset `start`; its (start, end) offsets."""
        deadline = time.monotonic() + timeout
        while True:
            match = self.search(pattern, start)
            if match is not None:
                return self._base + match.start(), self._base + match.end()
            self.raise_if_panicked()
            if time.monotonic() > deadline:
                raise VmError(
                    f"waited {timeout:g} s for {what or pattern.pattern!r} on the guest console "
                    "and did not see it; see the console tail",
                    console_tail=self.tail_lines(),
                )
            if self._thread is not None and not self._thread.is_alive():
                raise VmError(
                    f"the guest console closed while waiting for {what or pattern.pattern!r} "
                    "(QEMU exited?)",
                    console_tail=self.tail_lines(),
                )
            await asyncio.sleep(0.05)

    def write(self, text: str) -> None:
        assert self._port is not None
        self._port.write(text.encode())

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.tail_lines(lines))

    def tail_lines(self, lines: int = 30) -> list[str]:
        """The console's last `lines` lines, escape sequences removed."""
        with self._lock:
            raw = bytes(self._data[-64 * 1024 :])
        text = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))
        return text.splitlines()[-lines:]


class ConsoleShell:
    """The root shell the guest's autologin gives on the console: log in once, run commands.

    Each command's end is found by a marker its own shell prints, with its exit status.
    `note` records the login in the caller's timeline.
    """

    def __init__(
        self, console: SerialConsole, note: Callable[[str], None], logged_in: bool = False
    ) -> None:
        self.console = console
        self._note = note
        self._logged_in = logged_in
        self._prompt_after = 0  # a console offset: the prompt to log in at comes after it

    async def login(self, timeout: float, attached_late: bool = False) -> None:
        """Wait for the autologin shell on the console and make it quiet and parseable.

        `attached_late`: the console was opened after the guest may have logged in (a daemon's
        console, opened after its upgrade or the agent's STARTED): the prompt went to no one, so
        a newline asks the shell for another (before getty runs, agetty discards it).
        """
        if self._logged_in:
            return
        if attached_late:
            self.console.write("\n")
        try:
            await self.console.wait_for(
                SHELL_PROMPT, timeout, start=self._prompt_after, what="the root shell prompt"
            )
        except GuestPanicked:
            raise
        except VmError as e:
            if self.console.search(LOGIN_PROMPT, self._prompt_after) is None:
                raise
            raise NoAutologin(
                f"the guest's console asks for a login and no root shell came in {timeout:g} s: "
                "running commands needs a root autologin on ttyS0 (the harness's images and "
                "cloud disks have one; for another image, add a serial-getty drop-in with "
                "`agetty --autologin root`)",
                console_tail=e.console_tail,
            ) from None
        self._logged_in = True
        # No echo, no prompt, no colours, no pager, no kernel messages in the output.
        await self.run(
            "stty -echo; PS1=''; PS2=''; export TERM=dumb SYSTEMD_COLORS=0 SYSTEMD_PAGER='' "
            "PAGER=cat; bind 'set enable-bracketed-paste off' 2>/dev/null; dmesg -n 1",
            timeout=30,
        )
        self._note("logged in on the console")

    def send(self, command: str) -> None:
        """Type `command` into the logged-in shell without waiting for it (e.g. `reboot`)."""
        if not self._logged_in:
            raise VmError(f"cannot send `{command}`: not logged in on the console yet")
        self.console.write(f"{command}\n")

    def logged_out(self) -> None:
        """The guest is rebooting: the next `login` waits for a prompt that comes after now."""
        self._logged_in = False
        self._prompt_after = self.console.received

    async def run(self, command: str, timeout: float) -> CommandResult:
        """Run a shell command in the logged-in shell; its status and output."""
        if not self._logged_in:
            raise VmError(f"cannot run `{command}`: not logged in on the console yet")
        token = secrets.token_hex(6)
        # The marker is assembled by the guest's shell, so the typed (echoed) line never
        # matches it: only the command's end does.
        marker = re.compile(rb"@@LXDH:(\d+):" + token.encode() + rb"@@")
        start = self.console.received
        self.console.write(f"{command}; printf '\\n%s:%s:%s@@\\n' '@@LXDH' \"$?\" {token}\n")
        begin, _end = await self.console.wait_for(
            marker, timeout, start=start, what=f"the end of `{command}`"
        )
        match = self.console.search(marker, begin)
        assert match is not None
        output = self.console.text_between(start, begin)
        lines = output.split("\n")
        if lines and f"{token}" in lines[0]:
            lines = lines[1:]  # the echoed command line, before `stty -echo` took effect
        return CommandResult(command, int(match.group(1)), "\n".join(lines).strip("\n"))
