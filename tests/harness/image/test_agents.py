"""Tests for lxd_agent_harness.image.agents: the emulations of LXD's agent, their packages, and the
emulated agent run natively.

The agent's port is a FIFO here: like a virtio port it is opened O_RDWR and written a line at a
time, and when it is full a blocking write waits, as on a port with no host behind it. READY=1
goes to a datagram socket of the test's own through the real `systemd-notify`.
"""

from __future__ import annotations

import array
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME
from lxd_agent_harness.image.agents import (
    AGENT_SCRIPT,
    AGENTS,
    EMULATIONS_DIR,
    INSTALLED_AGENT,
    emulation_deb,
)
from tests.systemd.test_units import parse_unit

AGENT = EMULATIONS_DIR / AGENT_SCRIPT
EMULATIONS = [agent for agent in AGENTS.values() if agent.is_emulation]
PIPE_CAPACITY = 1 << 16  # Linux's default pipe buffer


def extracted(agent_name: str, into: Path) -> Path:
    deb = emulation_deb(AGENTS[agent_name], lambda line: None)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_each_emulation_is_a_package_apt_would_not_mix_with_another_agent(own_cache: Path) -> None:
    for agent in EMULATIONS:
        deb = emulation_deb(agent, lambda line: None)
        fields = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Package", "Conflicts"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"Package: {agent.package}" in fields
        conflicts = fields.split("Conflicts:", 1)[1]
        assert "lxd-agent," in conflicts and "lxd-status-agent" in conflicts


def test_the_package_is_the_same_bytes_when_built_again(own_cache: Path) -> None:
    agent = AGENTS["lxd-5.21"]
    first = emulation_deb(agent, lambda line: None).read_bytes()
    os.environ["XDG_CACHE_HOME"] = str(own_cache / "another")
    assert emulation_deb(agent, lambda line: None).read_bytes() == first


