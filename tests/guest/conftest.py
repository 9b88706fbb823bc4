"""Stand-ins for virtio ports, for the guest agent's tests.

A live port is a pty: its slave is a character device that is writable while the master is
open, and the test reads what the agent wrote from the master. A dead port is a pty whose
master is closed: the kernel hangs it up, as it does a virtio port with no host backend.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import sys
import time
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from lxd_agent.guest.ports import PortRoots

# The checkout under test: `python -m` puts the working directory first on sys.path, so the
# CLI runs this tree's code even where another checkout is installed in editable mode.
REPO = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "lxd_agent.guest")
# What an unprivileged user in the guest runs into (the tests themselves run as root).
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


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
