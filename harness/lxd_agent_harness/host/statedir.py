"""The state directories of the harness's daemons, and reclaiming those a killed run left behind.

A `LocalDaemon` cleans up on every exit path its own process sees, Ctrl-C and SIGTERM included.
A run killed outright (SIGKILL, a CI job's time limit, a session that ended) cannot: its daemon's
directory stays, with what the daemon mounted in it (LXD: `shmounts`, `devlxd`, each VM's
`config.mount`), and the daemon itself and its QEMUs when only the harness was killed (they are in
a session of their own). So each directory carries `owner.lock`, flocked by the process that made
it for as long as it uses it, and every daemon the harness starts first reclaims the directories
whose lock nobody holds: their processes are killed, their mounts detached, the tree removed, and
each is reported. Only directories named as the harness names them are looked at, and only the
processes whose command line or environment names such a directory are killed. A directory with no
`owner.lock` (made by a harness before 0.3, or being made right now) is taken only once it is
`UNLOCKED_GRACE` seconds old and no process names it. Host side only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lxd_agent_harness.base.sockets import socket_base
from lxd_agent_harness.image.buildsteps import detach_mounts_under, mounts_under, remove_tree

OWNER_LOCK = "owner.lock"

UNLOCKED_GRACE = 600.0
"""Seconds after which a directory without `owner.lock` is taken for abandoned (when no process
names it): far longer than a harness takes between making a directory and locking it."""


def state_base() -> Path:
    """Where daemons' state directories go: where the harness's sockets go (`base.sockets`)."""
    return socket_base()


def prefix(kind: str) -> str:
    return f"lxd-agent-{kind}-"


@dataclass
class StateDirectory:
    """A daemon's directory and the lock on it that says it is in use; `release` when done."""

    path: Path
    lock: IO[bytes] | None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def new_state_directory(kind: str, base: Path | None = None) -> StateDirectory:
    """A fresh directory for a daemon of `kind` in `base` (`state_base()`), locked by this process.

    The lock file is locked under a temporary name and only then renamed into place, so another
    harness never sees an `owner.lock` that nobody holds in a directory that is in use.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix(kind), dir=base or state_base()))
    staging = path / f".{OWNER_LOCK}"
    lock = staging.open("wb")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    staging.rename(path / OWNER_LOCK)
    return StateDirectory(path, lock)


@dataclass(frozen=True)
class Reclaimed:
    """A directory a killed run left, and what was found in it and undone."""

    path: Path
    processes: tuple[int, ...]
    """The processes that named it (a daemon, its QEMUs), killed."""
    mounts: int
    """The file systems mounted under it, detached."""

    def describe(self) -> str:
        return (
            f"reclaimed {self.path}, left by a run that was killed "
            f"(processes ended: {len(self.processes)}, mounts detached: {self.mounts})"
        )


def processes_naming(path: Path) -> list[int]:
    """The processes (not this one) whose command line or environment names `path`."""
    mark = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                if mark in (entry / name).read_bytes():
                    found.append(int(entry.name))
                    break
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running: not gone and not a zombie waiting for a parent that is not us."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _take(path: Path) -> IO[bytes] | None:
    """The lock of an abandoned directory, now ours; None when the directory is in use."""
    try:
        lock = (path / OWNER_LOCK).open("rb")
    except FileNotFoundError:
        young = time.time() - path.stat().st_mtime < UNLOCKED_GRACE
        return None if young or processes_naming(path) else open(os.devnull, "rb")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def reclaim_abandoned(kinds: tuple[str, ...] = ("lxd", "incus")) -> list[Reclaimed]:
    """Undo what killed runs left of their daemons of `kinds`; what was reclaimed."""
    reclaimed = []
    for kind in kinds:
        for path in sorted(state_base().glob(f"{prefix(kind)}*")):
            with contextlib.suppress(FileNotFoundError):  # another harness took it first
                if not path.is_dir() or (lock := _take(path)) is None:
                    continue
                with lock:
                    pids = processes_naming(path)
                    _kill(pids)
                    mounts = len(mounts_under(path))
                    detach_mounts_under(path)
                    remove_tree(path)
                reclaimed.append(Reclaimed(path, tuple(pids), mounts))
    return reclaimed
