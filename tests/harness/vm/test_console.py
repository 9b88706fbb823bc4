"""Tests for lxd_agent_harness.vm.console: the serial console on a pty, without a guest."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import socket
import time
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import GuestPanicked, VmError
from lxd_agent_harness.vm.console import (
    KERNEL_OOPS,
    KERNEL_PANIC,
    LOGIN_PROMPT,
    ConsoleShell,
    NoAutologin,
    SerialConsole,
    UnixSocketPort,
)


def test_a_console_wait_that_times_out_carries_the_console_tail(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log") as console:
            os.write(master, b"Welcome to Debian\r\n\x1b[1mlast line\x1b[0m\r\n")

            async def wait() -> None:
                await console.wait_for(re.compile(rb"login: "), 0.5, what="a login prompt")

            with pytest.raises(VmError, match=r"waited 0\.5 s for .a login prompt.") as caught:
                asyncio.run(wait())
    finally:
        os.close(master)
        os.close(slave)
    assert caught.value.console_tail[-2:] == ["Welcome to Debian", "last line"]
    assert "last line" not in str(caught.value)
    assert (tmp_path / "console.log").read_bytes().startswith(b"Welcome to Debian")


def test_a_login_prompt_without_autologin_says_what_running_commands_needs(
    tmp_path: Path,
) -> None:
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log") as console:
            os.write(master, b"Debian GNU/Linux 12 guest ttyS0\r\n\r\nguest login: ")
            shell = ConsoleShell(console, lambda _note: None)
            with pytest.raises(NoAutologin) as caught:
                asyncio.run(shell.login(0.5))
            restored = ConsoleShell(console, lambda _note: None, logged_in=True)
            restored.send("true")  # a restored guest's shell takes commands at once
            assert os.read(master, 100).endswith(b"true\n")
    finally:
        os.close(master)
        os.close(slave)
    assert caught.value.console_tail[-1].strip() == "guest login:"


def test_a_console_attached_after_the_autologin_asks_the_shell_for_a_prompt(
    tmp_path: Path,
) -> None:
    """The shell's prompt went out before anyone read the console: only a newline typed into
    it brings another, and a console attached from the start types nothing before it."""
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log") as console:
            early = ConsoleShell(console, lambda _note: None)
            with pytest.raises(VmError):
                asyncio.run(early.login(0.3))
            late = ConsoleShell(console, lambda _note: None)

            async def shell_answers_the_newline() -> None:
                login = asyncio.ensure_future(late.login(5.0, attached_late=True))
                typed = await asyncio.to_thread(os.read, master, 100)
                assert typed == b"\n"  # nothing else was typed before the prompt came
                os.write(master, b"root@guest:~# ")
                # The shell's answer to the command that makes it quiet: its end marker.
                command = b""
                while not command.endswith(b"\n"):
                    command += await asyncio.to_thread(os.read, master, 1000)
                token = re.search(rb'"\$\?" ([0-9a-f]+)\n$', command)
                assert token is not None, command
                os.write(master, b"\n@@LXDH:0:" + token.group(1) + b"@@\n")
                await login

            asyncio.run(shell_answers_the_newline())
    finally:
        os.close(master)
        os.close(slave)


def test_the_last_match_of_a_pattern_is_found_with_its_groups(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log") as console:
            os.write(master, b"job (5s / 1min)\r\njob (17s / 1min)\r\nlogin: ")
            pattern = re.compile(rb"job \((\d+)s / ")
            deadline = time.monotonic() + 5
            while console.last_groups(pattern) != (b"17",) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert console.last_groups(pattern) == (b"17",)
            assert console.last_groups(re.compile(rb"absent")) is None
    finally:
        os.close(master)
        os.close(slave)


# The console of the trixie guest that died in CI under QEMU 7.2 (shortened).
PANIC_CONSOLE = (
    b"[    1.260610] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
    b"[    1.260620] RIP: 0010:hrtimer_start_range_ns+0x1c6/0x430\r\n"
    b"[    1.261259] ---[ end trace 0000000000000000 ]---\r\n"
    b"[    1.261484] Kernel panic - not syncing: Fatal exception in interrupt\r\n"
)


def test_a_kernel_panic_ends_a_console_wait_at_once_and_names_the_oops(tmp_path: Path) -> None:
    seen: list[str] = []
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log", seen.append) as console:
            # The panic's line in two writes: only a whole line counts.
            os.write(master, PANIC_CONSOLE[:-20])
            time.sleep(0.3)
            assert console.panicked() is None
            os.write(master, PANIC_CONSOLE[-20:])

            async def wait() -> None:
                # A timeout would be a plain VmError, after 60 s.
                with pytest.raises(GuestPanicked) as caught:
                    await console.wait_for(re.compile(rb"login: "), 60, what="a login prompt")
                assert caught.value.panic == "Fatal exception in interrupt"
                assert caught.value.oops == "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
                assert caught.value.console_tail[-1].endswith("Fatal exception in interrupt")

            asyncio.run(wait())
    finally:
        os.close(master)
        os.close(slave)
    assert seen == ["kernel panic: Fatal exception in interrupt"]


def test_a_panic_without_an_oops_line_before_it_has_an_empty_oops(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log") as console:
            os.write(master, b"[    0.9] Kernel panic - not syncing: VFS: Unable to mount root\r\n")
            deadline = time.monotonic() + 5
            while console.panicked() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(GuestPanicked) as caught:
                console.raise_if_panicked()
    finally:
        os.close(master)
        os.close(slave)
    assert caught.value.panic == "VFS: Unable to mount root" and caught.value.oops == ""


def test_a_panic_keeps_its_line_in_the_tail_however_long_the_trace_after_it(
    tmp_path: Path,
) -> None:
    """A sysrq crash prints its panic line first and its trace after: the error, made after the
    trace has come, still shows the panic line (seen: a 1-vCPU guest's 40 trace lines)."""
    trace = b"".join(b"[   21.16] frame %d+0x16/0x20\r\n" % n for n in range(60))
    master, slave = pty.openpty()
    try:
        with SerialConsole(os.ttyname(slave), tmp_path / "console.log") as console:
            os.write(master, b"[   21.15] Kernel panic - not syncing: sysrq triggered crash\r\n")
            os.write(master, trace + b"[   21.19] ---[ end Kernel panic ]---\r\n")
            deadline = time.monotonic() + 5
            while "end Kernel panic" not in console.tail() and time.monotonic() < deadline:
                time.sleep(0.05)
            panic = console.panicked()
    finally:
        os.close(master)
        os.close(slave)
    assert panic is not None and panic.panic == "sysrq triggered crash"
    assert any("sysrq triggered crash" in line for line in panic.console_tail)
    assert "frame 0+" in panic.console_tail[-30]  # and the trace after it, up to 30 lines


@pytest.mark.parametrize(
    "line",
    [
        b"---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---",
        b"Dec 05 01:02:03 guest kernel: Kernel panic - not syncing: an old one, in the journal",
        b"root@guest:~# echo 'Kernel panic - not syncing: typed'",
    ],
)
def test_only_the_kernels_own_panic_line_counts(line: bytes) -> None:
    assert KERNEL_PANIC.search(b"[    1.0] booting\r\n" + line + b"\r\n") is None
    own = b"[    1.261484] Kernel panic - not syncing: Fatal exception\r\n"
    assert KERNEL_PANIC.search(own) is not None


@pytest.mark.parametrize(
    "oops",
    [
        "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
        "int3: 0000 [#1] SMP NOPTI",
        "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
        "Internal error: Oops: 0000000096000004 [#1] PREEMPT SMP",
        "kernel BUG at mm/slub.c:42!",
        "BUG: kernel NULL pointer dereference, address: 0000000000000000",
    ],
)
def test_the_first_oops_line_is_read_in_the_kernels_several_forms(oops: str) -> None:
    found = KERNEL_OOPS.search(b"[    1.260610] " + oops.encode() + b"\r\n")
    assert found is not None and found.group(1).decode() == oops


def test_a_console_served_on_a_unix_socket_is_read_and_written_like_a_pty(
    short_tmp_path: Path,
) -> None:
    """What a daemon's VM offers (LXD's `qemu.console`): QEMU serves the console on a socket."""
    path = short_tmp_path / "qemu.console"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    async def talk() -> bytes:
        opener = lambda: UnixSocketPort(str(path))  # noqa: E731
        with SerialConsole(str(path), short_tmp_path / "log", opener=opener) as console:
            guest, _ = server.accept()
            guest.sendall(b"Debian GNU/Linux 12 vm ttyS0\r\n\r\nvm login: ")
            await console.wait_for(LOGIN_PROMPT, 5, what="the login prompt")
            console.write("root\n")
            guest.settimeout(5)
            typed = guest.recv(64)
            guest.close()
            return typed

    assert asyncio.run(talk()) == b"root\n"
    assert (short_tmp_path / "log").read_bytes().endswith(b"vm login: ")
    server.close()


def test_no_one_on_the_console_socket_is_a_vm_error(short_tmp_path: Path) -> None:
    none = str(short_tmp_path / "none")
    console = SerialConsole(none, short_tmp_path / "log", opener=lambda: UnixSocketPort(none))
    with pytest.raises(VmError, match="could not open the guest console"), console:
        pass
