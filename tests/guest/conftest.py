"""Stand-ins for virtio ports, and the agent started as systemd starts it, for the guest's tests.

A live port is a pty: its slave is a character device that is writable while the master is
open, and the test reads what the agent wrote from the master. A dead port is a pty whose
master is closed: the kernel hangs it up, as it does a virtio port with no host backend.

Every agent a test sends signals to is started with the signal state of a service (``start``),
so what it does with them does not depend on how the test run itself was started.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from lxd_agent.guest.ports import PortRoots
from lxd_agent.protocol import STARTED, STOPPED

# The checkout under test: `python -m` puts the working directory first on sys.path, so the
# CLI runs this tree's code even where another checkout is installed in editable mode.
REPO = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "lxd_agent.guest")
# The Debian package's /usr/bin/lxd-agent, here run from this checkout (see LAUNCHER_ENTRY).
LAUNCHER = REPO / "packaging" / "lxd-agent"
# What an unprivileged user in the guest runs into (the tests themselves run as root).
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


class Entry(NamedTuple):
    """One way the agent is started: the command line before its arguments, and the environment."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]


# The two entry points as bare as a guest's: -S, without site, whose start here (this venv's
# editable installs) is not the guest's; the agent needs nothing from site-packages. The
# launcher runs without its -I, which would drop the PYTHONPATH that points it at this tree.
MODULE_ENTRY = Entry("python-m", (sys.executable, "-S", "-m", "lxd_agent.guest"), {})
LAUNCHER_ENTRY = Entry("launcher", (sys.executable, "-S", str(LAUNCHER)), {"PYTHONPATH": str(REPO)})
ENTRIES = (MODULE_ENTRY, LAUNCHER_ENTRY)


