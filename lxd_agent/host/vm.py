"""Boot a guest under QEMU with one of LXD's device layouts and drive it from the host.

`qemu_args` builds the whole QEMU command line in one place, top to bottom. `Vm` is an async
context manager around one running guest: it starts QEMU paused (so no console byte is lost),
reads the serial console with pyserial into a log file, starts the ring-buffer monitor, lets the
guest run, and offers what the harness and the tests need: wait for a ring state, power the guest
off, wait for it to be off, run a command through the console, and the timeline. Everything it
makes (QEMU, sockets, the disk overlay, the console reader) is released on every exit path.

`choose_accel` decides between KVM and TCG and says why: KVM only after a probe boot proved that
it really runs a guest here.

Host side only. It must never write the base image (boots use a qcow2 overlay in a temporary
directory), and it runs one guest at a time on a machine: every `Vm` holds a lock in the cache
directory while it runs, and a second one waits for it (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Union

import serial
from qemu.qmp import QMPError

from lxd_agent.host.errors import HarnessError, QemuError
from lxd_agent.host.image import GuestImage, Progress, cache_root
from lxd_agent.host.layouts import Layout, get_layout
from lxd_agent.host.monitor import RingbufMonitor, TimelineEntry
from lxd_agent.host.qemu import DEFAULT_QEMU_BINARY, QemuProcess
from lxd_agent.protocol import DEFAULT_RING_SIZE

CONSOLE_ID = "console"
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0"
DEFAULT_MEMORY_MIB = 1024
# Two vCPUs use both host cores under multi-threaded TCG: login in 11 s instead of 22 s.
DEFAULT_CPUS = 2

# Waits, in seconds. Under TCG on 2 cores a boot reaches STARTED in 10-13 s (facts §6).
BOOT_TIMEOUT = 120.0
POWEROFF_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
QMP_TIMEOUT = 10.0
# Another harness VM (a test run, a demo) may hold the machine's cores for a few minutes.
VM_LOCK_TIMEOUT = 900.0

# What the console shows at each step of a boot, for the timeline.
CONSOLE_MILESTONES = (
    ("kernel up", re.compile(rb"Linux version \d")),
    ("systemd up", re.compile(rb"Welcome to ")),
    ("login prompt", re.compile(rb"login: ")),
)
SHELL_PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")

# A guest can print without end: keep this much of the console in memory (the log has it all).
CONSOLE_MEMORY_BYTES = 4 << 20


class VmError(HarnessError):
    """The guest did not do what the harness waited for, or QEMU stopped under it."""


class Accel(str, enum.Enum):
    """Which accelerator to use: `auto` probes KVM first and falls back to TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str


@dataclass(frozen=True)
class DirectBoot:
    """The project's image: QEMU loads its kernel and initrd; the disk is a bare ext4 root."""

    image: GuestImage
    append: str = KERNEL_APPEND


@dataclass(frozen=True)
class FirmwareBoot:
    """A user's own cloud image, booted through the firmware from its own boot loader."""

    disk: Path
    disk_format: str


Boot = Union[DirectBoot, FirmwareBoot]


@dataclass(frozen=True)
class VmConfig:
    layout: Layout
    boot: Boot
    accel: Accel = Accel.TCG
    ring_size: int = DEFAULT_RING_SIZE
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    seed: Path | None = None
    network: bool = False
    # A second QMP socket for a person (`--keep`): the harness's own is taken by the harness.
    user_qmp: bool = False


@dataclass(frozen=True)
class VmFiles:
    """Where one boot's files go, all inside its temporary directory."""

    workdir: Path

    @property
    def overlay(self) -> Path:
        return self.workdir / "overlay.qcow2"

    @property
    def user_qmp(self) -> Path:
        return self.workdir / "qmp-user.sock"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"


