"""A real LXD or Incus daemon, started from its binaries in a state directory of its own.

`LocalDaemon` runs `lxd` (Debian's package here; the snap's or any other on a user's machine)
or `incusd` (the installed one, else Debian's bookworm-backports package unpacked into the cache:
`host.packages`) with `LXD_DIR` / `INCUS_DIR` set to a fresh directory under the temporary
directory, so that a user's own daemon, its socket and its state are never touched, and nothing
outlives the run: on every exit path the daemon is shut down (its VMs with it), what it mounted
under its directory is detached and the directory removed; what a run killed outright left is
reclaimed by the next daemon's start (`host.statedir`). The ways around this machine's limits
(`host.probes`) are applied here, and only where a probe found the limit: a `modprobe` stub and
Debian 12's QEMU first on the daemon's PATH, the launcher's seccomp filter around the daemon
(`host.launcher`: RLIMIT_MEMLOCK, Incus's vsock). A daemon that cannot start is a `DaemonError`
with its log's tail. `running_daemon` is one the user started (`--host-socket`). Host side only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host import probes
from lxd_agent_harness.host.packages import compat_qemu, incus_from_backports
from lxd_agent_harness.host.probes import Adaptation
from lxd_agent_harness.host.rest import Daemon
from lxd_agent_harness.host.statedir import StateDirectory, new_state_directory, reclaim_abandoned
from lxd_agent_harness.image.buildsteps import detach_mounts_under, remove_tree

START_TIMEOUT = 120.0
"""Seconds for the daemon to answer on its socket (LXD 5.0.2 took under a second here)."""

SHUTDOWN_TIMEOUT = 120.0
"""Seconds for `shutdown` to stop the daemon's VMs and itself, before it is killed."""

LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Kind:
    """What differs between LXD and Incus for the harness."""

    name: str
    binary: str
    """The daemon's program, looked for on PATH and then in `libexec`."""
    libexec: Path | None
    dir_variable: str
    """The environment variable that gives the daemon its state directory."""
    files: str
    """The subdirectory of the state directory with each VM's `qemu.conf` and `qemu.console`."""
    default_files: Path
    """Where a daemon started without that variable keeps them."""


KINDS = {
    "lxd": Kind("lxd", "lxd", None, "LXD_DIR", "logs", Path("/var/log/lxd")),
    "incus": Kind(
        "incus", "incusd", Path("/usr/libexec/incus/incusd"), "INCUS_DIR", "run", Path("/run/incus")
    ),
}


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
    files_dir: Path | None = None
    """Where the daemon keeps each VM's `NAME/qemu.conf` and `NAME/qemu.console`."""
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


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    # A debug log dumps whole JSON answers; the lines a person needs are the short ones.
    short = [line for line in text.splitlines() if len(line) < 2000]
    return short[-lines:]