def service_signal_state() -> None:
    """What systemd gives a service: the default action for every signal, and none blocked.

    A ``preexec_fn``: it runs in the child between fork and exec, which keeps ignored signals
    and the mask. The test run's own may be anything: one started as a background job of a
    non-interactive shell has SIGINT ignored, and an agent that inherited that would lose a
    SIGINT that comes before it holds its signals, which never happens to the service.
    """
    for signo in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP: always default
            signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def start(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start ARGV in this checkout as systemd would start it (see ``service_signal_state``)."""
    return subprocess.Popen(argv, cwd=REPO, text=True, preexec_fn=service_signal_state, **kwargs)


def run_cli(
    *args: str, timeout: float = 30, wrapper: Sequence[str] = (), **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``lxd-agent ARGS`` from this checkout to the end; fails the test after ``timeout``."""
    return subprocess.run(
        [*wrapper, *CLI, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


class LivePort:
    """A pty pair; the agent writes to ``device``, the test reads lines from the master."""

    # Written by the test itself to mark the end of what the agent wrote (see read_written).
    _END = "-- the test's end of the agent's lines --"

    def __init__(self) -> None:
        self.master, self._slave = pty.openpty()
        # Raw, so "\n" is not turned into "\r\n" on the way through.
        tty.setraw(self._slave)
        self.device = os.ttyname(self._slave)
        self._pending = b""

    def read_lines(self, timeout: float = 0.0) -> list[str]:
        """Every complete line written so far, waiting up to ``timeout`` for the first."""
        poller = select.poll()
        poller.register(self.master, select.POLLIN)
        if poller.poll(int(timeout * 1000)):
            while poller.poll(0):
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        return [line.decode() for line in lines]

    def wait_for(self, line: str, timeout: float) -> list[str]:
        """Read until ``line`` arrives; return all lines read. Fails the test on timeout."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += self.read_lines(timeout=0.1)
            if line in seen:
                return seen
        raise AssertionError(f"{line!r} not written to {self.device} within {timeout} s: {seen}")

    def read_written(self, timeout: float = 10.0) -> list[str]:
        """Exactly what was written and not read yet, once every writer has exited.

        Instead of waiting for lines that may never come: the test writes a line of its own
        through the slave and reads up to it; the pty keeps the order, so everything written
        before comes first. Fails the test if that line is not back within ``timeout``.
        """
        os.write(self._slave, f"{self._END}\n".encode())
        lines = self.wait_for(self._END, timeout)
        return lines[: lines.index(self._END)]

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class DeadPort:
    """A hung-up pty: opening it fails with EIO; an fd opened before the hang-up polls POLLHUP."""

    def __init__(self) -> None:
        master, self.fd = pty.openpty()
        os.close(master)
        # The /dev/pts node goes away with the master; this link still reaches the tty.
        self.device = f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        os.close(self.fd)


class PortTree:
    """A fake /dev and /sys/class/virtio-ports that the agent is pointed at."""

    def __init__(self, root: Path) -> None:
        self.dev_dir = root / "dev"
        self.dev_root = self.dev_dir / "virtio-ports"
        self.sys_root = root / "sys" / "class" / "virtio-ports"
        for d in (self.dev_root, self.sys_root):
            d.mkdir(parents=True)
        self.roots = PortRoots(str(self.dev_root), str(self.sys_root), str(self.dev_dir))

    def link(self, name: str, target: str | Path) -> Path:
        """What udev does: /dev/virtio-ports/NAME -> the device."""
        path = self.dev_root / name
        if path.is_symlink():
            path.unlink()
        path.symlink_to(target)
        return path

    def sysfs(self, entry: str, name: str, target: str | Path) -> Path:
        """A port known only to sysfs (no udev link): sys/.../ENTRY/name and dev/ENTRY."""
        (self.sys_root / entry).mkdir()
        (self.sys_root / entry / "name").write_text(name + "\n")
        node = self.dev_dir / entry
        node.symlink_to(target)
        return node

    def cli_args(self) -> list[str]:
        return ["--dev-root", str(self.dev_root), "--sys-root", str(self.sys_root)]


@pytest.fixture
def tree(tmp_path: Path) -> PortTree:
    return PortTree(tmp_path)


@pytest.fixture
def live_port() -> Iterator[LivePort]:
    port = LivePort()
    yield port
    port.close()


@pytest.fixture
def live_port2() -> Iterator[LivePort]:
    port = LivePort()
    yield port
    port.close()


@pytest.fixture
def dead_port() -> Iterator[DeadPort]:
    port = DeadPort()
    yield port
    port.close()


# One frame of a Python traceback: the file, and the line (0: the module's first instruction,
# before its first statement, where the interpreter runs a signal handler that came just then).
_FRAME = re.compile(r'^ *File "(?P<path>[^"\n]*)", line (?P<line>-?\d+), in ', re.MULTILINE)
# The interpreter's report of an exception it could not raise (in a weakref callback, say).
_IGNORED_INTERRUPT = re.compile(
    r"^Exception ignored in: .*\nTraceback [^\n]*\n(?: [^\n]*\n)*KeyboardInterrupt", re.MULTILINE
)
# The interpreter's own start, importing (encodings, io) before the script's first statement:
# a KeyboardInterrupt raised in importlib's module-lock callback is "unraisable", printed by
# sys.unraisablehook and dropped, leaving nothing (no sys.last_type) a launcher could find it by.
_DROPPED_IN_IMPORTLIB = re.compile(
    r"^Exception ignored in: <function _get_module_lock\.<locals>\.cb .*\n"
    r"Traceback [^\n]*\n  File \"<frozen importlib\._bootstrap>\", line \d+, in cb\n"
    r"KeyboardInterrupt",
    re.MULTILINE,
)


def _is_ours(path: str) -> bool:
    """A module of the package, or the launcher, wherever it was run from."""
    return "/lxd_agent/" in f"/{path}" or Path(path).name == LAUNCHER.name


@dataclass
class SignalledStart:
    """One start of the agent with a signal sent soon after exec, and what came of it.

    Until the first statement of ours holds the signals, the interpreter's own start does with
    them what it does to any Python program: the default action, or for SIGINT a
    KeyboardInterrupt that ends the start (exit -2 or 1) or, rarely, is printed and dropped.
    From that statement on they are held: exit 0 with STARTED ... STOPPED.
    """

    entry: str
    signo: int
    delay: float
    returncode: int | None  # None: still running at the bound, then killed
    lines: list[str]  # what it wrote to the port
    stderr: str

    def _lines_of_ours(self) -> list[int]:
        return [int(m["line"]) for m in _FRAME.finditer(self.stderr) if _is_ours(m["path"])]

    @property
    def through_our_code(self) -> bool:
        """A traceback through a statement of ours: the signals were held too late.

        Not one at a module's first instruction only (line 0): a SIGINT the interpreter took just
        as the module began, before any statement of ours could hold it (``python -m`` runs the
        two packages first; the launcher's own start is the interpreter's).
        """
        return any(line != 0 for line in self._lines_of_ours())

    @property
    def taken_at_a_module_entry(self) -> bool:
        return 0 in self._lines_of_ours() and not self.through_our_code

    @property
    def ended_before_our_first_statement(self) -> bool:
        """Killed by the signal, or a KeyboardInterrupt that ended the interpreter's own start
        (``python -m`` exits 1 when it interrupts the import of runpy): nothing of ours ran far
        enough to write, to log or to be in a traceback."""
        return (
            self.returncode not in (None, 0)
            and self.lines == []
            and "lxd-agent: " not in self.stderr
            and not self.through_our_code
        )

    @property
    def lost_by_the_interpreter(self) -> bool:
        """Still running, because the interpreter's start printed the SIGINT's KeyboardInterrupt
        as an exception it could not raise (in importlib's weakref callback, say) and dropped
        it, before any statement of ours could hold it."""
        return (
            self.returncode is None
            and _IGNORED_INTERRUPT.search(self.stderr) is not None
            and not self.through_our_code
        )

    def problem(self) -> str | None:
        """What went wrong, or None."""
        if self.through_our_code:
            return "traceback through our code"
        if self.returncode is None:
            # `python -m`'s runpy drops a SIGINT so; the launcher (what the unit runs)
            # re-raises the one its zip check printed, so a launcher still running is ours,
            # unless the interpreter dropped the SIGINT in importlib before the launcher's
            # first statement (seen once in a 300-run storm on a busy machine).
            if self.lost_by_the_interpreter and (
                self.entry != LAUNCHER_ENTRY.name or _DROPPED_IN_IMPORTLIB.search(self.stderr)
            ):
                return None
            return "still running at the bound"
        if self.returncode == 0:
            if self.lines[:1] == [STARTED] and self.lines[-1:] == [STOPPED]:
                return None
            return "exit 0 without STARTED ... STOPPED"
        if self.ended_before_our_first_statement:
            return None
        return f"exit status {self.returncode} after writing or logging"

    def __str__(self) -> str:
        name = signal.Signals(self.signo).name
        return (
            f"{self.entry}, {name} after {self.delay * 1000:.1f} ms: exit {self.returncode}, "
            f"wrote {self.lines}, stderr {self.stderr!r}"
        )


def start_and_signal(
    entry: Entry, args: Sequence[str], port: LivePort, signo: int, delay: float, bound: float = 10
) -> SignalledStart:
    """Start ``run ARGS`` through ENTRY, send SIGNO after DELAY seconds, and collect the outcome.

    A SIGHUP the agent took is a look again: it is stopped with SIGTERM once it wrote STARTED.
    Every wait ends ``bound`` seconds after the signal, well past any start; an agent still
    running then is killed.
    """
    before: list[str] = []
    with start(
        [*entry.argv, "run", *args], env={**os.environ, **entry.env}, stderr=subprocess.PIPE
    ) as proc:
        try:
            time.sleep(delay)
            proc.send_signal(signo)
            deadline = time.monotonic() + bound
            if signo == signal.SIGHUP:
                # Either the default death (before the agent held it) or a look again.
                while proc.poll() is None and STARTED not in before:
                    if time.monotonic() > deadline:
                        break
                    before += port.read_lines(timeout=0.05)
                if proc.poll() is None:
                    proc.terminate()
            try:
                _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                returncode: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=bound)
                returncode = None
        finally:
            proc.kill()
    return SignalledStart(entry.name, signo, delay, returncode, before + port.read_written(), err)
