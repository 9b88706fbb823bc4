"""One VM of a real daemon, from an image the harness imports, watched from the daemon's side.

`HostVm` imports a disk as the daemon's image (a split image: a `metadata.yaml` tarball and the
disk as `rootfs.img`, uploaded over the REST API), creates a VM from it with the daemon's own
configuration plus the adaptations this machine needs (`host.probes`), starts it, and tells what
the daemon knows: whether its agent flag is up (`agent_flag`: LXD answers `exec` with "isn't
currently running" while its monitor has not read `STARTED`, and tries the agent otherwise), the
daemon's own log lines about the instance, the `qemu.conf` it wrote, and how long `stop` took.
The guest's console is used only to act in the guest (stop and start the agent's unit), never
to judge: LXD's `qemu.console` socket, read directly; Incus's console through its API (it keeps
the console in a ring buffer until a client attaches: `host.websocket`). On every exit path the
VM and the image are deleted. Blocking REST calls run in a thread. Host side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import json
import re
import secrets
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host.daemon import DaemonInfo
from lxd_agent_harness.host.rest import Daemon
from lxd_agent_harness.host.websocket import WebSocketPort
from lxd_agent_harness.vm.console import ConsolePort, UnixSocketPort

AGENT_OFFLINE = {
    "lxd": "LXD VM agent isn't currently running",
    "incus": "VM agent isn't currently running",
}
"""Each daemon's answer to `exec` while its monitor's agent flag is down (`errQemuAgentOffline`
in LXD 5.0's `lxd/instance/drivers/driver_qemu.go`, Incus 6.0's
`internal/server/instance/drivers/driver_qemu.go`)."""

AGENT_STARTED_LOG = 'msg="Instance agent started"'
"""LXD's debug line when its monitor reads `STARTED` after anything else (`driver_qemu.go`)."""

CHUNK = 1 << 20


class AgentFlag(str, enum.Enum):
    """The daemon's agent flag as `exec` shows it."""

    DOWN = "down"
    """The daemon has not read `STARTED` (or read `STOPPED` since)."""
    UP = "up"
    """The daemon read `STARTED` and tried to reach the agent (over vsock)."""


