"""A guest of a real daemon for synchronous tests: what `lxd_vm` is with `--lxd-host`.

`HostGuest` has `LxdVm`'s methods where a real host can answer them, from the daemon's side
only: `wait_for` polls the daemon's agent flag (`STARTED`: it went up; `STOPPED`: it went down
after it was up: a host reads the ring only while the VM runs, so a test sees `STOPPED` by
stopping the agent's unit, `run("systemctl stop lxd-agent")`), `run` types on the daemon's
console (the image needs a root autologin on ttyS0), `power_off` is the daemon's `stop` with the
bound as its timeout. There is no QMP of the harness's (`qmp` raises) and no state line
(`instance_state` is None). The VM and its image are deleted on every exit path; the daemon is
the session's (`testing.plugin`). Host side only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host.daemon import DaemonInfo
from lxd_agent_harness.host.instance import AgentFlag, HostVm
from lxd_agent_harness.host.rest import Daemon
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.check import status_port
from lxd_agent_harness.scenarios.host_check import (
    FLAG_POLL,
    LOGIN_TIMEOUT,
    host_layout,
    open_console,
)
from lxd_agent_harness.testing.guest import POWER_OFF_BOUND, GuestLoop, PowerOffResult
from lxd_agent_harness.vm.console import CommandResult, ConsoleShell, SerialConsole
from lxd_agent_harness.vm.instance import BOOT_TIMEOUT, COMMAND_TIMEOUT
from lxd_agent_harness.vm.lock import take_vm_lock
from lxd_agent_harness.vm.warm import How, WarmStart


class HostGuest(GuestLoop):
    """One VM of a real daemon, driven synchronously. Made by `HostGuest.start`; close it once."""

    def __init__(self, vm: HostVm, progress: Progress | None = None) -> None:
        super().__init__()
        self.host = vm
        """The daemon's VM (`host.instance.HostVm`): its name, log lines and `qemu.conf`."""
        self.layout = host_layout(vm.info.kind, vm.info.version_tuple)
        self.port = status_port(self.layout)
        """The port the daemon reads the agent's status from (its layout's)."""
        self._progress = progress
        self._entries: list[TimelineEntry] = []
        self._state: str | None = None
        self._console: SerialConsole | None = None
        self._shell: ConsoleShell | None = None
        self.start_info = WarmStart(How.COLD, "not started")
        """Always a cold boot: the daemon starts the VM."""

    @classmethod
    def start(
        cls,
        client: Daemon,
        info: DaemonInfo,
        disk: Path,
        disk_format: str,
        config: dict[str, str],
        progress: Progress | None = None,
    ) -> HostGuest:
        """A VM of `disk` on the daemon, started (wait for what you need: `wait_for`)."""
        say = progress or (lambda _line: None)
        guest = cls(HostVm(client, info, disk, disk_format, config, say), progress)
        guest._thread.start()
        began = time.monotonic()
        try:
            guest.call(guest._start(), BOOT_TIMEOUT)
        except BaseException:
            guest.close()
            raise
        guest.start_info = WarmStart(
            How.COLD,
            f"started by {info.kind} {info.version} ({guest.layout.name})",
            time.monotonic() - began,
        )
        return guest

    async def _start(self) -> None:
        # The daemon's QEMU shares this machine's cores with the harness's own guests.
        cpus = int(self.host.config.get("limits.cpu", "1"))
        await take_vm_lock(self._stack, self._progress or (lambda _line: None), cpus)
        await self._stack.enter_async_context(self.host)
        await self.host.start()
        self._note("the daemon started the VM")
        self._console = open_console(self.host, self._stack)

    # -- what a test calls -----------------------------------------------------------------------

    @property
    def warm(self) -> bool:
        return False

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a shell command as root on the daemon's console; `.status` and `.output`."""
        return self.call(self._run(command, timeout), LOGIN_TIMEOUT + timeout)

    async def _run(self, command: str, timeout: float) -> CommandResult:
        if self._console is None:
            raise VmError(f"{self.host.info.kind}: the VM's console cannot be had")
        if self._shell is None:
            self._shell = ConsoleShell(self._console, self._note)
        await self._shell.login(LOGIN_TIMEOUT)
        return await self._shell.run(command, timeout=timeout)

    def wait_for(
        self, status: str, timeout: float = BOOT_TIMEOUT, port: str | None = None
    ) -> TimelineEntry:
        """Wait until the daemon's flag says `status` (`STARTED`: up; `STOPPED`: down after it
        was up); the timeline entry that said so. A `VmError` with the timeline when it does
        not come in `timeout` s. `port` must be the daemon's status port, if given."""
        if port not in (None, self.port):
            raise VmError(f"the daemon reads {self.port} only, not {port}")
        if status not in (STARTED, STOPPED):
            raise VmError(f"wait for {STARTED} or {STOPPED}, not {status!r}")
        return self.call(self._wait_for(status, timeout), timeout)

    async def _wait_for(self, status: str, timeout: float) -> TimelineEntry:
        deadline = time.monotonic() + timeout
        seen_before = len(self._entries)
        while True:
            await self._observe()
            for entry in self._entries[seen_before:]:
                if entry.kind is EntryKind.STATE and entry.text.endswith(f"-> {status}"):
                    return entry
            if status == STARTED and self._state == STARTED:
                return self._last_state()
            if time.monotonic() >= deadline:
                raise VmError(
                    f"{self.host.info.kind} did not see {status} on {self.port} within "
                    f"{timeout:g} s (its agent flag: {self._state or 'never up'})",
                    timeline=self.timeline,
                )
            await asyncio.sleep(FLAG_POLL)

    def state(self, port: str | None = None) -> str | None:
        """What the daemon's flag says now: `STARTED`, `STOPPED` (down after it was up) or
        None (never up)."""
        self.call(self._observe(), 60.0)
        return self._state

    def instance_state(self, port: str | None = None) -> dict[str, object] | None:
        """None: the harness reads no state line from a real daemon."""
        return None

    def power_off(self, bound: float = POWER_OFF_BOUND) -> PowerOffResult:
        """The daemon's `stop` with `bound` as its timeout (the power button). `stopped` is
        False: no host reads the ring of a VM that is powering off."""

        async def press() -> PowerOffResult:
            powered_down = self.host.seconds()
            self._note(f"stop asked, within {bound:g} s")
            took = await self.host.stop(bound)
            self._note(f"stopped in {took:.1f} s" if took is not None else "not off: forced")
            return PowerOffResult(
                stopped=False,
                guest_off=took is not None,
                off_at=powered_down + took if took is not None else None,
                powered_down_at=powered_down,
                timeline=self.timeline,
            )

        return self.call(press(), bound + 60.0)

    def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        raise VmError("a real daemon's QEMU has no QMP socket of the harness's (--lxd-host)")

    @property
    def timeline(self) -> list[str]:
        """What the harness saw so far, in seconds since the start request."""
        return [entry.render() for entry in self._entries]

    def events(self) -> list[str]:
        """No QMP events: the daemon has the QMP socket."""
        return []

    def started(self) -> TimelineEntry | None:
        """The first `STARTED` the daemon's flag showed."""
        return next(
            (e for e in self._entries if e.kind is EntryKind.STATE and e.text.endswith(STARTED)),
            None,
        )

    def console_log(self) -> Path | None:
        """The console as read so far (a file of the VM's own on the host)."""
        return self._console.log_path if self._console is not None else None

    def daemon_log(self) -> list[str]:
        return self.host.log_lines()

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the VM and its image (forced off first) and stop the loop. Safe to call twice."""
        self._close_loop()

    def __enter__(self) -> HostGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ----------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        self._entries.append(TimelineEntry(self.host.seconds(), EntryKind.NOTE, text))
        if self._progress is not None:
            self._progress(f"{self.host.info.kind}: {self.host.seconds():6.1f} s  {text}")

    async def _observe(self) -> None:
        """One look at the daemon's flag; a state change goes into the timeline."""
        flag = await self.host.agent_flag()
        before = self._state
        if flag is AgentFlag.UP and before != STARTED:
            self._state = STARTED
        elif flag is AgentFlag.DOWN and before == STARTED:
            self._state = STOPPED
        else:
            return
        self._entries.append(
            TimelineEntry(
                self.host.seconds(),
                EntryKind.STATE,
                f"{before or 'unknown'} -> {self._state}",
                self.port,
                f"the daemon's agent flag went {'up' if flag is AgentFlag.UP else 'down'}",
            )
        )

    def _last_state(self) -> TimelineEntry:
        return [e for e in self._entries if e.kind is EntryKind.STATE][-1]
