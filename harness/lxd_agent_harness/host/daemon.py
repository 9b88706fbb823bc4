"""A real LXD daemon, started from its installed binaries in a state directory of its own.

`LocalDaemon` runs `lxd` (Debian's package here; the snap's or any other on a user's machine)
with `LXD_DIR` set to a fresh directory under the temporary directory, so that a user's own
daemon, its socket and its state are never touched, and nothing outlives the run: on every exit
path the daemon is shut down (its VMs with it), what it mounted under its directory is detached
and the directory removed. The ways around this machine's limits (`host.probes`) are applied
here, and only where a probe found the limit: a `modprobe` stub and Debian 12's QEMU first on
the daemon's PATH, the memlock filter (`host.memlock`) around the daemon. A daemon that cannot
start is a `DaemonError` with its log's tail. Host side only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host import probes
from lxd_agent_harness.host.probes import Adaptation
from lxd_agent_harness.host.qemu_compat import compat_qemu
from lxd_agent_harness.host.rest import Daemon
from lxd_agent_harness.image.buildsteps import detach_mounts_under, remove_tree

START_TIMEOUT = 120.0
"""Seconds for the daemon to answer on its socket (LXD 5.0.2 took about 8 s here)."""

SHUTDOWN_TIMEOUT = 120.0
"""Seconds for `lxd shutdown` to stop the daemon's VMs and itself, before it is killed."""

SOCKET_PATH_MAX = 107
"""An AF_UNIX socket path's bytes at most: the state directory must leave room for it."""

LOG_TAIL_LINES = 20


def parse_version(text: str) -> tuple[int, ...]:
    """`5.0.2` as (5, 0, 2); the leading numbers only (`6.0.4-1` -> (6, 0, 4))."""
    found = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(n) for n in found[0].split(".")) if found else ()


@dataclass
class DaemonInfo:
    """What the daemon says it is, and what was adapted for it."""

    kind: str
    version: str
    qemu_version: str
    adaptations: list[Adaptation] = field(default_factory=list)
    logs_dir: Path | None = None
    """Where the daemon keeps each instance's `NAME/qemu.conf` and `NAME/qemu.console`."""
    log: Path | None = None
    """The daemon's log file, when the harness started it."""
    owned: bool = False
    """The harness started this daemon (it may then set it up: a storage pool)."""

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return parse_version(self.version)


def qemu_driver_version(environment: dict[str, Any]) -> str:
    """The QEMU version a daemon reports (`driver: "lxc | qemu"`, `driver_version: "5.0.2 |
    7.2.22"`), or "" when its VM driver is not up."""
    drivers = [d.strip() for d in str(environment.get("driver", "")).split("|")]
    versions = [v.strip() for v in str(environment.get("driver_version", "")).split("|")]
    return dict(zip(drivers, versions)).get("qemu", "")


def _state_directory() -> Path:
    base = Path(tempfile.gettempdir())
    if len(str(base)) > SOCKET_PATH_MAX - 40:
        base = Path("/tmp")  # a long TMPDIR (pytest's, xdist's) leaves no room for the socket
    return Path(tempfile.mkdtemp(prefix="lxd-agent-lxd-", dir=base))


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    # LXD's debug log dumps whole JSON answers; the lines a person needs are the short ones.
    short = [line for line in text.splitlines() if len(line) < 2000]
    return short[-lines:]