class LocalDaemon:
    """A daemon of `kind` of the harness's own; a context manager. `client` talks to it."""

    def __init__(
        self,
        progress: Progress,
        kind: str = "lxd",
        binary: str | None = None,
        path: Sequence[Path] = (),
    ) -> None:
        self.progress = progress
        self.kind = KINDS[kind]
        self.binary = binary or self.kind.binary
        self.path = list(path)
        """Directories first on the daemon's PATH (a root's `usr/bin`: LXD looks for its
        `lxd-agent` there)."""
        self.process: subprocess.Popen[bytes] | None = None
        self._groups: list[int] = []
        """Process groups of daemons stopped by `upgrade`: their VMs' QEMUs are still in them."""
        self.work: Path | None = None
        self._state: StateDirectory | None = None
        self.info: DaemonInfo | None = None
        self._env: dict[str, str] = {}
        self._program = ""
        self._command: list[str] = []
        self._system_path = ""
        self._bin_path: list[str] = []

    @property
    def client(self) -> Daemon:
        assert self.work is not None, "the daemon is not started"
        return Daemon(self.work / "state" / "unix.socket", self.kind.name)

    @property
    def started(self) -> DaemonInfo:
        """What the started daemon said it is."""
        assert self.info is not None, "the daemon is not started"
        return self.info

    @property
    def log(self) -> Path:
        assert self.work is not None
        return self.work / f"{self.kind.name}.log"

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

    def _find(self, adaptations: list[Adaptation], env: dict[str, str]) -> str:
        """The daemon's program: installed, or (Incus only) Debian's package unpacked."""
        found = shutil.which(self.binary)
        libexec = self.kind.libexec
        if found is None and libexec is not None and libexec.is_file():
            found = str(libexec)
        if found is not None:
            return found
        if self.kind.name != "incus" or self.binary != self.kind.binary:
            raise DaemonError(
                f"looked for {self.binary} on PATH and did not find it; install Debian's "
                f"{self.kind.name} package (in a clone: `make setup`)",
                daemon=self.kind.name,
            )
        unpacked = incus_from_backports(self.progress)
        env["LD_LIBRARY_PATH"] = str(unpacked.library_path)
        adaptations.append(
            Adaptation(
                "incus-unpacked",
                "incusd is not installed: Debian's incus-base from bookworm-backports is unpacked "
                "into the cache (installing it would register qemu-user-binfmt's interpreters on "
                "this host)",
            )
        )
        return str(unpacked.incusd)

    def _start(self) -> None:
        env = dict(os.environ)
        adaptations: list[Adaptation] = []
        program = self._find(adaptations, env)
        self._program = program
        version = self._binary_version(program, env)
        for reclaimed in reclaim_abandoned():
            self.progress(f"{self.kind.name}: {reclaimed.describe()}")
        self._state = new_state_directory(self.kind.name)
        self.work = self._state.path
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
        if self.kind.name == "lxd":
            qemu = probes.qemu_too_new(parse_version(version), probes.qemu_major())
            if qemu is not None:
                adaptations.append(qemu)
                path.insert(0, str(compat_qemu(self.progress)))
        command = [program, "--debug", "--logfile", str(self.log)]
        launcher = []
        if (found := probes.memlock_fixed()) is not None:
            adaptations.append(found)
            launcher.append("--memlock-noop")
        if self.kind.name == "incus" and (found := probes.vsock_host_missing()) is not None:
            adaptations.append(found)
            launcher.append("--vsock-stand-in")
        if launcher:
            command = [sys.executable, "-m", "lxd_agent_harness.host.launcher", *launcher, *command]
        for adaptation in adaptations:
            self.progress(f"{self.kind.name}: adapted: {adaptation.name}: {adaptation.reason}")
        state = self.work / "state"
        state.mkdir()
        env[self.kind.dir_variable] = str(state)
        self._system_path = env.get("PATH", "/usr/bin:/bin")
        self._bin_path = path
        env["PATH"] = os.pathsep.join([*map(str, self.path), *path, self._system_path])
        self._env = env
        self._command = command
        self._launch(command, program, version, adaptations)

    def _launch(
        self, command: list[str], program: str, version: str, adaptations: list[Adaptation]
    ) -> None:
        assert self.work is not None
        state = self.work / "state"
        self.progress(f"{self.kind.name}: starting {program} {version} in {state}")
        started = time.monotonic()
        with (self.work / "daemon.stderr").open("ab") as stderr:
            self.process = subprocess.Popen(
                command,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # the daemon and its forks are one group, killed together
            )
        self._wait_ready(started)
        server = self.client.request("GET", "/1.0")
        environment = server.get("environment", {})
        self.info = DaemonInfo(
            kind=self.kind.name,
            version=str(environment.get("server_version", version)),
            qemu_version=qemu_driver_version(environment),
            adaptations=adaptations,
            files_dir=state / self.kind.files,
            log=self.log,
            owned=True,
        )
        self.progress(
            f"{self.kind.name}: {self.info.version} up in {time.monotonic() - started:.1f} s "
            f"(QEMU {self.info.qemu_version or 'unknown'})"
        )

    def upgrade(self, binary: str, path: Sequence[Path] = ()) -> DaemonInfo:
        """Replace the running daemon by `binary` on the same state directory, as a package
        upgrade does: the old one gets SIGTERM, on which LXD stops itself and leaves its
        instances running (`lxd/daemon.go`: SIGTERM is a reload, SIGPWR a shutdown; Debian's
        unit has `KillMode=process`), then the new one starts with `path` first on its PATH.
        What the new daemon says it is."""
        assert self.process is not None and self.work is not None and self.info is not None
        old = self.process
        self.progress(f"{self.kind.name}: stopping {self._program} (SIGTERM) for the upgrade")
        old.send_signal(signal.SIGTERM)
        try:
            old.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise DaemonError(
                f"{self.kind.name} did not stop within {SHUTDOWN_TIMEOUT:g} s of SIGTERM",
                daemon=self.kind.name,
                log_tail=self.log_tail(),
            ) from None
        self._groups.append(old.pid)  # its VMs' QEMUs stay in its group: closed with us
        self.binary, self.path = binary, list(path)
        program = self._find([], self._env)
        version = self._binary_version(program, self._env)
        self._env["PATH"] = os.pathsep.join(
            [*map(str, self.path), *self._bin_path, self._system_path]
        )
        self._command[self._command.index(self._program)] = program
        self._program = program
        self._launch(self._command, program, version, self.info.adaptations)
        return self.started

    @staticmethod
    def _binary_version(program: str, env: dict[str, str]) -> str:
        done = subprocess.run(
            [program, "--version"], capture_output=True, text=True, env=env, check=False
        )
        return done.stdout.strip() or "0"

    def _wait_ready(self, started: float) -> None:
        assert self.process is not None
        while time.monotonic() - started < START_TIMEOUT:
            if self.process.poll() is not None:
                raise DaemonError(
                    f"{self.kind.name} exited with status {self.process.returncode} while "
                    f"starting; see its log {self.log}",
                    daemon=self.kind.name,
                    log_tail=self.log_tail(),
                )
            if self.client.socket.exists():
                with contextlib.suppress(DaemonError):
                    self.client.request("GET", "/internal/ready", timeout=5)
                    return
            time.sleep(0.5)
        raise DaemonError(
            f"{self.kind.name} did not answer on {self.client.socket} within {START_TIMEOUT:g} s",
            daemon=self.kind.name,
            log_tail=self.log_tail(),
        )

    def log_tail(self) -> list[str]:
        tail = _log_tail(self.log)
        if self.work is not None:
            with contextlib.suppress(OSError):
                stderr = (self.work / "daemon.stderr").read_text(errors="replace")
                tail += stderr.splitlines()[-LOG_TAIL_LINES:]
        return tail

    def close(self) -> None:
        """Shut the daemon down (its VMs with it), kill what is left, detach, remove. Idempotent."""
        if self.process is not None and self.process.poll() is None:
            done = subprocess.run(
                [self._program, "shutdown", f"--timeout={int(SHUTDOWN_TIMEOUT)}"],
                env=self._env,
                capture_output=True,
                check=False,
                timeout=SHUTDOWN_TIMEOUT + 30,
            )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
            if done.returncode != 0 and self.process.poll() is None:
                # Incus 6.0 exits before it answers its shutdown request: an error from
                # `shutdown` matters only when the daemon is still there.
                said = done.stderr.decode(errors="replace").strip()
                self.progress(f"{self.kind.name}: shutdown said {said}; killing it")
        if self.process is not None:
            # Whatever the daemon left in its session (a QEMU, forkdns) goes with it, and so
            # does what daemons it replaced left in theirs.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        for group in self._groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self._groups = []
        if self.work is not None:
            detach_mounts_under(self.work)
            remove_tree(self.work)
            self.work = None
        if self._state is not None:
            self._state.release()
            self._state = None


def local_daemon(kind: str, progress: Progress) -> LocalDaemon:
    """A daemon of `kind` of the harness's own, to be entered."""
    return LocalDaemon(progress, kind)


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
    # A daemon with a state directory of its own keeps its VMs' files beside its socket.
    files = socket.parent / KINDS[kind].files
    return client, DaemonInfo(
        kind=kind,
        version=str(environment.get("server_version", "")),
        qemu_version=qemu_driver_version(environment),
        files_dir=files if files.is_dir() else KINDS[kind].default_files,
    )