class HostVm:
    """A VM of `daemon` made from `disk`; an async context manager that deletes what it made."""

    def __init__(
        self,
        client: Daemon,
        info: DaemonInfo,
        disk: Path,
        disk_format: str,
        config: dict[str, str],
        progress: Progress,
        profiles: tuple[str, ...] = (),
        root_options: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.info = info
        self.disk = disk
        self.disk_format = disk_format
        self.config = config
        self.progress = progress
        self.profiles = profiles
        """Profiles of the caller's (none of the daemon's: its `default` is a user's)."""
        self.root_options = root_options or {}
        """More keys of the root disk device (e.g. `size.state` for stateful snapshots)."""
        self.name = f"lxd-agent-check-{secrets.token_hex(4)}"
        self.fingerprint: str | None = None
        self.pool: str | None = None
        self.created = False
        self.started_at: float | None = None
        self._work: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> HostVm:
        try:
            await asyncio.to_thread(self._create)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def work(self) -> Path:
        """A directory of this VM's own on the host (the console's log), gone with it."""
        assert self._work is not None, "the VM is not created"
        return Path(self._work.name)

    def seconds(self) -> float:
        """Seconds since the start was asked for."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def _create(self) -> None:
        self._work = tempfile.TemporaryDirectory(prefix="lxd-agent-host-")
        disk = self._qcow2(Path(self._work.name))
        self.fingerprint = self._import(disk)
        self.pool = self._pool()
        self.progress(f"{self.info.kind}: creating {self.name} from image {self.fingerprint[:12]}")
        self.client.request(
            "POST",
            "/1.0/instances",
            {
                "name": self.name,
                "type": "virtual-machine",
                "source": {"type": "image", "fingerprint": self.fingerprint},
                "profiles": list(self.profiles),
                "config": self.config,
                "devices": {
                    "root": {"type": "disk", "path": "/", "pool": self.pool, **self.root_options}
                },
            },
        )
        self.created = True

    def _qcow2(self, work: Path) -> Path:
        """The disk as qcow2, which a split VM image's `rootfs.img` is."""
        if self.disk_format == "qcow2":
            return self.disk
        converted = work / "rootfs.img"
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                self.disk_format,
                "-O",
                "qcow2",
                str(self.disk),
                str(converted),
            ],
            check=True,
            capture_output=True,
        )
        return converted

    def _metadata(self) -> bytes:
        metadata = (
            "architecture: x86_64\n"
            f"creation_date: {int(time.time())}\n"
            "properties:\n"
            f"  description: {json.dumps('lxd-agent-harness check of ' + self.disk.name)}\n"
            "  os: unknown\n"
            "  release: unknown\n"
        ).encode()
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            entry = tarfile.TarInfo("metadata.yaml")
            entry.size = len(metadata)
            entry.mtime = int(time.time())
            tar.addfile(entry, io.BytesIO(metadata))
        return out.getvalue()

    def _import(self, disk: Path) -> str:
        boundary = secrets.token_hex(16)
        metadata = self._metadata()

        def part(name: str, filename: str) -> bytes:
            return (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()

        head = (
            part("metadata", "metadata.tar") + metadata + b"\r\n" + part("rootfs.img", "rootfs.img")
        )
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            with disk.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
            yield tail

        length = len(head) + disk.stat().st_size + len(tail)
        self.progress(f"{self.info.kind}: importing {self.disk} ({length >> 20} MiB)")
        done = self.client.request(
            "POST",
            "/1.0/images",
            raw=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(length),
            },
        )
        fingerprint = str((done.get("metadata") or {}).get("fingerprint", ""))
        if not fingerprint:
            raise DaemonError(
                f"{self.info.kind} imported the image but named no fingerprint",
                daemon=self.info.kind,
                request="POST /1.0/images",
            )
        return fingerprint

    def _pool(self) -> str:
        """A storage pool to put the VM in: the daemon's first, or a `dir` pool made in a daemon
        of the harness's own."""
        pools = self.client.request("GET", "/1.0/storage-pools")
        if pools:
            return str(pools[0]).rsplit("/", 1)[-1]
        if not self.info.owned:  # a user's daemon is not set up by the harness
            raise DaemonError(
                f"the {self.info.kind} daemon has no storage pool to put the VM in; create one "
                f"(`{self.info.kind} storage create default dir`) and retry",
                daemon=self.info.kind,
                request="GET /1.0/storage-pools",
            )
        self.client.request("POST", "/1.0/storage-pools", {"name": "harness", "driver": "dir"})
        return "harness"

    async def start(self) -> None:
        self.progress(f"{self.info.kind}: starting {self.name}")
        self.started_at = time.monotonic()
        try:
            await asyncio.to_thread(self._state, "start")
        except DaemonError as e:
            raise self._with_qemu_log(e) from None

    async def snapshot(self, name: str, stateful: bool) -> None:
        """`lxc snapshot [--stateful]`: a stateful one needs `migration.stateful` and a root
        disk whose `size.state` exceeds the VM's memory."""
        await asyncio.to_thread(
            self.client.request,
            "POST",
            f"/1.0/instances/{self.name}/snapshots",
            {"name": name, "stateful": stateful},
        )

    async def restore(self, name: str, stateful: bool) -> None:
        """`lxc restore [--stateful]`: a stateful restore starts the VM from the saved state;
        a failed one raises with QEMU's own words in `log_tail`."""
        try:
            await asyncio.to_thread(
                self.client.request,
                "PUT",
                f"/1.0/instances/{self.name}",
                {"restore": name, "stateful": stateful},
            )
        except DaemonError as e:
            raise self._with_qemu_log(e) from None

    def _with_qemu_log(self, e: DaemonError) -> DaemonError:
        """The daemon's error (it ends in e.g. "Process exited with non-zero value 1" or
        "Monitor is disconnected") with QEMU's own words from its log."""
        return DaemonError(
            str(e),
            daemon=e.daemon,
            request=e.request,
            status_code=e.status_code,
            error=e.error,
            log_tail=[*e.log_tail, *self._qemu_log()],
        )

    def _qemu_log(self) -> list[str]:
        directory = self.log_dir()
        if directory is None:
            return []
        try:
            return (directory / "qemu.log").read_text(errors="replace").splitlines()[-20:]
        except OSError:
            return []

    def _state(self, action: str, timeout: float | None = None, force: bool = False) -> None:
        body: dict[str, Any] = {"action": action, "force": force}
        if timeout is not None:
            body["timeout"] = int(timeout)
        self.client.request("PUT", f"/1.0/instances/{self.name}/state", body)

    async def stop(self, timeout: float) -> float | None:
        """Ask the daemon to stop the VM within `timeout` s (the power button); how long it
        took, or None when it was not off by then (it is then forced off)."""
        began = time.monotonic()
        try:
            await asyncio.to_thread(self._state, "stop", timeout)
        except DaemonError as e:
            self.progress(
                f"{self.info.kind}: stop within {timeout:g} s failed ({e.error}); forcing it"
            )
            await asyncio.to_thread(self._state, "stop", None, True)
            return None
        return time.monotonic() - began

    async def status(self) -> str:
        state = await asyncio.to_thread(
            self.client.request, "GET", f"/1.0/instances/{self.name}/state"
        )
        return str(state.get("status", ""))

    async def close(self) -> None:
        """Delete the VM (forced off first) and the image; idempotent, on every exit path."""
        await asyncio.to_thread(self._delete)

    def _delete(self) -> None:
        try:
            if self.created:
                with contextlib.suppress(DaemonError):  # it was not running
                    self._state("stop", None, True)
                self.client.request("DELETE", f"/1.0/instances/{self.name}")
                self.created = False
            if self.fingerprint is not None:
                self.client.request("DELETE", f"/1.0/images/{self.fingerprint}")
                self.fingerprint = None
        finally:
            if self._work is not None:
                self._work.cleanup()
                self._work = None

    # -- what the daemon knows ----------------------------------------------------------------

    async def agent_flag(self) -> AgentFlag:
        """The daemon's agent flag, from its answer to an `exec` of `true`."""
        try:
            await asyncio.to_thread(
                self.client.request,
                "POST",
                f"/1.0/instances/{self.name}/exec",
                {
                    "command": ["true"],
                    "environment": {},
                    "wait-for-websocket": False,
                    "interactive": False,
                    "record-output": True,
                    "width": 80,
                    "height": 24,
                },
                timeout=30,
            )
        except DaemonError as e:
            return AgentFlag.DOWN if AGENT_OFFLINE[self.info.kind] in e.error else AgentFlag.UP
        return AgentFlag.UP

    def log_lines(self) -> list[str]:
        """The daemon's own log lines about this VM's agent and state, when it has a log."""
        log = self.info.log
        if log is None:
            return []
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return []
        name = re.escape(self.name)
        mine = re.compile(rf"instance={name}\b|instance=\"{name}\"")
        return [
            line
            for line in text.splitlines()
            if len(line) < 2000
            and mine.search(line)
            and ("agent" in line or "level=info" in line or "level=error" in line)
        ]

    def log_dir(self) -> Path | None:
        """The daemon's directory of this VM's files (`qemu.conf`, `qemu.console`)."""
        if self.info.files_dir is None:
            return None
        return self.info.files_dir / self.name

    def console_opener(self) -> Callable[[], ConsolePort] | None:
        """How to open the guest's console, once the VM runs (None when it cannot be had)."""
        directory = self.log_dir()
        if directory is not None and (directory / "qemu.console").exists():
            path = str(directory / "qemu.console")
            return lambda: UnixSocketPort(path)
        if self.info.kind == "incus":
            return self._console_websocket
        return None

    def _console_websocket(self) -> WebSocketPort:
        answer = self.client.request(
            "POST",
            f"/1.0/instances/{self.name}/console",
            {"type": "console", "width": 80, "height": 24},
            wait=False,
        )
        operation = str(answer["operation"])
        secret = answer["metadata"]["metadata"]["fds"]["0"]
        return WebSocketPort(
            self.client.socket, f"{operation}/websocket?secret={secret}", self.info.kind
        )

    async def qemu_smbios(self) -> list[str] | None:
        """The `-smbios` values on the command line of the daemon's QEMU for this VM (the
        host's identity, and any credentials); None when its process cannot be read."""
        state = await asyncio.to_thread(
            self.client.request, "GET", f"/1.0/instances/{self.name}/state"
        )
        pid = state.get("pid") if isinstance(state, dict) else None
        if not isinstance(pid, int) or pid <= 0:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return [
            argv[i + 1].decode(errors="replace")
            for i, arg in enumerate(argv[:-1])
            if arg == b"-smbios"
        ]

    def qemu_conf(self) -> str | None:
        directory = self.log_dir()
        if directory is None:
            return None
        try:
            return (directory / "qemu.conf").read_text()
        except OSError:
            return None
