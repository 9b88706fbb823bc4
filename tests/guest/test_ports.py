"""Port discovery and non-blocking writes (lxd_agent.guest.ports) against stand-in devices."""

from __future__ import annotations

import errno
import os
import pty
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lxd_agent.guest.ports import (
    PortBusy,
    PortGone,
    PortUnusable,
    connection_problem,
    find_connected_port,
    find_device,
    inspect,
    survey,
    write_line,
)
from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from tests.guest.conftest import AS_NOBODY, DeadPort, LivePort, PortTree, run_cli


def test_new_name_is_chosen_before_the_legacy_one(
    tree: PortTree, live_port: LivePort, live_port2: LivePort
) -> None:
    tree.link(LEGACY_PORT_NAME, live_port2.device)
    tree.link(PORT_NAME, live_port.device)
    port, seen = find_connected_port(roots=tree.roots)
    assert port is not None and port.name == PORT_NAME and not port.legacy
    # The legacy port is never touched when the new one works.
    assert [c.name for c in seen] == [PORT_NAME]


def test_legacy_port_is_the_fallback(tree: PortTree, live_port: LivePort) -> None:
    tree.link(LEGACY_PORT_NAME, live_port.device)
    port, seen = find_connected_port(roots=tree.roots)
    assert port is not None and port.name == LEGACY_PORT_NAME and port.legacy
    assert seen[0].problem is not None and "no such port" in seen[0].problem


def test_sysfs_name_finds_a_port_that_udev_did_not_link(
    tree: PortTree, live_port: LivePort
) -> None:
    node = tree.sysfs("vport1p2", PORT_NAME, live_port.device)
    tree.sysfs("vport1p1", "org.qemu.guest_agent.0", live_port.device)
    assert find_device(PORT_NAME, tree.roots) == str(node)
    assert find_device(LEGACY_PORT_NAME, tree.roots) is None
    assert inspect(PORT_NAME, tree.roots).usable


SYSFS_COMMANDS = [["probe"], ["status", "write", STOPPED], ["run", "--wait", "0"]]


def _in_sysfs(tree: PortTree, entry: str) -> Path:
    (tree.sys_root / entry).mkdir()
    return tree.sys_root / entry / "name"


@pytest.mark.parametrize("command", SYSFS_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_fifo_as_a_sysfs_name_is_skipped_not_waited_on(
    tree: PortTree, command: list[str]
) -> None:
    os.mkfifo(_in_sysfs(tree, "vport0p1"))
    # A blocking open() of a FIFO without a writer never returns: run_cli's timeout fails it.
    result = run_cli(*command, *tree.cli_args(), timeout=15)
    assert result.returncode == 1, result.stderr
    assert "no such port" in result.stdout + result.stderr


def _limit_memory() -> None:
    # Far more than the agent needs, far less than reading the files below whole.
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))


@pytest.mark.parametrize("command", SYSFS_COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("target", ["/dev/zero", "huge"])
def test_a_sysfs_name_is_read_with_a_bound(
    tree: PortTree, tmp_path: Path, command: list[str], target: str
) -> None:
    if target == "huge":
        with open(tmp_path / "huge", "wb") as f:
            f.truncate(2 << 30)  # sparse: 2 GiB that cost no disk
        target = str(tmp_path / "huge")
    _in_sysfs(tree, "vport0p1").symlink_to(target)
    result = run_cli(*command, *tree.cli_args(), timeout=15, preexec_fn=_limit_memory)
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert "no such port" in result.stdout + result.stderr


def test_udev_link_wins_over_sysfs(tree: PortTree, live_port: LivePort) -> None:
    tree.sysfs("vport1p2", PORT_NAME, live_port.device)
    link = tree.link(PORT_NAME, live_port.device)
    assert find_device(PORT_NAME, tree.roots) == str(link)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_text("x") and p, "is a regular file, not a character device"),
        (lambda p: p.mkdir() or p, "is a directory, not a character device"),
        (_fifo, "is a FIFO, not a character device"),
        (_socket, "is a socket, not a character device"),
        (lambda p: p, "dangling symlink to "),
    ],
    ids=["regular-file", "directory", "fifo", "socket", "dangling-link"],
)
def test_what_is_not_a_character_device_is_rejected_with_its_kind(
    tree: PortTree, tmp_path: Path, make: object, expected: str
) -> None:
    target = tmp_path / "target"
    assert callable(make)
    make(target)
    link = tree.link(PORT_NAME, target)
    candidate = inspect(PORT_NAME, tree.roots)
    assert not candidate.usable
    assert candidate.problem is not None and expected in candidate.problem
    assert candidate.describe().startswith(f"{PORT_NAME}: {link}: ")


def test_dead_port_is_skipped_for_a_live_legacy_port(
    tree: PortTree, dead_port: DeadPort, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, dead_port.device)
    tree.link(LEGACY_PORT_NAME, live_port.device)
    port, seen = find_connected_port(roots=tree.roots)
    assert port is not None and port.name == LEGACY_PORT_NAME
    assert seen[0].is_char_device and not seen[0].usable