def qemu_args(config: VmConfig, files: VmFiles) -> list[str]:
    """QEMU's whole command line after the binary, top to bottom.

    The harness's own QMP socket is added by `QemuProcess` (it listens before QEMU starts).
    """
    if config.accel is Accel.AUTO:
        raise VmError("qemu_args needs a decided accelerator; call choose_accel() first")
    kvm = config.accel is Accel.KVM
    args = [
        # Start paused: the console reader and the monitor attach before the first byte.
        "-S",
        "-name", f"lxd-agent-harness-{config.layout.name}",
        "-machine", "q35",
        "-accel", "kvm" if kvm else "tcg",
        # Under TCG the plain default model boots faster than `max` (fewer features to emulate).
        "-cpu", "host" if kvm else "qemu64",
        "-m", str(config.memory_mib),
        "-smp", str(config.cpus),
        "-nodefaults",
        "-display", "none",
        # A powered-off guest stays (paused) so the final ring can still be read; a reboot
        # counts as a power-off instead of booting again behind the harness's back.
        "-action", "shutdown=pause,reboot=shutdown",
    ]  # fmt: skip
    if isinstance(config.boot, DirectBoot):
        args += [
            "-kernel", str(config.boot.image.kernel),
            "-initrd", str(config.boot.image.initrd),
            "-append", config.boot.append,
        ]  # fmt: skip
    # The overlay takes every write; the base image under it is never opened for writing.
    args += ["-drive", f"file={files.overlay},format=qcow2,if=virtio,cache=unsafe,discard=unmap"]
    if config.seed is not None:
        args += ["-drive", f"file={config.seed},format=raw,if=virtio,readonly=on"]
    if config.network:
        args += ["-nic", "user,model=virtio-net-pci"]
    args += config.layout.qemu_args(config.ring_size)
    if config.user_qmp:
        args += ["-qmp", f"unix:{files.user_qmp},server=on,wait=off"]
    args += [
        "-chardev", f"pty,id={CONSOLE_ID}",
        "-serial", f"chardev:{CONSOLE_ID}",
    ]  # fmt: skip
    return args


def make_overlay(base: Path, base_format: str, overlay: Path) -> None:
    """A qcow2 overlay over `base`, so a boot never writes the base image."""
    command = [
        "qemu-img", "create", "-q", "-f", "qcow2",
        "-b", str(base.resolve()), "-F", base_format, str(overlay),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise VmError(
            "qemu-img not found on PATH; run `make setup` (Debian package qemu-utils)"
        ) from None
    except subprocess.CalledProcessError as e:
        raise VmError(
            f"qemu-img could not make an overlay over {base}: {e.stderr.strip()}; "
            "is it a readable disk image?"
        ) from None


def disk_format(path: Path) -> str:
    """`raw` or `qcow2` (as QEMU sees it) for a user's image; a clear error otherwise."""
    if not path.is_file():
        raise VmError(f"looked for the image {path} and found nothing; pass an existing --image")
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
    except FileNotFoundError:
        raise VmError("qemu-img not found on PATH; run `make setup`") from None
    except subprocess.CalledProcessError as e:
        raise VmError(f"qemu-img info {path} failed: {e.stderr.strip()}") from None
    fmt = str(json.loads(out).get("format", ""))
    if fmt not in ("raw", "qcow2"):
        raise VmError(
            f"the image {path} is in format {fmt!r}; give a qcow2 or raw cloud image "
            "(convert with `qemu-img convert -O qcow2`)"
        )
    return fmt


# ---------------------------------------------------------------------------------------------
# The serial console


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    output: str


class SerialConsole:
    """The guest's serial console on a pty, read by a thread into a log file and memory.

    A context manager: the reader thread stops and the port closes on exit.
    """

    def __init__(
        self, device: str, log_path: Path, on_milestone: Callable[[str], None] | None = None
    ) -> None:
        self.device = device
        self.log_path = log_path
        self._on_milestone = on_milestone
        self._port: serial.Serial | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._data = bytearray()
        self._base = 0  # offset of _data[0] in everything ever received
        self._pending_milestones = list(CONSOLE_MILESTONES)
        self.milestones: dict[str, float] = {}

    def __enter__(self) -> SerialConsole:
        try:
            self._port = serial.Serial(self.device, baudrate=115200, timeout=0.1)
        except serial.SerialException as e:
            raise VmError(f"could not open the guest console {self.device}: {e}") from None
        self._thread = threading.Thread(target=self._read_loop, name="console", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and close the pty (a person can then attach to it). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._port is not None:
            self._port.close()

    @property
    def received(self) -> int:
        """Bytes received so far: an offset for `wait_for(..., start=)`."""
        with self._lock:
            return self._base + len(self._data)

    def _read_loop(self) -> None:
        assert self._port is not None
        with self.log_path.open("ab") as log:
            while not self._stop.is_set():
                try:
                    chunk = self._port.read(max(1, self._port.in_waiting))
                except (serial.SerialException, OSError):
                    return  # QEMU went away and closed the pty
                if not chunk:
                    continue
                log.write(chunk)
                log.flush()
                with self._lock:
                    self._data += chunk
                    if len(self._data) > CONSOLE_MEMORY_BYTES:
                        cut = len(self._data) - CONSOLE_MEMORY_BYTES // 2
                        del self._data[:cut]
                        self._base += cut
                    self._check_milestones()

    def _check_milestones(self) -> None:
        # Milestones come in boot order; only the tail of the buffer needs looking at.
        while self._pending_milestones:
            name, pattern = self._pending_milestones[0]
            if not pattern.search(self._data, max(0, len(self._data) - 64 * 1024)):
                return
            self._pending_milestones.pop(0)
            self.milestones[name] = time.monotonic()
            if self._on_milestone is not None:
                self._on_milestone(name)

    def search(self, pattern: re.Pattern[bytes], start: int) -> re.Match[bytes] | None:
        with self._lock:
            return pattern.search(self._data, max(0, start - self._base))

    def text_between(self, start: int, end: int) -> str:
        with self._lock:
            raw = bytes(self._data[max(0, start - self._base) : max(0, end - self._base)])
        return ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))

    async def wait_for(
        self, pattern: re.Pattern[bytes], timeout: float, start: int = 0, what: str = ""
    ) -> tuple[int, int]:
        """Wait until `pattern` shows after offset `start`; its (start, end) offsets."""
        deadline = time.monotonic() + timeout
        while True:
            match = self.search(pattern, start)
            if match is not None:
                return self._base + match.start(), self._base + match.end()
            if time.monotonic() > deadline:
                raise VmError(
                    f"waited {timeout:g} s for {what or pattern.pattern!r} on the guest console "
                    "and did not see it; see the console tail below"
                )
            if self._thread is not None and not self._thread.is_alive():
                raise VmError(
                    f"the guest console closed while waiting for {what or pattern.pattern!r} "
                    "(QEMU exited?)"
                )
            await asyncio.sleep(0.05)

    def write(self, text: str) -> None:
        assert self._port is not None
        self._port.write(text.encode())

    def tail(self, lines: int = 30) -> str:
        with self._lock:
            raw = bytes(self._data[-64 * 1024 :])
        text = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# One running guest


