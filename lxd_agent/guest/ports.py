"""Find the virtio-serial port that the LXD host reads, and write status lines to it.

Runs in the guest, on the standard library alone. Nothing here may block without a bound:
a port with nothing behind it on the host (LXD >= 5.20's chardev-less legacy port, Incus's
stub) makes a blocking write wait forever in the kernel's ``wait_port_writable``, so every
open is non-blocking and every port is checked with ``poll()`` before it is written to.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time

from lxd_agent.protocol import CANDIDATE_PORT_NAMES, LEGACY_PORT_NAME, LINES_PER_WRITE

# typing, dataclasses and enum are left out on purpose: they are most of a bare start's import
# time, and this module is on the path from exec to READY=1 (mypy reads TYPE_CHECKING by name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Sequence

DEV_ROOT = "/dev/virtio-ports"
SYS_ROOT = "/sys/class/virtio-ports"
DEV_DIR = "/dev"

# O_NOCTTY: a stand-in pty must never become our controlling terminal.
_OPEN_FLAGS = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

# The port was unplugged or reset under us: look for it again rather than fail.
GONE_ERRNOS = frozenset({errno.ENODEV, errno.ENXIO, errno.EIO, errno.ENOENT})

# virtio_console lets one process at a time open a port; the stop hook and the daemon
# may meet there for the few microseconds of an open-write-close.
_BUSY_ERRNOS = frozenset({errno.EBUSY})

_MAX_BACKOFF = 0.2

# A port name is short (ours are under 30 bytes); sysfs adds a newline.
_MAX_NAME_BYTES = 256


class PortError(Exception):
    """A status line could not be written; the message names the device and why."""


class PortUnusable(PortError):
    """The path is not a port we may write to (wrong kind, permission, nothing on the host)."""


class PortGone(PortError):
    """The device vanished or failed (hot-unplug): look for a port again."""


class PortBusy(PortError):
    """The port stayed unwritable for the whole timeout."""


class Record:
    """A small value, equal, hashable and shown by its fields: ``@dataclass`` without its import."""

    __slots__: tuple[str, ...] = ()

    def fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


class PortRoots(Record):
    """Where to look for ports; tests point these at a temporary tree."""

    __slots__ = ("dev_dir", "dev_root", "sys_root")

    def __init__(self, dev_root: str = DEV_ROOT, sys_root: str = SYS_ROOT, dev_dir: str = DEV_DIR):
        self.dev_root = dev_root
        self.sys_root = sys_root
        self.dev_dir = dev_dir


DEFAULT_ROOTS = PortRoots()


class Candidate(Record):
    """What was found for one port name, and why it can or cannot be used."""

    __slots__ = ("connected", "device", "hung_up", "is_char_device", "name", "problem")

    def __init__(
        self,
        name: str,
        device: str | None,
        is_char_device: bool = False,
        connected: bool = False,
        problem: str | None = None,
        hung_up: bool = False,
    ) -> None:
        self.name = name
        self.device = device
        self.is_char_device = is_char_device
        self.connected = connected
        self.problem = problem
        self.hung_up = hung_up
        """The port exists but its host side has nothing behind it (``POLLHUP``), or it is going
        away (the open failed with ENXIO, ENODEV or EIO): a second look would find the same."""

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def legacy(self) -> bool:
        """LXD's name from before the rename (LXD <= 5.19)."""
        return self.name == LEGACY_PORT_NAME

    @property
    def copies(self) -> int:
        """How many times a status line goes into one write on this port (`LINES_PER_WRITE`)."""
        return LINES_PER_WRITE.get(self.name, 1)

    @property
    def settled(self) -> bool:
        """Usable, absent, or hung up: what a second look would find too. Anything else (busy,
        a dangling udev link, a node that cannot be opened) may be a moment of a port's setup."""
        return self.usable or self.device is None or self.hung_up

    def describe(self) -> str:
        verdict = "usable" if self.usable else str(self.problem)
        if self.device is None:
            return f"{self.name}: {verdict}"
        return f"{self.name}: {self.device}: {verdict}"


