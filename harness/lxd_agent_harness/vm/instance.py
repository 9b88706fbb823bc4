"""Boot a guest under QEMU with one of LXD's device layouts and drive it from the host.

The guest's machine (`VmConfig`) and QEMU's command line (`qemu_args`) are in
`lxd_agent_harness.vm.config`. `Vm` is an async
context manager around one running guest: it starts QEMU paused (so no console byte is lost),
opens the serial console (`lxd_agent_harness.vm.console`), starts the ring-buffer monitor, lets the
guest run, and offers what the harness and the tests need: wait for a ring state, power the guest
off, wait for it to be off, run a command through the console, and the timeline. Everything it
makes (QEMU, sockets, the disk overlay, the console reader) is released on every exit path.
Which accelerator to run with is decided before, by `lxd_agent_harness.vm.kvm_probe`.

Host side only. It must never write the base image (boots use a qcow2 overlay in a temporary
directory), and it runs one guest at a time on a machine: every `Vm` holds a lock in the cache
directory while it runs, and a second one waits for it (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Iterator, TypeVar

from qemu.qmp import QMPClient, QMPError

from lxd_agent_harness.base.aio import bounded
from lxd_agent_harness.base.errors import BootStuck, GuestStopped, HarnessError, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.base.sockets import socket_base
from lxd_agent_harness.lxd.monitor import RingbufMonitor, TimelineEntry
from lxd_agent_harness.qemu.disk import make_overlay
from lxd_agent_harness.qemu.migration import SavedState, as_refusal, save_state, wait_incoming
from lxd_agent_harness.qemu.process import QemuProcess, bounded_qmp_client
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import (
    CONSOLE_ID,
    DirectBoot,
    FirmwareBoot,
    VmConfig,
    VmFiles,
    config_tcg_accel,
    host_cores,
    qemu_args,
    qemu_conf_text,
)
from lxd_agent_harness.vm.console import CommandResult, ConsoleShell, SerialConsole
from lxd_agent_harness.vm.cpuwait import CpuWait, vcpu_threads
from lxd_agent_harness.vm.firmware import Firmware, fresh_vars, sercon_file, watch_firmware_boot
from lxd_agent_harness.vm.lock import Cores, take_vm_lock

E = TypeVar("E", bound=VmError)

# Waits, in seconds. Under TCG on 2 cores a boot reaches STARTED in 10-13 s (facts §6).
BOOT_TIMEOUT = 120.0
POWEROFF_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0
QMP_TIMEOUT = 10.0

# How much of the console and of QEMU's output a `VmError` carries.
ERROR_CONSOLE_LINES = 30
ERROR_QEMU_LINES = 5


# ---------------------------------------------------------------------------------------------
# One running guest


class Vm:
    """One guest under QEMU, from paused start to cleanup. Use as an async context manager::

    async with Vm(config) as vm:
        await vm.wait_for_state(STARTED, timeout=BOOT_TIMEOUT)
        await vm.power_off()
        await vm.wait_for_state(STOPPED, timeout=POWEROFF_TIMEOUT)
    """

    def __init__(
        self, config: VmConfig, progress: Progress | None = None, *, shell_ready: bool = False
    ) -> None:
        """`shell_ready`: the console already has a logged-in, quiet shell (a guest restored
        from a state saved after `login`), so commands run at once and nothing waits for a
        prompt that a restored guest never prints again."""
        self.config = config
        self.shell_ready = shell_ready
        self.progress = progress or (lambda _message: None)
        self.t0 = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._qemu: QemuProcess | None = None
        self._monitor: RingbufMonitor | None = None
        self._console: SerialConsole | None = None
        self._shell: ConsoleShell | None = None
        self.files: VmFiles | None = None
        self.console_device: str | None = None
        self.powerdown_at: float | None = None
        self.guest_off_at: float | None = None
        self.running_at: float | None = None
        """When the guest started running (after a restore: when its state was loaded)."""
        self.cores: Cores | None = None
        """The machine's slots this VM holds (`vm.lock`), until its guest only waits."""
        self._cpu_wait: CpuWait | None = None

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
    def shell(self) -> ConsoleShell:
        if self._shell is None:
            raise VmError("the VM is not running; use `async with Vm(...)`")
        return self._shell

    @property
    def qemu(self) -> QemuProcess:
        if self._qemu is None:
            raise VmError("the VM is not running; use `async with Vm(...)`")
        return self._qemu

    @property
    def qemu_started(self) -> bool:
        """Whether QEMU came up (with QMP) in this VM: a failure before says nothing of QEMU."""
        return self._qemu is not None

    def seconds(self) -> float:
        """Seconds since QEMU started (this VM's t0), now."""
        return time.monotonic() - self.t0

    def since_start(self, monotonic: float | None) -> float | None:
        """`monotonic` (a `time.monotonic()` moment) in seconds since QEMU started; None stays."""
        return None if monotonic is None else monotonic - self.t0

    def host_cpu_wait(self, since: float = 0.0) -> float:
        """Seconds the guest's vCPUs waited for a host CPU from `since` (VM seconds) until now
        (`vm/cpuwait.py`): what a busy host took from a bound that began then. Each call is a
        sample; a caller that will ask about a window polls this through it."""
        if self._cpu_wait is None:
            return 0.0
        return self._cpu_wait.since(since)

    def error(self, message: str) -> VmError:
        """A `VmError` for `message` that carries what the VM has seen so far."""
        return self.fill(VmError(message))

    def release_cores(self) -> None:
        """For a guest whose boot is done and that only waits from now on (a bound, a grace
        period, the power-off): its cores go to the next harness VM (`Cores.release`)."""
        if self.cores is not None:
            self.cores.release()

    def note(self, text: str) -> None:
        """A milestone in the timeline (and on the progress output)."""
        if self._monitor is not None:
            self._monitor.note(text)
        self.progress(f"{self.seconds():7.2f}s  {text}")

    async def wait_for_state(
        self, status: str, port: str | None = None, timeout: float = BOOT_TIMEOUT
    ) -> TimelineEntry:
        """Wait until the host sees `status` on `port` (any ring when None)."""
        with self._failures_filled():
            return await self._wait_for_state(status, port, timeout)

    async def _wait_for_state(self, status: str, port: str | None, timeout: float) -> TimelineEntry:
        watch = asyncio.ensure_future(self._watch_qemu())
        wait = asyncio.ensure_future(self.monitor.wait_for(status, port=port, timeout=timeout))
        tasks = {watch, wait}
        if isinstance(self.config.boot, FirmwareBoot):
            tasks.add(asyncio.ensure_future(self._watch_boot(self.config.boot)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done - {watch, wait}:
            task.result()  # the boot hit a dead end: raises why
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
        with self._failures_filled():
            await self._execute("system_powerdown")
        self.powerdown_at = time.monotonic()
        self.note("system_powerdown sent")

    async def wait_guest_off(self, timeout: float = POWEROFF_TIMEOUT) -> float:
        """Wait until the guest has powered off (QEMU paused on shutdown); seconds since t0."""
        with self._failures_filled():
            return await self._wait_guest_off(timeout)

    async def _wait_guest_off(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            status = await self._runstate()
            if status == "shutdown":
                self.guest_off_at = time.monotonic()
                after = ""
                if self.powerdown_at is not None:
                    after = f" ({self.guest_off_at - self.powerdown_at:.2f} s after power-off)"
                self.note(f"guest powered off{after}")
                return self.guest_off_at - self.t0  # since_start, never None here
            self._raise_if_stopped(status)
            if time.monotonic() > deadline:
                raise VmError(
                    f"the guest was still {status!r} {timeout:g} s after the power button; "
                    "something delays its shutdown (see the console tail)"
                )
            await asyncio.sleep(0.1)

    async def login(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for the autologin shell on the console and make it quiet and parseable."""
        with self._failures_filled():
            await self.shell.login(timeout)

    async def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a shell command in the guest through the console; its status and output."""
        await self.login()
        with self._failures_filled():
            return await self.shell.run(command, timeout)

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """One QMP command on the harness's connection, bounded; a `VmError` if it fails."""
        return await self._execute(command, arguments)

    async def second_qmp(self, name: str) -> QMPClient:
        """A new QMP connection to QEMU, as a second or restarted host makes; closed with the VM.

        Needs `VmConfig.user_qmp`: the harness's own socket takes one client only.
        """
        if not self.config.user_qmp or self.files is None:
            raise VmError("a second QMP connection needs VmConfig(user_qmp=True)")
        client = bounded_qmp_client(name)

        async def disconnect() -> None:
            with contextlib.suppress(Exception):  # QEMU may be gone already at teardown
                await client.disconnect()

        self._stack.push_async_callback(disconnect)
        try:
            await bounded(client.connect(str(self.files.user_qmp)), QMP_TIMEOUT)
        except (asyncio.TimeoutError, QMPError, OSError) as e:
            raise self.error(
                f"a new QMP connection to {self.files.user_qmp} failed ({type(e).__name__}: "
                f"{e}); see QEMU's output"
            ) from None
        return client

    async def restart_monitor(self) -> RingbufMonitor:
        """Read the rings over a new QMP connection, the old monitor stopped.

        What a restarted LXD host does: the old reader is gone (what it read is consumed), a
        new one connects to QEMU's QMP socket and must learn the state from what the agent
        writes next. Needs `VmConfig.user_qmp`. The new monitor's timeline starts empty; the
        old one is returned for the record.
        """
        client = await self.second_qmp("restarted-host")
        old = self.monitor
        await old.stop()
        self.note("host monitor stopped (restart)")
        self._monitor = await self._stack.enter_async_context(
            RingbufMonitor(
                client, self.config.layout.rings, t0=self.t0, read_size=self.ring_read_size
            )
        )
        self.note("host monitor restarted on a new QMP connection")
        return old

    async def save_state(self, state_file: Path) -> SavedState:
        """Stop the guest and save its state to `state_file` (QEMU stays, paused)."""
        with self._failures_filled():
            saved = await save_state(self.qemu.qmp, state_file)
        self.note(f"state saved to {state_file.name}: {saved.size} bytes in {saved.seconds:.2f} s")
        return saved

    def render_timeline(self) -> list[str]:
        return self.monitor.render_timeline() if self._monitor else []

    def report(self, console_lines: int = ERROR_CONSOLE_LINES) -> str:
        """The console tail and the timeline, for a person reading a failed test."""
        parts = ["--- console (last lines) ---"]
        parts.extend(self._console.tail_lines(console_lines) if self._console else ["(no console)"])
        parts.append("--- timeline (seconds since QEMU start) ---")
        parts.extend(self.render_timeline() or ["(empty)"])
        return "\n".join(parts)

    def fill(self, error: E) -> E:
        """`error` with what the VM has seen filled into the fields its raiser left empty."""
        if not error.console_tail and self._console is not None:
            error.console_tail = self._console.tail_lines(ERROR_CONSOLE_LINES)
        if not error.qemu_output and self._qemu is not None:
            error.qemu_output = self._qemu.output_tail(ERROR_QEMU_LINES)
        if not error.timeline:
            error.timeline = self.render_timeline()
        return error

    @contextlib.contextmanager
    def _failures_filled(self) -> Iterator[None]:
        """Errors leaving the VM's waits carry the console tail, QEMU's output and the timeline.

        The monitor's own errors become `VmError`s: the VM has the console to add to them.
        """
        try:
            yield
        except VmError as e:
            self.fill(e)
            raise
        except HarnessError as e:
            raise self.error(str(e)) from e

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
        self.cores = await take_vm_lock(stack, self.progress, host_cores(self.config))
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="lxd-agent-vm-", dir=socket_base())
        )
        files = self.files = VmFiles(Path(tmp))
        boot = self.config.boot
        if self.config.overlay is not None:
            pass  # the caller's, made and kept by it
        elif isinstance(boot, DirectBoot):
            make_overlay(boot.image.disk, "raw", files.overlay)
        else:
            make_overlay(boot.disk, boot.disk_format, files.overlay)
        if isinstance(boot, FirmwareBoot) and boot.firmware is Firmware.BIOS:
            sercon_file(files.sercon)
        elif self.config.uses_uefi and self.config.uefi_vars is None:
            fresh_vars(self.config.secure_boot, files.uefi_vars, arch=self.config.guest_arch)
        files.qemu_conf.write_text(qemu_conf_text(self.config))
        self.t0 = time.monotonic()
        incoming = self.config.incoming
        try:
            await self._start_qemu(stack, files)
        except HarnessError as e:
            if incoming is None:
                raise
            refusal = await as_refusal(e, self._qemu, incoming)
            if refusal is None:
                raise
            raise self.fill(refusal) from e

    async def _start_qemu(self, stack: contextlib.AsyncExitStack, files: VmFiles) -> None:
        self._qemu = await stack.enter_async_context(
            QemuProcess(
                qemu_args(self.config, files),
                binary=self.config.machine.qemu_binary,
                name=f"vm-{self.config.layout.name}",
            )
        )
        qmp = self._qemu.qmp
        self._monitor = await stack.enter_async_context(
            RingbufMonitor(qmp, self.config.layout.rings, t0=self.t0, read_size=self.ring_read_size)
        )
        self.note(
            f"QEMU started (pid {self._qemu.pid}, {self.config.accel.value}, "
            f"layout {self.config.layout.name}), guest paused"
        )
        if self.config.accel is Accel.TCG:
            single_threaded = config_tcg_accel(self.config)[1]
            if single_threaded is not None:
                self.note(single_threaded)
        self.console_device = await self._console_pty()
        loop = asyncio.get_running_loop()

        def milestone(name: str) -> None:  # called from the console thread
            loop.call_soon_threadsafe(self.note, f"console: {name}")

        self._console = stack.enter_context(
            SerialConsole(self.console_device, files.console_log, on_milestone=milestone)
        )
        self._shell = ConsoleShell(self._console, self.note, logged_in=self.shell_ready)
        if self.config.incoming is not None:
            await wait_incoming(self._qemu, self.config.incoming)
            self.note(f"state loaded from {self.config.incoming.name}")
        # After a load too: a state saved from a stopped guest comes back paused, whatever
        # `cont` was given during the load.
        await self._execute("cont")
        self.running_at = time.monotonic()
        self.note("guest running")
        cpus = await self._execute("query-cpus-fast")
        self._cpu_wait = CpuWait(self._qemu.pid, vcpu_threads(cpus), self.seconds)
        self._cpu_wait.now()

    @property
    def ring_read_size(self) -> int:
        # LXD reads 16 bytes from its 16-byte ring; a larger ring is read whole.
        return self.config.ring_size or self.config.layout.ring_size

    async def _execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """One QMP command, bounded: a wedged QEMU must not hang the harness."""
        try:
            return await bounded(self.qemu.qmp.execute(command, arguments), QMP_TIMEOUT)
        except asyncio.TimeoutError:
            raise self.error(
                f"QEMU did not answer the QMP command {command} within {QMP_TIMEOUT:g} s; "
                "is it wedged? See its output"
            ) from None
        except (QMPError, OSError, EOFError) as e:
            raise self.error(
                f"QMP command {command} failed ({type(e).__name__}: {e}); see QEMU's output"
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
            raise self.error(f"QEMU exited with status {self.qemu.returncode}; see its output")
        reply = await self._execute("query-status")
        if not isinstance(reply, dict):
            raise VmError(f"query-status answered {reply!r}, not an object; is this QEMU's QMP?")
        return str(reply.get("status"))

    def _raise_if_stopped(self, status: str, *, powered_off: str = "") -> None:
        """A `GuestStopped` if QEMU's run state `status` means the guest will not go on.

        `powered_off` is the message for a plain power-off; without one, a power-off is no error.
        The error only says what happened: `hypervisor_failed` tells the caller (e.g. the
        accelerator's verdict cache) that the accelerator broke, not the guest. A kernel panic
        on the console comes first, as `GuestPanicked`: QEMU still says "running" then.
        """
        panic = self._console.panicked() if self._console is not None else None
        if panic is not None:
            raise self.fill(panic)
        if status == "internal-error":
            message = (
                f"the guest stopped with a hypervisor error under {self.config.accel.value} "
                "(see QEMU's output); run again with --accel tcg"
            )
        elif status in ("guest-panicked", "io-error"):
            message = f"the guest stopped: QEMU run state {status!r}"
        elif status == "shutdown" and powered_off:
            message = powered_off
        else:
            return
        raise self.fill(GuestStopped(message, run_state=status))

    async def check_running(self) -> None:
        """A `VmError` saying why if QEMU exited or the guest stopped (hypervisor error, panic)."""
        with self._failures_filled():
            status = await self._runstate()
            self._raise_if_stopped(status, powered_off="the guest powered off")

    async def _watch_boot(self, boot: FirmwareBoot) -> None:
        """Return only by raising `BootStuck` (filled): the boot cannot reach the kernel."""
        name = f"{boot.firmware.value}{' with secure boot' if boot.secure_boot else ''}"
        try:
            await watch_firmware_boot(self.console, self.seconds, name)
        except BootStuck as e:
            raise self.fill(e) from None

    async def _watch_qemu(self) -> None:
        """Return only by raising: QEMU exited, or the guest stopped for good."""
        while True:
            status = await self._runstate()
            self._raise_if_stopped(
                status, powered_off="the guest powered off before the awaited state was seen"
            )
            await asyncio.sleep(0.5)
