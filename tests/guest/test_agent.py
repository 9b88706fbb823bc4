"""The agent daemon end to end: a real process, a real notify socket, pty stand-in ports."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lxd_agent.guest import agent as agent_module
from lxd_agent.guest import commands
from lxd_agent.guest.agent import Agent, AgentConfig
from lxd_agent.guest.cli import UNIT_RUN
from lxd_agent.guest.notify import Notifier
from lxd_agent.guest.ports import PortGone
from lxd_agent.guest.state import CREDENTIAL
from lxd_agent.protocol import (
    INCUS_PORT_NAME,
    LEGACY_PORT_NAME,
    MINIMAL_STATE_LINE,
    PORT_NAME,
    STARTED,
    STOPPED,
)
from tests.guest.conftest import CLI, REPO, DeadPort, LivePort, PortTree, run_cli, start


class NotifySocket:
    """What systemd listens on: a unix datagram socket; collects every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, assignment: str, timeout: float = 10.0) -> str:
        """Receive until a message has a line starting with ``assignment``; return it."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.messages.append(message)
            if any(line.startswith(assignment) for line in message.split("\n")):
                return message
        raise AssertionError(f"no {assignment!r} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


@contextmanager
def agent(
    tree: PortTree,
    *args: str,
    notify: NotifySocket | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """Run ``lxd-agent run`` on the tree; killed and reaped whatever the test does."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    if notify is not None:
        environ["NOTIFY_SOCKET"] = str(notify.path)
    environ.update(env or {})
    proc = start([*CLI, "run", *tree.cli_args(), *args], env=environ, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def stop(proc: subprocess.Popen[str], signo: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(signo)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_ready_comes_only_after_started_is_in_the_port(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with notify_socket(tmp_path) as notify, agent(tree, "--refresh", "0", notify=notify):
        notify.wait_for("READY=1")
        # Read only after READY=1: the line must already be waiting in the port.
        assert live_port.read_lines(timeout=0) == [STARTED]
        status = [m for m in notify.messages if "STATUS=reporting to" in m]
        assert status and PORT_NAME in status[0] and "legacy" not in status[0]


def test_sigterm_reports_stopping_then_stopped_and_exits_0(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with notify_socket(tmp_path) as notify, agent(tree, "--refresh", "0", notify=notify) as proc:
        notify.wait_for("READY=1")
        live_port.wait_for(STARTED, timeout=5)
        code, _ = stop(proc)
        notify.wait_for("STOPPING=1", timeout=5)
        assert code == 0
        assert live_port.read_lines(timeout=2) == [STOPPED]


def _fill(device: str) -> None:
    """Write to the port until it takes no more, as a host that never reads would leave it.

    A pty moves what was written on to its master's side a moment later, making room again:
    full means still unwritable after a while.
    """
    fd = os.open(device, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        for _ in range(100):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fd, b"F\n" * 512)
            if not poller.poll(300):
                return
        raise AssertionError(f"{device} never filled up")
    finally:
        os.close(fd)


def test_a_stop_that_cannot_write_stopped_says_so_and_exits_3(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with notify_socket(tmp_path) as notify, agent(tree, "--refresh", "0", notify=notify) as proc:
        notify.wait_for("READY=1")
        _fill(live_port.device)
        code, err = stop(proc)
        assert code == 3, err
        status = notify.wait_for("STATUS=stopped without writing STOPPED", timeout=5)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lxd-agent: could not write {STOPPED}: {PORT_NAME}: "), err
    assert "not writable within 2 s; exiting with status 3" in last
    assert "not writable within 2 s" in status
    assert STOPPED not in live_port.read_lines(timeout=0.5)


def test_sigint_stops_like_sigterm(tree: PortTree, live_port: LivePort) -> None:
    tree.link(PORT_NAME, live_port.device)
    with agent(tree) as proc:
        live_port.wait_for(STARTED, timeout=10)
        code, _ = stop(proc, signal.SIGINT)
        assert code == 0
        assert live_port.wait_for(STOPPED, timeout=2)[-1] == STOPPED


def test_started_is_rewritten_every_refresh(tree: PortTree, live_port: LivePort) -> None:
    tree.link(PORT_NAME, live_port.device)
    with agent(tree, "--refresh", "0.2") as proc:
        live_port.wait_for(STARTED, timeout=10)
        lines: list[str] = []
        deadline = time.monotonic() + 3
        while lines.count(STARTED) < 3 and time.monotonic() < deadline:
            lines += live_port.read_lines(timeout=0.5)
        stop(proc)
    assert lines.count(STARTED) >= 3, lines


def test_on_incus_without_the_switch_each_status_goes_twice_and_no_state(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(INCUS_PORT_NAME, live_port.device)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}  # empty: nothing said
    with notify_socket(tmp_path) as notify, agent(
        tree, "--refresh", "0", notify=notify, env=env
    ) as proc:
        notify.wait_for("READY=1")
        assert live_port.read_lines(timeout=0) == [STARTED, STARTED]
        code, err = stop(proc)
    assert code == 0
    assert live_port.read_written() == [STOPPED, STOPPED]
    assert "state line after STARTED on org.linuxcontainers.incus: off" in err


def credentials(tmp_path: Path, value: str) -> dict[str, str]:
    """The environment of a unit given the state switch as a credential."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / CREDENTIAL).write_text(value)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def test_on_incus_with_the_switch_started_carries_the_minimal_state_then_the_full_one(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(INCUS_PORT_NAME, live_port.device)
    env = credentials(tmp_path, "on")
    with notify_socket(tmp_path) as notify, agent(
        tree, "--refresh", "0", notify=notify, env=env
    ) as proc:
        notify.wait_for("READY=1")
        # READY=1 after the first write: nothing was gathered for it.
        assert live_port.read_lines(timeout=0)[:2] == [STARTED, MINIMAL_STATE_LINE]
        # The full state at once, without waiting for a refresh (there is none: --refresh 0).
        lines = live_port.wait_for(STARTED, timeout=10)
        lines += live_port.read_lines(timeout=5)
        code, err = stop(proc)
    assert code == 0
    assert lines[0] == STARTED and len(lines) == 2, lines
    state = json.loads(lines[1])
    assert state["pid"] == 1 and "os_info" in state and "network" in state
    assert live_port.read_written() == [STOPPED, STOPPED]
    assert "state line after STARTED on org.linuxcontainers.incus: on" in err


def test_the_state_line_never_goes_to_an_lxd_port(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with notify_socket(tmp_path) as notify, agent(
        tree, "--refresh", "0", "--state-line", "on", notify=notify
    ) as proc:
        notify.wait_for("READY=1")
        stop(proc)
    assert live_port.read_written() == [STARTED, STOPPED]


def test_legacy_port_is_used_when_the_new_one_is_dead(
    tmp_path: Path, tree: PortTree, dead_port: DeadPort, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, dead_port.device)
    tree.link(LEGACY_PORT_NAME, live_port.device)
    with notify_socket(tmp_path) as notify, agent(tree, notify=notify) as proc:
        notify.wait_for("READY=1")
        assert live_port.read_lines(timeout=0) == [STARTED]
        assert any(f"{LEGACY_PORT_NAME}" in m and "legacy fallback" in m for m in notify.messages)
        code, _ = stop(proc)
    assert code == 0
    assert live_port.read_lines(timeout=2)[-1] == STOPPED


def test_a_late_port_is_picked_up(tmp_path: Path, tree: PortTree, live_port: LivePort) -> None:
    with notify_socket(tmp_path) as notify, agent(tree, "--wait", "20", notify=notify) as proc:
        waiting = notify.wait_for(f"STATUS=waiting for a port: {PORT_NAME}: no such port", 10)
        assert LEGACY_PORT_NAME in waiting
        tree.link(PORT_NAME, live_port.device)
        notify.wait_for("READY=1", timeout=10)
        assert live_port.read_lines(timeout=0) == [STARTED]
        stop(proc)


def test_no_port_in_time_exits_1_naming_every_candidate(tree: PortTree, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    tree.link(LEGACY_PORT_NAME, tmp_path / "plain")
    began = time.monotonic()
    with agent(tree, "--wait", "1") as proc:
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "no usable port after 1 s" in last
    assert f"{PORT_NAME}: no such port" in last
    assert f"{LEGACY_PORT_NAME}: " in last and "is a regular file" in last
    assert time.monotonic() - began < 15


def test_a_port_whose_writes_fail_is_given_up_on_with_the_reason(tree: PortTree) -> None:
    # /dev/full opens and polls writable, and every write fails with ENOSPC.
    tree.link(PORT_NAME, "/dev/full")
    with agent(tree, "--wait", "2") as proc:
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "no usable port after 2 s: " in last
    assert (
        f"{PORT_NAME}: {tree.dev_root / PORT_NAME}: write failed: No space left on device" in last
    )
    # Retried every half second, but each thing is said once: not once per retry.
    assert err.count("could not write") == 1, err
    assert "reporting to" not in err, err


def test_a_lost_port_is_logged_once_and_found_again(
    tree: PortTree, live_port: LivePort, live_port2: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with agent(tree, "--refresh", "0.2") as proc:
        live_port.wait_for(STARTED, timeout=10)
        # The node goes away and the link dangles, like an unplug. Not by closing the pty:
        # the kernel hands its number to the next pty opened anywhere on the machine.
        tree.link(PORT_NAME, tree.dev_dir / "vport0p1")
        time.sleep(2)
        tree.link(PORT_NAME, live_port2.device)
        live_port2.wait_for(STARTED, timeout=10)
        code, err = stop(proc)
    assert code == 0
    assert err.count("could not write") == 1, err
    # Looking again is quiet: a handful of log lines, not one per look.
    assert len(err.splitlines()) < 10, err


def test_a_lost_port_is_looked_for_with_back_off_up_to_the_max(
    tree: PortTree, live_port: LivePort, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    tree.link(PORT_NAME, live_port.device)
    agent_ = Agent(AgentConfig(refresh=1.0, roots=tree.roots), Notifier(None, "none"), _quiet())
    delays: list[float | None] = []

    def sleep(seconds: float | None) -> int | None:
        """Instead of waiting: note the delay, and play the port's unplug and return."""
        delays.append(seconds)
        if len(delays) == 1:
            (tree.dev_root / PORT_NAME).unlink()  # after the first STARTED: unplugged
        if len(delays) == 8:
            tree.link(PORT_NAME, live_port.device)  # plugged in again
        return signal.SIGTERM if len(delays) == 10 else None

    monkeypatch.setattr(agent_, "_sleep", sleep)
    assert agent_._report_loop()
    scan, most = agent_module._SCAN_INTERVAL, agent_module._MAX_SCAN_INTERVAL
    # The refresh; then, port gone, each look waits twice as long as the last, up to the max;
    # found again, the refresh.
    looks = [min(scan * 2**n, most) for n in range(7)]
    assert looks == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert delays == [1.0, *looks, 1.0, 1.0]
    assert live_port.read_lines(timeout=1) == [STARTED] * 3


def _quiet() -> logging.Logger:
    log = logging.getLogger("test-agent-quiet")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


def test_sighup_looks_for_the_port_again(
    tree: PortTree, live_port: LivePort, live_port2: LivePort
) -> None:
    tree.link(LEGACY_PORT_NAME, live_port.device)
    with agent(tree, "--refresh", "0") as proc:
        live_port.wait_for(STARTED, timeout=10)
        tree.link(PORT_NAME, live_port2.device)
        proc.send_signal(signal.SIGHUP)
        live_port2.wait_for(STARTED, timeout=10)
        stop(proc)
    assert live_port2.read_lines(timeout=2)[-1] == STOPPED


def test_stop_hook_writes_stopped_after_the_agent_was_killed(
    tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with agent(tree) as proc:
        live_port.wait_for(STARTED, timeout=10)
        code, _ = stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert STOPPED not in live_port.read_lines(timeout=0.5)
    result = run_cli("status", "write", STOPPED, *tree.cli_args(), timeout=10)
    assert result.returncode == 0, result.stderr
    assert live_port.read_lines(timeout=2) == [STOPPED]


def test_a_port_that_keeps_failing_is_logged_once(
    tree: PortTree, live_port: LivePort, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree.link(PORT_NAME, live_port.device)
    records: list[logging.LogRecord] = []
    log = logging.getLogger("test-agent")
    log.addHandler(ListHandler(records))
    log.setLevel(logging.DEBUG)
    agent_ = Agent(AgentConfig(roots=tree.roots), Notifier(None, "none"), log)

    def failing(
        device: str, line: str, timeout: float, copies: int = 1, state: str | None = None
    ) -> None:
        raise PortGone(f"{device}: Input/output error")

    monkeypatch.setattr(agent_module, "write_line", failing)
    for _ in range(5):
        agent_.port = agent_._find()
        assert agent_.port is not None and not agent_._write(STARTED)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in records]
    monkeypatch.undo()
    agent_.port = agent_._find()
    assert agent_._write(STARTED)
    assert live_port.read_lines(timeout=2) == [STARTED]


class ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- the unit's path: --if-no-port=skip, and what its start loads --------------------------------


def test_skip_without_a_usable_port_says_ready_with_the_reason_and_exits_0_at_once(
    tmp_path: Path, tree: PortTree, dead_port: DeadPort
) -> None:
    # Incus: the only LXD-named port is a stub with nothing behind it on the host.
    tree.link(LEGACY_PORT_NAME, dead_port.device)
    began = time.monotonic()
    with notify_socket(tmp_path) as notify, agent(tree, "--if-no-port=skip", notify=notify) as proc:
        # READY=1 with the exit 0: a Type=notify unit that exits 0 without it has failed.
        message = notify.wait_for("READY=1")
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert time.monotonic() - began < 10  # not the 30 s --wait
    status = next(line for line in message.split("\n") if line.startswith("STATUS="))
    assert status.startswith("STATUS=skipped, no usable port: ")
    assert f"{PORT_NAME}: no such port" in status and f"{LEGACY_PORT_NAME}: " in status
    assert "no usable port, nothing to report to" in err and STARTED not in err


def test_skip_with_a_usable_port_reports_as_ever(
    tmp_path: Path, tree: PortTree, dead_port: DeadPort, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, dead_port.device)
    tree.link(LEGACY_PORT_NAME, live_port.device)
    with notify_socket(tmp_path) as notify, agent(tree, "--if-no-port=skip", notify=notify) as proc:
        notify.wait_for("READY=1")
        assert live_port.read_lines(timeout=0) == [STARTED]
        code, _ = stop(proc)
    assert code == 0
    assert live_port.read_lines(timeout=2) == [STOPPED]
    assert not any("skipped" in m for m in notify.messages)


def test_skip_waits_for_a_port_caught_in_its_setup_instead_of_skipping(
    tmp_path: Path, tree: PortTree, dead_port: DeadPort, live_port: LivePort
) -> None:
    # The new name's link points nowhere yet (udev replacing it), the legacy port is a stub:
    # not a definite "nothing to report to", so the agent waits and takes the port once it works.
    tree.link(PORT_NAME, tmp_path / "not-yet")
    tree.link(LEGACY_PORT_NAME, dead_port.device)
    with notify_socket(tmp_path) as notify, agent(tree, "--if-no-port=skip", notify=notify) as proc:
        notify.wait_for("STATUS=waiting for a port: ")
        assert proc.poll() is None, "skipped although the port was only half set up"
        tree.link(PORT_NAME, live_port.device)
        notify.wait_for("READY=1")
        assert live_port.read_lines(timeout=2) == [STARTED]
        code, _ = stop(proc)
    assert code == 0
    assert not any("skipped" in m for m in notify.messages)


def test_the_units_command_line_gets_the_same_config_without_argparse() -> None:
    parsed = commands.run_config(commands.parse_args(UNIT_RUN))
    assert parsed == AgentConfig(skip_without_port=True)
    assert commands.parse_args(["run"]).if_no_port == "wait"


# The unit's command line, started as the package's /usr/bin/lxd-agent starts it (a bare
# interpreter: -I -S), with the port search stubbed out to find nothing; prints what was loaded.
UNIT_START = f"""
import sys
sys.path[:0] = [{str(REPO)!r}]
sys.path.append("/usr/lib/python3/dist-packages")
import lxd_agent.guest.agent as agent
agent.find_connected_port = lambda names, roots: (None, [])
sys.argv = ["lxd-agent", *{UNIT_RUN!r}]
from lxd_agent.guest.cli import main
code = main()
print(code, " ".join(sorted(sys.modules)))
"""

# Each of these costs milliseconds to import (argparse and logging some 10-20 ms each, with
# re, enum and their kin), more than the rest of the agent's start.
HEAVY_MODULES = ("argparse", "logging", "dataclasses", "typing", "enum", "re", "socket", "inspect")


def test_the_units_start_loads_none_of_the_heavy_modules(tmp_path: Path) -> None:
    with notify_socket(tmp_path) as notify:
        result = subprocess.run(
            ["/usr/bin/python3", "-I", "-S", "-c", UNIT_START],
            env={"NOTIFY_SOCKET": str(notify.path), "INVOCATION_ID": "0" * 32},
            capture_output=True,
            text=True,
            timeout=30,
        )
        notify.wait_for("READY=1")
    code, modules = result.stdout.split(" ", 1)
    assert code == "0", result.stderr
    loaded = set(modules.split())
    # It did talk to systemd and journald, through systemd-python.
    assert {"systemd._daemon", "systemd._journal", "lxd_agent.guest.agent"} <= loaded
    assert sorted(loaded & set(HEAVY_MODULES)) == []