def describe_all(candidates: Sequence[Candidate]) -> str:
    """Every candidate and its verdict on one line, for logs and error messages."""
    return "; ".join(c.describe() for c in candidates)


def find_device(name: str, roots: PortRoots = DEFAULT_ROOTS) -> str | None:
    """Return the device path for port ``name``, or None when no such port exists.

    udev's symlink comes first; without it (early boot, images without udev rules) the
    port is found by the name the kernel exposes in sysfs, and its node in ``dev_dir``.
    Raises PortUnusable when a directory cannot be searched: that is not "no such port".
    """
    link = os.path.join(roots.dev_root, name)
    try:
        os.lstat(link)
        return link
    except PermissionError:
        raise _cannot_look_in(roots.dev_root) from None
    except OSError:
        pass
    try:
        entries = sorted(os.listdir(roots.sys_root))
    except PermissionError:
        raise _cannot_look_in(roots.sys_root) from None
    except OSError:
        return None
    for entry in entries:
        if read_port_name(os.path.join(roots.sys_root, entry, "name")) == name:
            return os.path.join(roots.dev_dir, entry)
    return None


def _cannot_look_in(directory: str) -> PortUnusable:
    return PortUnusable(f"cannot look in {directory}: permission denied (run the agent as root)")


def read_port_name(path: str) -> str | None:
    """The port name in sysfs file ``path``, or None when it is not a short regular file.

    Opened non-blocking and read with a bound: a FIFO must not hang the agent, and a link
    to ``/dev/zero`` or a huge file must not eat its memory. Devices are not even opened.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        # Checked again on the open file: the path may have changed since the stat.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _MAX_NAME_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > _MAX_NAME_BYTES:
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISBLK, "block device"),
    )
    for test, label in kinds:
        if test(mode):
            return label
    return "file of unknown type"


def _open_port(path: str, deadline: float) -> int:
    """Open ``path`` for a non-blocking write, retrying only while it is busy."""
    delay = 0.005
    while True:
        try:
            return os.open(path, _OPEN_FLAGS)
        except PermissionError:
            raise PortUnusable(
                f"{path}: permission denied (the port is root-only; run the agent as root)"
            ) from None
        except OSError as e:
            if e.errno in _BUSY_ERRNOS and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            if e.errno in GONE_ERRNOS:
                raise PortGone(f"{path}: {e.strerror}") from None
            raise PortUnusable(f"{path}: cannot open: {e.strerror}") from None


def _poll(fd: int, timeout: float) -> int:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    events = poller.poll(max(0, int(timeout * 1000)))
    return events[0][1] if events else 0


_DEAD = select.POLLHUP | select.POLLERR


def inspect(
    name: str, roots: PortRoots = DEFAULT_ROOTS, deadline: float | None = None
) -> Candidate:
    """Check port ``name``: found, a character device, and connected on the host side.

    A port busy with another opener is retried for up to 0.5 s, or until ``deadline``.
    """
    try:
        device = find_device(name, roots)
    except PortUnusable as e:
        return Candidate(name, None, problem=str(e))
    if device is None:
        return Candidate(
            name,
            None,
            problem=f"no such port (nothing in {roots.dev_root} or {roots.sys_root})",
        )
    try:
        mode = os.stat(device).st_mode
    except FileNotFoundError:
        if os.path.islink(device):
            target = os.readlink(device)
            return Candidate(name, device, problem=f"dangling symlink to {target}")
        return Candidate(name, device, problem="does not exist")
    except OSError as e:
        return Candidate(name, device, problem=f"cannot stat: {e.strerror}")
    if not stat.S_ISCHR(mode):
        return Candidate(name, device, problem=f"is a {_kind(mode)}, not a character device")
    try:
        busy_until = time.monotonic() + 0.5
        fd = _open_port(device, busy_until if deadline is None else min(busy_until, deadline))
    except PortError as e:
        return Candidate(
            name,
            device,
            is_char_device=True,
            problem=_reason(e, device),
            hung_up=isinstance(e, PortGone),
        )
    try:
        events = _poll(fd, 0)
    finally:
        os.close(fd)
    problem = events_problem(events)
    return Candidate(
        name,
        device,
        is_char_device=True,
        connected=problem is None,
        problem=problem,
        hung_up=bool(events & _DEAD),
    )


def connection_problem(fd: int) -> str | None:
    """Why the open port ``fd`` cannot take a line now, or None when it can."""
    return events_problem(_poll(fd, 0))


def events_problem(events: int) -> str | None:
    """Why a port whose ``poll()`` gave ``events`` cannot take a line now, or None.

    The kernel reports POLLHUP for a virtio port whose host side has no backend: writing
    there would block forever, so it is "not host-connected".
    """
    if events & _DEAD or not events & select.POLLOUT:
        return f"not host-connected (poll: {_events_text(events)})"
    return None


def _reason(error: PortError, device: str) -> str:
    text = str(error)
    prefix = device + ": "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _events_text(events: int) -> str:
    names = [
        label
        for bit, label in (
            (select.POLLOUT, "POLLOUT"),
            (select.POLLHUP, "POLLHUP"),
            (select.POLLERR, "POLLERR"),
        )
        if events & bit
    ]
    return "|".join(names) if names else "not writable"


def survey(
    names: Sequence[str] = CANDIDATE_PORT_NAMES, roots: PortRoots = DEFAULT_ROOTS
) -> list[Candidate]:
    """Inspect every candidate, in order; for diagnostics (``lxd-agent probe``)."""
    return [inspect(name, roots) for name in names]


def find_connected_port(
    names: Sequence[str] = CANDIDATE_PORT_NAMES,
    roots: PortRoots = DEFAULT_ROOTS,
    deadline: float | None = None,
) -> tuple[Candidate | None, list[Candidate]]:
    """Return the first usable candidate and every candidate looked at.

    Stops at the first usable one, so a healthy new port never touches the legacy one.
    """
    seen: list[Candidate] = []
    for name in names:
        candidate = inspect(name, roots, deadline)
        seen.append(candidate)
        if candidate.usable:
            return candidate, seen
    return None, seen


def status_payload(line: str, copies: int = 1, state: str | None = None) -> bytes:
    """What one write carries: ``line`` and a newline ``copies`` times, or, with ``state``,
    ``line`` once and the state line after it."""
    text = (line + "\n") * copies if state is None else f"{line}\n{state}\n"
    return text.encode("ascii")


def write_line(
    device: str, line: str, timeout: float = 2.0, copies: int = 1, state: str | None = None
) -> None:
    """Open ``device``, write ``line`` and a newline (``copies`` times), close it: all within
    ``timeout`` seconds. With ``state`` (one line of JSON), ``line`` goes once, followed by it:
    Incus 7.3's ``STARTED\n{json}\n``.

    Open-write-close per line, like LXD's own agent, so that QEMU emits VSERPORT_CHANGE
    and the host reads the ring at once. One write() call: the virtio console driver hands
    QEMU up to 32 KiB as one buffer, so the host never reads half of it. Raises PortUnusable,
    PortGone or PortBusy.
    """
    deadline = time.monotonic() + timeout
    data = status_payload(line, copies, state)
    fd = _open_port(device, deadline)
    try:
        delay = 0.005
        while data:
            remaining = deadline - time.monotonic()
            events = _poll(fd, max(remaining, 0.0))
            if events & _DEAD:
                raise PortUnusable(f"{device}: not host-connected (poll: {_events_text(events)})")
            if not events & select.POLLOUT:
                raise PortBusy(f"{device}: not writable within {timeout:g} s")
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                # poll() said writable but the queue filled up again: back off, bounded.
                if time.monotonic() >= deadline:
                    raise PortBusy(
                        f"{device}: write kept failing with EAGAIN for {timeout:g} s"
                    ) from None
                time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            except OSError as e:
                if e.errno in GONE_ERRNOS:
                    raise PortGone(f"{device}: {e.strerror}") from None
                raise PortUnusable(f"{device}: write failed: {e.strerror}") from None
            data = data[written:]
    finally:
        os.close(fd)
