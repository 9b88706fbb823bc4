"""A running guest for synchronous tests: what the pytest plugin's `lxd_vm` fixture hands out.

`LxdVm` runs the harness's asyncio `Vm` on an event loop of its own, in a thread, so the ring
monitor keeps reading (and the timeline keeps true times) while the test's own code runs
between calls. Each method is one bounded call into that loop: `run` a command on the guest's
console, `wait_for` a state as the layout's host reads it, `power_off` and see what the host saw.

Host side only. It starts and stops nothing itself: `LxdVm.start` enters `vm.warm.started_vm`
on its loop, and `close` leaves it, on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Coroutine, TypeVar

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.observed import power_off_within
from lxd_agent_harness.vm.config import VmConfig
from lxd_agent_harness.vm.console import CommandResult
from lxd_agent_harness.vm.instance import BOOT_TIMEOUT, COMMAND_TIMEOUT, Vm
from lxd_agent_harness.vm.warm import How, WarmStart, started_vm, status_port

T = TypeVar("T")

POWER_OFF_BOUND = 20.0
"""Seconds the power button may take to power the guest off (1-3 s usual under TCG)."""

# A call into the loop gets this much longer than its own bound before the test gives up on it.
_CALL_SLACK = 30.0


@dataclass(frozen=True)
class PowerOffResult:
    """What the host saw after the power button. Times in seconds since QEMU started."""

    stopped: bool
    """`STOPPED` on the layout's status port after the button."""
    guest_off: bool
    """The guest powered off within the bound (else it was held, see `job_running`)."""
    stopped_at: float | None = None
    off_at: float | None = None
    powered_down_at: float | None = None
    job_running: str = ""
    """What systemd said it was waiting for while the power-off was held."""
    timeline: list[str] = field(default_factory=list)


class GuestLoop:
    """An event loop of a guest's own, in a thread, and what was entered on it (`_stack`):
    `call` runs one bounded coroutine there; `close` leaves the stack and stops the loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lxd-vm-loop", daemon=True
        )
        self._stack = contextlib.AsyncExitStack()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coroutine` on the guest's loop (the harness's async functions on `self.vm`,
        e.g. `vm.units.unit_properties(lxd_guest.vm, ...)`); its result, bounded by `timeout`
        plus slack."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout + _CALL_SLACK)
        except FutureTimeout:
            future.cancel()
            raise VmError(
                f"the guest's loop did not answer within {timeout + _CALL_SLACK:g} s; "
                "is QEMU wedged? See the console tail"
            ) from None
        except BaseException:
            future.cancel()
            raise

    def _close_loop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.call(self._stack.aclose(), 120.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()


class LxdVm(GuestLoop):
    """One running guest, driven synchronously. Made by `LxdVm.start`; close it once."""

    def __init__(self, config: VmConfig, progress: Progress | None = None) -> None:
        super().__init__()
        self.config = config
        self.layout = config.layout
        self.port = status_port(config)
        """The port the layout's host reads the agent's status from."""
        self._progress = progress
        self._vm: Vm | None = None
        self.start_info = WarmStart(How.COLD, "not started")
        """How the guest came up: restored (warm) or booted (cold), and why."""

    @classmethod
    def start(
        cls,
        config: VmConfig,
        *,
        warm: bool = False,
        timeout: float = BOOT_TIMEOUT,
        progress: Progress | None = None,
    ) -> LxdVm:
        """A running guest for `config` (restored from a saved one when `warm`)."""
        guest = cls(config, progress)
        guest._thread.start()
        try:
            guest._vm, guest.start_info = guest.call(
                guest._stack.enter_async_context(
                    started_vm(config, warm=warm, timeout=timeout, progress=progress)
                ),
                timeout * 3,  # a warm start's first time boots, saves and restores
            )
        except BaseException:
            guest.close()
            raise
        return guest

    # -- what a test calls -----------------------------------------------------------------------

    @property
    def vm(self) -> Vm:
        """The asyncio `Vm` underneath (for the harness's own functions); call it on no loop."""
        if self._vm is None:
            raise VmError("the guest is not running")
        return self._vm

    @property
    def warm(self) -> bool:
        return self.start_info.how is How.WARM

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run a shell command as root on the guest's console; `.status` and `.output`."""
        return self.call(self.vm.run(command, timeout=timeout), timeout)

    def wait_for(
        self, status: str, timeout: float = BOOT_TIMEOUT, port: str | None = None
    ) -> TimelineEntry:
        """Wait until the host sees `status` (`STARTED` or `STOPPED`) on `port` (the layout's
        status port by default), read by its rule; the timeline entry that said so. A `VmError`
        with the timeline and the console tail when it does not come in `timeout` s."""
        return self.call(self.vm.wait_for_state(status, port or self.port, timeout), timeout)

    def state(self, port: str | None = None) -> str | None:
        """What the host believes now: `STARTED`, `STOPPED` or None (nothing read yet)."""
        return self.vm.monitor.state(port or self.port)

    def instance_state(self, port: str | None = None) -> dict[str, object] | None:
        """Incus 7.3: the guest state its host holds now (the JSON line after `STARTED`, with
        `pid` 1), or None: none read yet, or the last read cleared it. Always None under
        LXD's rule."""
        return self.vm.monitor.instance_states.get(port or self.port)

    def power_off(self, bound: float = POWER_OFF_BOUND) -> PowerOffResult:
        """Press the power button; what the host saw within `bound` s. Never raises for a
        held power-off or a missing `STOPPED`: those are answers."""

        async def press() -> PowerOffResult:
            vm = self.vm
            outcome = await power_off_within(vm, bound)
            # STOPPED is written at once; a held event shows up to 1 s later (facts §1).
            with contextlib.suppress(VmError):
                await vm.wait_for_state(STOPPED, self.port, timeout=1.5)
            stopped = self._first_after(STOPPED, vm.since_start(vm.powerdown_at) or 0.0)
            return PowerOffResult(
                stopped=stopped is not None,
                guest_off=not outcome.held,
                stopped_at=stopped.seconds if stopped else None,
                off_at=vm.since_start(vm.guest_off_at),
                powered_down_at=vm.since_start(vm.powerdown_at),
                job_running=outcome.job_running,
                timeline=vm.render_timeline(),
            )

        return self.call(press(), bound + 5.0)

    def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """One QMP command on the harness's connection (e.g. `query-status`)."""
        return self.call(self.vm.execute(command, arguments), 10.0)

    @property
    def timeline(self) -> list[str]:
        """The host's timeline so far: QMP events, ring reads, state changes, milestones."""
        return self.vm.render_timeline()

    def events(self) -> list[str]:
        """The QMP events in the timeline, rendered."""
        return [e.render() for e in self.vm.monitor.timeline.entries if e.kind is EntryKind.EVENT]

    def started(self) -> TimelineEntry | None:
        """The first `STARTED` on the status port, if the host has seen one."""
        return self._first_after(STARTED, 0.0)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the guest (QEMU, its files, the console) and the loop. Safe to call twice."""
        self._close_loop()
        self._vm = None

    def __enter__(self) -> LxdVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside ----------------------------------------------------------------------------------

    def _first_after(self, status: str, after: float) -> TimelineEntry | None:
        for entry in self.vm.monitor.timeline.entries:
            if (
                entry.kind is EntryKind.STATE
                and entry.port == self.port
                and entry.text.endswith(f"-> {status}")
                and entry.seconds >= after
            ):
                return entry
        return None