def vm_lock_path() -> Path:
    """Held by every running harness VM, so that VMs on this machine run one at a time."""
    return cache_root() / "vm.lock"


class Vm:
    """One guest under QEMU, from paused start to cleanup. Use as an async context manager::

    async with Vm(config) as vm:
        await vm.wait_for_state(STARTED, timeout=BOOT_TIMEOUT)
        await vm.power_off()
        await vm.wait_for_state(STOPPED, timeout=POWEROFF_TIMEOUT)
    """

    def __init__(self, config: VmConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _message: None)
        self.t0 = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._qemu: QemuProcess | None = None
        self._monitor: RingbufMonitor | None = None
        self._console: SerialConsole | None = None
        self._logged_in = False
        self.files: VmFiles | None = None
        self.console_device: str | None = None
        self.powerdown_at: float | None = None
        self.guest_off_at: float | None = None

    # -- what callers use ------------------------------------------------------------------

    @property
    def monitor(self) -> RingbufMonitor:
        if self._monitor is None:
            raise VmError("the VM is not running; use `async with Vm(...)`")
        return self._monitor

    @property
    def console(self) -> SerialConsole:
        if self._console is None:
            raise VmError("the VM is not running; use `async with Vm(...)`")
        return self._console

    @property
    def qemu(self) -> QemuProcess:
        if self._qemu is None:
            raise VmError("the VM is not running; use `async with Vm(...)`")
        return self._qemu

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def note(self, text: str) -> None:
        """A milestone in the timeline (and on the progress output)."""
        if self._monitor is not None:
            self._monitor.note(text)
        self.progress(f"{self.seconds():7.2f}s  {text}")

    async def wait_for_state(
        self, status: str, port: str | None = None, timeout: float = BOOT_TIMEOUT
    ) -> TimelineEntry:
        """Wait until the host sees `status` on `port` (any ring when None)."""
        watch = asyncio.ensure_future(self._watch_qemu())
        wait = asyncio.ensure_future(self.monitor.wait_for(status, port=port, timeout=timeout))
        try:
            done, _ = await asyncio.wait({watch, wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            wait.cancel()
            await asyncio.gather(watch, wait, return_exceptions=True)
        if wait in done:
            entry = wait.result()
        else:
            try:
                watch.result()  # raises why the guest stopped
            except VmError:
                # The last line may have landed just before the power-off, with the monitor's
                # read still to come: read once more before calling it missing.
                with contextlib.suppress(HarnessError):
                    await self.monitor.read_rings("guest off")
                if not self._has_state(status, port):
                    raise
            entry = await self.monitor.wait_for(status, port=port, timeout=0)
        self.note(f"{status} seen on {entry.port or port}")
        return entry

    def _has_state(self, status: str, port: str | None) -> bool:
        if port is not None:
            return self.monitor.state(port) == status
        return status in self.monitor.states.values()

    async def power_off(self) -> None:
        """Press the ACPI power button (`system_powerdown`), as LXD does for a clean stop."""
        await self._execute("system_powerdown")
        self.powerdown_at = time.monotonic()
        self.note("system_powerdown sent")

    async def wait_guest_off(self, timeout: float = POWEROFF_TIMEOUT) -> float:
        """Wait until the guest has powered off (QEMU paused on shutdown); seconds since t0."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self._runstate()
            if status == "shutdown":
                self.guest_off_at = time.monotonic()
                after = ""
                if self.powerdown_at is not None:
                    after = f" ({self.guest_off_at - self.powerdown_at:.2f} s after power-off)"
                self.note(f"guest powered off{after}")
                return self.guest_off_at - self.t0
            self._raise_if_broken(status)
            if time.monotonic() > deadline:
                raise VmError(
                    f"the guest was still {status!r} {timeout:g} s after the power button; "
                    "something delays its shutdown (see the console tail)"
                )
            await asyncio.sleep(0.1)

    async def login(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for the autologin shell on the console and make it quiet and parseable."""
        if self._logged_in:
            return
        await self.console.wait_for(SHELL_PROMPT, timeout, what="the root shell prompt")
        self._logged_in = True
        # No echo, no prompt, no colours, no pager, no kernel messages in the output.
        await self.run(
            "stty -echo; PS1=''; PS2=''; export TERM=dumb SYSTEMD_COLORS=0 SYSTEMD_PAGER='' "
            "PAGER=cat; bind 'set enable-bracketed-paste off' 2>/dev/null; dmesg -n 1",
            timeout=30,
        )
        self.note("logged in on the console")

    async def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a shell command in the guest through the console; its status and output."""
        await self.login()
        token = secrets.token_hex(6)
        # The marker is assembled by the guest's shell, so the typed (echoed) line never
        # matches it: only the command's end does.
        marker = re.compile(rb"@@LXDH:(\d+):" + token.encode() + rb"@@")
        start = self.console.received
        self.console.write(f"{command}; printf '\\n%s:%s:%s@@\\n' '@@LXDH' \"$?\" {token}\n")
        begin, _end = await self.console.wait_for(
            marker, timeout, start=start, what=f"the end of `{command}`"
        )
        match = self.console.search(marker, begin)
        assert match is not None
        output = self.console.text_between(start, begin)
        lines = output.split("\n")
        if lines and f"{token}" in lines[0]:
            lines = lines[1:]  # the echoed command line, before `stty -echo` took effect
        return CommandResult(command, int(match.group(1)), "\n".join(lines).strip("\n"))

    def render_timeline(self) -> list[str]:
        return self.monitor.render_timeline() if self._monitor else []

    def report(self, console_lines: int = 30) -> str:
        """The console tail and the timeline: what a failure message needs."""
        parts = ["--- console (last lines) ---"]
        parts.append(self._console.tail(console_lines) if self._console else "(no console)")
        parts.append("--- timeline (seconds since QEMU start) ---")
        parts.extend(self.render_timeline() or ["(empty)"])
        return "\n".join(parts)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Vm:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        stack = self._stack
        await self._take_vm_lock()
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lxd-agent-vm-"))
        files = self.files = VmFiles(Path(tmp))
        boot = self.config.boot
        if isinstance(boot, DirectBoot):
            make_overlay(boot.image.disk, "raw", files.overlay)
        else:
            make_overlay(boot.disk, boot.disk_format, files.overlay)
        self.t0 = time.monotonic()
        self._qemu = await stack.enter_async_context(
            QemuProcess(qemu_args(self.config, files), name=f"vm-{self.config.layout.name}")
        )
        qmp = self._qemu.qmp
        self._monitor = await stack.enter_async_context(
            RingbufMonitor(qmp, self.config.layout.rings, t0=self.t0, read_size=self.ring_read_size)
        )
        self.note(
            f"QEMU started (pid {self._qemu.pid}, {self.config.accel.value}, "
            f"layout {self.config.layout.name}), guest paused"
        )
        self.console_device = await self._console_pty()
        loop = asyncio.get_running_loop()

        def milestone(name: str) -> None:  # called from the console thread
            loop.call_soon_threadsafe(self.note, f"console: {name}")

        self._console = stack.enter_context(
            SerialConsole(self.console_device, files.console_log, on_milestone=milestone)
        )
        await self._execute("cont")
        self.note("guest running")

    @property
    def ring_read_size(self) -> int:
        # LXD reads 16 bytes from its 16-byte ring; a larger ring is read whole.
        return self.config.ring_size

    async def _take_vm_lock(self) -> None:
        """Wait (bounded) until no other harness VM runs here: a 2-core host runs one at a time."""
        path = vm_lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = self._stack.enter_context(path.open("a"))  # closing it releases the lock
        deadline = time.monotonic() + VM_LOCK_TIMEOUT
        waiting = False
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise VmError(
                    f"waited {VM_LOCK_TIMEOUT:g} s for another harness VM to finish (lock "
                    f"{path} is held); stop it (see `pgrep -af lxd-agent-harness-`) and retry"
                )
            if not waiting:
                self.progress(f"waiting for another harness VM to finish (lock {path})")
                waiting = True
            await asyncio.sleep(0.5)

    async def _execute(self, command: str) -> object:
        """One QMP command, bounded: a wedged QEMU must not hang the harness."""
        try:
            return await asyncio.wait_for(self.qemu.qmp.execute(command), QMP_TIMEOUT)
        except asyncio.TimeoutError:
            raise VmError(
                f"QEMU did not answer the QMP command {command} within {QMP_TIMEOUT:g} s; "
                f"its output: {self.qemu.log_tail(5)}"
            ) from None
        except (QMPError, OSError, EOFError) as e:
            raise VmError(
                f"QMP command {command} failed ({type(e).__name__}: {e}); "
                f"QEMU's output: {self.qemu.log_tail(5)}"
            ) from None

    async def _console_pty(self) -> str:
        chardevs = await self._execute("query-chardev")
        if not isinstance(chardevs, list):
            raise VmError(f"query-chardev answered {chardevs!r}, not a list; is this QEMU's QMP?")
        for chardev in chardevs:
            if chardev.get("label") == CONSOLE_ID:
                filename = str(chardev.get("filename", ""))
                if filename.startswith("pty:"):
                    return filename[len("pty:") :]
        raise VmError(f"QEMU reported no pty for the console chardev: {chardevs}")

    async def _runstate(self) -> str:
        if self.qemu.returncode is not None:
            raise VmError(
                f"QEMU exited with status {self.qemu.returncode}: {self.qemu.log_tail(5)}"
            )
        reply = await self._execute("query-status")
        if not isinstance(reply, dict):
            raise VmError(f"query-status answered {reply!r}, not an object; is this QEMU's QMP?")
        return str(reply.get("status"))

    def _raise_if_broken(self, status: str) -> None:
        if status == "internal-error":
            forget_kvm_verdict()
            raise VmError(
                f"the guest stopped with a hypervisor error ({self.config.accel.value}): "
                f"{self.qemu.log_tail(3)}; run again with --accel tcg"
            )
        if status in ("guest-panicked", "io-error"):
            raise VmError(f"the guest stopped: QEMU run state {status!r}")

    async def check_running(self) -> None:
        """A `VmError` saying why if QEMU exited or the guest stopped (hypervisor error, panic)."""
        status = await self._runstate()
        self._raise_if_broken(status)
        if status == "shutdown":
            raise VmError("the guest powered off")

    async def _watch_qemu(self) -> None:
        """Return only by raising: QEMU exited, or the guest stopped for good."""
        while True:
            status = await self._runstate()
            if status in ("shutdown", "internal-error", "guest-panicked", "io-error"):
                self._raise_if_broken(status)
                raise VmError("the guest powered off before the awaited state was seen")
            await asyncio.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Choosing the accelerator


KVM_PROBE_BOOT_TIMEOUT = 60.0
# Broken KVM here kills stock Debian kernels 60-150 s into a boot (facts §6): a probe that only
# boots would pass and the real run would die later, so the probe keeps the guest busy this long.
KVM_PROBE_SOAK_SECONDS = 180.0


def _kvm_verdict_path() -> Path:
    return cache_root() / "kvm-verdict.json"


def _host_identity() -> dict[str, str]:
    """What the KVM verdict depends on: host kernel, QEMU build, CPU model."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        qemu = subprocess.run(
            [DEFAULT_QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
    return {"kernel": os.uname().release, "qemu": qemu, "cpu": cpu}


def forget_kvm_verdict() -> None:
    with contextlib.suppress(OSError):
        _kvm_verdict_path().unlink()


async def probe_kvm(image: GuestImage, progress: Progress) -> str | None:
    """Boot `image` under KVM and keep it busy; None if KVM held up, else what went wrong."""
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=Accel.KVM)
    vm = Vm(config)
    try:
        async with vm:
            await vm.console.wait_for(SHELL_PROMPT, KVM_PROBE_BOOT_TIMEOUT, what="a shell")
            progress(f"accel: KVM booted the probe guest; soaking {KVM_PROBE_SOAK_SECONDS:.0f} s")
            deadline = time.monotonic() + KVM_PROBE_SOAK_SECONDS
            while time.monotonic() < deadline:
                try:
                    await vm.run("sha256sum /usr/bin/* >/dev/null 2>&1; uptime", timeout=60)
                except VmError:
                    await vm.check_running()  # the hypervisor's error says more than a timeout
                    raise
                await vm.check_running()
            return None
    except HarnessError as e:
        # Keep what QEMU said (the reason), not the launcher's framing or its pty notice.
        said = str(e).splitlines()[0].split("its output: ", 1)[-1].split(" | ")
        reason = " | ".join(part for part in said if "redirected to" not in part)[:300]
        if vm._qemu is None and not isinstance(e, QemuError):
            # Failed before QEMU ran (the VM lock, the overlay): says nothing about KVM.
            raise KvmProbeInconclusive(reason) from e
        return reason


class KvmProbeInconclusive(HarnessError):
    """The KVM probe could not run its guest; no verdict on KVM, so none is cached."""


async def choose_accel(
    requested: Accel, image: GuestImage | None, progress: Progress = print
) -> AccelChoice:
    """The accelerator to use and why. `auto` picks KVM only if a probe boot held up here."""
    if requested is Accel.TCG:
        return AccelChoice(Accel.TCG, "TCG requested")
    if requested is Accel.KVM:
        return AccelChoice(Accel.KVM, "KVM requested (not probed)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice(Accel.TCG, "TCG: /dev/kvm is missing or not usable by this user")
    identity = _host_identity()
    path = _kvm_verdict_path()
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
        if cached.get("host") == identity:
            return _choice_from(cached.get("error"), f"cached probe verdict in {path}")
    if image is None:
        return AccelChoice(Accel.TCG, "TCG: no guest image to probe KVM with")
    progress("accel: /dev/kvm exists; probing whether KVM really runs a guest here")
    try:
        error = await probe_kvm(image, progress)
    except KvmProbeInconclusive as e:
        return AccelChoice(Accel.TCG, f"TCG: the KVM probe could not run ({e}); nothing cached")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"host": identity, "error": error}, indent=2) + "\n")
    os.replace(partial, path)
    return _choice_from(error, "probe boot just now")


def _choice_from(error: object, source: str) -> AccelChoice:
    if error is None:
        return AccelChoice(Accel.KVM, f"KVM: a probe guest booted and held up ({source})")
    return AccelChoice(Accel.TCG, f"TCG: KVM failed a probe boot here ({source}): {error}")