class LocalDaemon:
    """An LXD daemon of the harness's own; a context manager. `client` talks to it."""

    def __init__(self, progress: Progress, binary: str = "lxd") -> None:
        self.progress = progress
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        self.work: Path | None = None
        self.info: DaemonInfo | None = None

    @property
    def client(self) -> Daemon:
        assert self.work is not None, "the daemon is not started"
        return Daemon(self.work / "state" / "unix.socket", "lxd")

    @property
    def started(self) -> DaemonInfo:
        """What the started daemon said it is."""
        assert self.info is not None, "the daemon is not started"
        return self.info

    @property
    def log(self) -> Path:
        assert self.work is not None
        return self.work / "lxd.log"

    def __enter__(self) -> LocalDaemon:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        lxd = shutil.which(self.binary)
        if lxd is None:
            raise DaemonError(
                f"looked for {self.binary} on PATH and did not find it; install Debian's lxd "
                "package (in a clone: `make setup`)",
                daemon="lxd",
            )
        version = self._binary_version(lxd)
        adaptations: list[Adaptation] = []
        self.work = _state_directory()
        bin_dir = self.work / "bin"
        bin_dir.mkdir()
        path = [str(bin_dir)]
        if (found := probes.vsock_module_missing()) is not None:
            adaptations.append(found)
            stub = bin_dir / "modprobe"
            stub.write_text(
                "#!/bin/sh\n# lxd-agent-harness: see host.probes.vsock_module_missing\nexit 0\n"
            )
            stub.chmod(0o755)
        if (found := probes.qemu_too_new(parse_version(version), probes.qemu_major())) is not None:
            adaptations.append(found)
            path.insert(0, str(compat_qemu(self.progress)))
        command = [lxd, "--debug", "--logfile", str(self.log)]
        if (found := probes.memlock_fixed()) is not None:
            adaptations.append(found)
            command = [sys.executable, "-m", "lxd_agent_harness.host.memlock", *command]
        for adaptation in adaptations:
            self.progress(f"lxd: adapted: {adaptation.name}: {adaptation.reason}")
        state = self.work / "state"
        state.mkdir()
        env = dict(os.environ)
        env["LXD_DIR"] = str(state)
        env["PATH"] = os.pathsep.join([*path, env.get("PATH", "/usr/bin:/bin")])
        self._env = env
        self.progress(f"lxd: starting {lxd} {version} in {state}")
        started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.work / "lxd.stderr").open("wb"),
            start_new_session=True,  # the daemon and its forks are one group, killed together
        )
        self._wait_ready(started)
        server = self.client.request("GET", "/1.0")
        environment = server.get("environment", {})
        self.info = DaemonInfo(
            kind="lxd",
            version=str(environment.get("server_version", version)),
            qemu_version=qemu_driver_version(environment),
            adaptations=adaptations,
            logs_dir=state / "logs",
            log=self.log,
            owned=True,
        )
        self.progress(
            f"lxd: {self.info.version} up in {time.monotonic() - started:.1f} s "
            f"(QEMU {self.info.qemu_version or 'unknown'})"
        )

    @staticmethod
    def _binary_version(lxd: str) -> str:
        done = subprocess.run([lxd, "--version"], capture_output=True, text=True, check=False)
        return done.stdout.strip() or "0"

    def _wait_ready(self, started: float) -> None:
        assert self.process is not None
        while time.monotonic() - started < START_TIMEOUT:
            if self.process.poll() is not None:
                raise DaemonError(
                    f"lxd exited with status {self.process.returncode} while starting; "
                    f"see its log {self.log}",
                    daemon="lxd",
                    log_tail=self.log_tail(),
                )
            if self.client.socket.exists():
                try:
                    self.client.request("GET", "/internal/ready", timeout=5)
                    return
                except DaemonError:
                    pass
            time.sleep(0.5)
        raise DaemonError(
            f"lxd did not answer on {self.client.socket} within {START_TIMEOUT:g} s",
            daemon="lxd",
            log_tail=self.log_tail(),
        )

    def log_tail(self) -> list[str]:
        tail = _log_tail(self.log)
        if self.work is not None:
            with open(self.work / "lxd.stderr", errors="replace") as stderr:
                tail += stderr.read().splitlines()[-LOG_TAIL_LINES:]
        return tail

    def close(self) -> None:
        """Shut the daemon down (its VMs with it), kill what is left, detach, remove. Idempotent."""
        if self.process is not None and self.process.poll() is None:
            done = subprocess.run(
                [
                    shutil.which(self.binary) or self.binary,
                    "shutdown",
                    f"--timeout={int(SHUTDOWN_TIMEOUT)}",
                ],
                env=self._env,
                capture_output=True,
                check=False,
                timeout=SHUTDOWN_TIMEOUT + 30,
            )
            if done.returncode != 0:
                self.progress(f"lxd: shutdown said {done.stderr.decode(errors='replace').strip()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        if self.process is not None:
            # Whatever the daemon left in its session (a QEMU, forkdns) goes with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        if self.work is not None:
            detach_mounts_under(self.work)
            remove_tree(self.work)
            self.work = None

    def settings(self) -> dict[str, Any]:
        return {"LXD_DIR": self._env["LXD_DIR"], "PATH": self._env["PATH"]}


def local_daemon(kind: str, progress: Progress) -> LocalDaemon:
    """A daemon of `kind` of the harness's own, to be entered."""
    if kind != "lxd":
        raise DaemonError(
            f"--host {kind}: the harness cannot start an {kind} daemon on this machine yet "
            "(incusd listens on vsock as the host, which a machine without vhost_vsock cannot "
            "do); give a running one with --host-socket",
            daemon=kind,
        )
    return LocalDaemon(progress)


DEFAULT_LOGS = {"lxd": Path("/var/log/lxd"), "incus": Path("/var/log/incus")}
"""Where a daemon started without LXD_DIR / INCUS_DIR keeps its instances' logs."""


def running_daemon(kind: str, socket: Path) -> tuple[Daemon, DaemonInfo]:
    """The daemon of `kind` listening on `socket`, not started by the harness (left as found,
    but for what the harness makes in it, which it deletes)."""
    client = Daemon(socket, kind)
    server = client.request("GET", "/1.0")
    environment = server.get("environment", {})
    found = str(environment.get("server", kind))
    if found != kind:
        raise DaemonError(
            f"--host {kind}: {socket} is an {found} daemon's socket; give --host {found}",
            daemon=kind,
        )
    # A daemon with a state directory of its own keeps logs beside its socket.
    logs = socket.parent / "logs"
    return client, DaemonInfo(
        kind=kind,
        version=str(environment.get("server_version", "")),
        qemu_version=qemu_driver_version(environment),
        logs_dir=logs if logs.is_dir() else DEFAULT_LOGS.get(kind),
    )