def test_only_usable_absent_or_hung_up_ports_count_as_settled(
    tmp_path: Path, tree: PortTree, dead_port: DeadPort, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    tree.link(LEGACY_PORT_NAME, dead_port.device)
    usable, hung_up = (inspect(name, tree.roots) for name in (PORT_NAME, LEGACY_PORT_NAME))
    absent = inspect("org.example.none", tree.roots)
    assert usable.settled and usable.usable and not usable.hung_up
    assert hung_up.settled and hung_up.hung_up and not hung_up.usable
    assert absent.settled and absent.device is None
    # A link that points nowhere yet is a port in the middle of its setup, not a verdict.
    tree.link(PORT_NAME, tmp_path / "not-yet")
    dangling = inspect(PORT_NAME, tree.roots)
    assert not dangling.settled and not dangling.hung_up and dangling.device is not None


def test_hung_up_port_polls_as_not_host_connected() -> None:
    master, slave = pty.openpty()
    try:
        assert connection_problem(slave) is None
        os.close(master)
        problem = connection_problem(slave)
        assert problem is not None and "not host-connected" in problem and "POLLHUP" in problem
    finally:
        os.close(slave)


def test_permission_denied_is_reported_as_such(live_port: LivePort) -> None:
    # pytest's tmp_path is root-only; nobody must be able to walk to the link.
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        tree = PortTree(Path(top))
        tree.link(PORT_NAME, live_port.device)
        os.chmod(live_port.device, 0o600)  # as a virtio port is in a Debian guest
        problem = _inspect_as_nobody(tree)
    assert "permission denied" in problem and "run the agent as root" in problem


@pytest.fixture
def reachable_tree() -> Iterator[PortTree]:
    """A tree that nobody (uid 65534) can walk to; pytest's tmp_path is root-only."""
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        yield PortTree(Path(top))


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


@needs_root
@pytest.mark.parametrize("command", SYSFS_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_unreadable_dev_root_is_permission_denied_not_no_such_port(
    reachable_tree: PortTree, live_port: LivePort, command: list[str]
) -> None:
    tree = reachable_tree
    tree.link(PORT_NAME, live_port.device)
    os.chmod(tree.dev_root, 0o700)  # root's: nobody cannot search it
    result = run_cli(*command, *tree.cli_args(), wrapper=AS_NOBODY)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot look in {tree.dev_root}: permission denied" in output
    assert "no such port" not in output


@needs_root
def test_an_unreachable_dev_root_option_is_permission_denied(reachable_tree: PortTree) -> None:
    os.chmod(reachable_tree.dev_dir, 0o700)
    result = run_cli("probe", *reachable_tree.cli_args(), wrapper=AS_NOBODY)
    assert result.returncode == 2
    assert f"'{reachable_tree.dev_root}': Permission denied" in result.stderr


def _inspect_as_nobody(tree: PortTree) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody and report what inspect() says
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, str(inspect(PORT_NAME, tree.roots).problem).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        problem = f.read()
    os.waitpid(pid, 0)
    return problem


def test_write_line_writes_exactly_one_line(live_port: LivePort) -> None:
    write_line(live_port.device, STARTED)
    assert live_port.read_lines(timeout=2) == [STARTED]


def test_write_to_a_full_pipe_gives_up_after_the_timeout(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "fifo")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(writer, b"x" * 65536)
        except BlockingIOError:
            pass
        began = time.monotonic()
        with pytest.raises(PortBusy, match=r"not writable within 0\.3 s"):
            write_line(str(fifo), STARTED, timeout=0.3)
        # Bounded, not forever: well under the 10x margin a loaded machine might need.
        assert time.monotonic() - began < 3.0
        os.close(writer)
    finally:
        os.close(reader)


def test_write_waits_for_a_reader_that_drains_within_the_timeout(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path / "fifo")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        filled = 0
        try:
            while True:
                filled += os.write(writer, b"x" * 4096)
        except BlockingIOError:
            pass

        def drain() -> None:
            time.sleep(0.3)
            os.read(reader, filled)

        thread = threading.Thread(target=drain)
        thread.start()
        write_line(str(fifo), STARTED, timeout=5.0)
        thread.join()
        assert os.read(reader, 100) == b"STARTED\n"
    finally:
        os.close(writer)
        os.close(reader)


def test_fifo_without_reader_is_gone(tmp_path: Path) -> None:
    with pytest.raises(PortGone):
        write_line(str(_fifo(tmp_path / "fifo")), STARTED, timeout=0.5)


def test_write_to_hung_up_port_fails_at_once(dead_port: DeadPort) -> None:
    began = time.monotonic()
    with pytest.raises((PortGone, PortUnusable)):
        write_line(dead_port.device, STARTED, timeout=5.0)
    assert time.monotonic() - began < 2.0


def test_survey_reports_every_candidate_in_order(tree: PortTree, live_port: LivePort) -> None:
    tree.link(LEGACY_PORT_NAME, live_port.device)
    names = [c.name for c in survey(roots=tree.roots)]
    assert names == [PORT_NAME, LEGACY_PORT_NAME, INCUS_PORT_NAME]


def test_eagain_after_pollout_is_retried_with_back_off(
    live_port: LivePort, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    refusals: list[float] = []

    def write_refusing_twice(fd: int, data: bytes) -> int:
        if len(refusals) < 2:
            refusals.append(time.monotonic())
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_refusing_twice)
    write_line(live_port.device, STARTED, timeout=2.0)
    assert len(refusals) == 2
    assert live_port.read_lines(timeout=2) == [STARTED]


def test_eagain_for_the_whole_timeout_gives_up(
    live_port: LivePort, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_eagain(fd: int, data: bytes) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "write", always_eagain)
    with pytest.raises(PortBusy, match="kept failing with EAGAIN"):
        write_line(live_port.device, STARTED, timeout=0.3)


def test_incus_port_gets_each_status_line_twice_in_one_write(
    tree: PortTree, live_port: LivePort
) -> None:
    tree.link(INCUS_PORT_NAME, live_port.device)
    port, _ = find_connected_port(roots=tree.roots)
    assert port is not None and port.name == INCUS_PORT_NAME and not port.legacy
    write_line(live_port.device, STOPPED, copies=port.copies)
    assert live_port.read_lines(timeout=2) == [STOPPED, STOPPED]