def test_lxd_5_0s_unit_is_enabled_and_started_by_udev_only_for_the_old_name(
    own_cache: Path,
) -> None:
    root = extracted("lxd-5.0", own_cache / "root")
    unit = parse_unit((root / "lib/systemd/system/lxd-agent.service").read_text())
    assert unit["Unit"]["ConditionPathExists"] == [f"/dev/virtio-ports/{LEGACY_PORT_NAME}"]
    assert "multi-user.target" not in " ".join(unit["Unit"].get("Before", []))
    assert unit["Service"]["Type"] == ["notify"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert unit["Service"]["ExecStart"] == [
        f"/{INSTALLED_AGENT} /dev/virtio-ports/{LEGACY_PORT_NAME}"
    ]
    assert "ExecStartPre" not in unit["Service"]  # LXD's config drive cannot be mounted here
    postinst = subprocess.run(
        ["dpkg-deb", "-I", str(emulation_deb(AGENTS["lxd-5.0"], lambda line: None)), "postinst"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "deb-systemd-helper enable lxd-agent.service" in postinst
    rules = (root / "lib/udev/rules.d/99-lxd-agent.rules").read_text()
    assert f'SYMLINK=="virtio-ports/{LEGACY_PORT_NAME}"' in rules
    assert 'RUN+="/bin/systemctl start lxd-agent.service"' in rules
    assert PORT_NAME not in rules


def test_lxd_5_21s_unit_holds_multi_user_and_udev_starts_it_for_both_names(
    own_cache: Path,
) -> None:
    root = extracted("lxd-5.21", own_cache / "root")
    unit = parse_unit((root / "lib/systemd/system/lxd-agent.service").read_text())
    assert "multi-user.target" in " ".join(unit["Unit"]["Before"])
    assert unit["Unit"]["DefaultDependencies"] == ["no"]
    assert "Install" not in unit
    assert unit["Service"]["ExecStart"] == [f"/{INSTALLED_AGENT} /dev/virtio-ports/{PORT_NAME}"]
    rules = (root / "lib/udev/rules.d/99-lxd-agent.rules").read_text()
    for name in (PORT_NAME, LEGACY_PORT_NAME):
        assert f'SYMLINK=="virtio-ports/{name}"' in rules
    assert os.access(root / INSTALLED_AGENT, os.X_OK)


# -- the emulated agent, natively ---------------------------------------------------------------


class Manager:
    """The service manager's side of `NOTIFY_SOCKET`: what systemd does with the messages.

    `systemd-notify` sends READY=1, then a BARRIER=1 message with a file descriptor and waits
    until the manager closes it; like systemd, this reads every message and closes the fds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        fd_space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, fd_space)
            except OSError:
                return
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)
            if not data.startswith(b"BARRIER=1"):
                self.messages.put(data.strip())

    def next_message(self, timeout: float = 10) -> bytes:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    running = Manager(tmp_path / "notify")
    yield running
    running.close()


@contextlib.contextmanager
def running_agent(port: Path, manager: Manager) -> Iterator[subprocess.Popen[bytes]]:
    """The emulated agent on `port`, under `manager`; killed and reaped on the way out."""
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path)}
    agent = subprocess.Popen([sys.executable, str(AGENT), str(port)], env=env)
    try:
        yield agent
    finally:
        agent.kill()
        agent.wait()


@dataclass
class Fifo:
    """A FIFO standing in for the port, and the test's own non-blocking end of it."""

    path: Path
    reader: int


@pytest.fixture
def port(tmp_path: Path) -> Iterator[Fifo]:
    path = tmp_path / "port"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    yield Fifo(path, reader)
    os.close(reader)


def wait_until_sigterm_is_caught(agent: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Until the agent takes SIGTERM (blocked, and waited for): after READY=1, as LXD's agent.

    Blocked shows in /proc's SigBlk as SIGTERM alone, except while the process sleeps in
    sigtimedwait: the kernel unblocks the awaited signals for that time, and the process is then
    in `do_sigtimedwait`. Every signal blocked is not it: CPython blocks them all around the
    vfork of `systemd-notify`, whose READY=1 can arrive before the parent unblocks them again;
    a SIGTERM sent then killed the agent once, on a busy machine.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{agent.pid}/status").read_text()
        mask = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
        waiting = "sigtimedwait" in Path(f"/proc/{agent.pid}/wchan").read_text()
        if waiting or int(mask.split()[1], 16) == 1 << (signal.SIGTERM - 1):
            return
        time.sleep(0.02)
    raise AssertionError(f"SIGTERM not taken after {timeout} s")


def read_lines(fd: int) -> str:
    try:
        return os.read(fd, PIPE_CAPACITY).decode()
    except BlockingIOError:
        return ""


def fill(fd: int) -> int:
    """Write into the pipe until it is full; how much went in."""
    written = 0
    while True:
        try:
            written += os.write(fd, b"x" * 4096)
        except BlockingIOError:
            return written


def test_started_is_written_before_ready_and_stopped_on_sigterm(
    port: Fifo, manager: Manager
) -> None:
    with running_agent(port.path, manager) as agent:
        assert manager.next_message() == b"READY=1"
        assert read_lines(port.reader) == "STARTED\n"  # already there when READY=1 came
        wait_until_sigterm_is_caught(agent)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
        assert read_lines(port.reader) == "STOPPED\n"


def test_a_missing_port_is_skipped_silently_and_ready_still_sent(
    tmp_path: Path, manager: Manager
) -> None:
    with running_agent(tmp_path / "no-such-port", manager) as agent:
        assert manager.next_message() == b"READY=1"
        wait_until_sigterm_is_caught(agent)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0
        assert list(tmp_path.iterdir()) == [tmp_path / "notify"]  # nothing was created


def test_a_first_write_that_blocks_holds_back_ready_and_sigterm_kills(
    port: Fifo, manager: Manager
) -> None:
    fill(port.reader)
    with running_agent(port.path, manager) as agent:
        with pytest.raises(queue.Empty):
            manager.next_message(timeout=2)
        # Before READY=1 SIGTERM is not handled yet: it ends the process (Go's default).
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == -signal.SIGTERM


def test_refreshes_every_5_s_and_a_stuck_write_holds_the_stop_until_it_ends(
    port: Fifo, manager: Manager
) -> None:
    with running_agent(port.path, manager) as agent:
        assert manager.next_message() == b"READY=1"
        assert read_lines(port.reader) == "STARTED\n"
        time.sleep(4)
        assert read_lines(port.reader) == "", "a refresh came sooner than 5 s"
        fill(port.reader)  # the refresh at 5 s finds the port full and waits
        time.sleep(2)
        wait_until_sigterm_is_caught(agent)
        agent.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert agent.poll() is None, "the stop must wait for the stuck write"
        drained = os.read(port.reader, PIPE_CAPACITY)
        assert set(drained) == {ord("x")}  # the port can take lines again
        assert agent.wait(timeout=10) == 0
        # The refresh that was stuck went through first, then STOPPED.
        assert read_lines(port.reader) == "STARTED\nSTOPPED\n"
