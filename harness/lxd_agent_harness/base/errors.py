"""The host harness's errors: one small hierarchy, each message one actionable line.

Every failure a user of the harness can hit is a `HarnessError`, so the command line can catch
that one class, print the message and exit non-zero; anything else is a bug and keeps its
traceback. `str(error)` is only the one line: what a reader of the failure also needs (QEMU's
output, the console tail, the ring-buffer timeline) travels in fields, which the command line
prints and the tests check. Nothing may parse a message to get at them.
Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

from typing import Sequence


class HarnessError(Exception):
    """Base of every error the harness reports to a user (what was tried, found, what to do)."""


class LayoutError(HarnessError):
    """An unknown layout name or an invalid ring size, caught before QEMU runs."""


class QemuConfError(LayoutError):
    """A `raw.qemu.conf` the harness will not apply (`lxd.qemu_conf`), found before QEMU runs."""

    def __init__(self, source: str, line_number: int, line: str, problem: str) -> None:
        where = f"{source}:{line_number}" if line_number else source
        super().__init__(f"{where}: {problem}" + (f": {line!r}" if line else ""))
        self.source = source
        """The file (or "raw.qemu.conf") the text came from."""
        self.line_number = line_number
        """The line the problem is on, from 1; 0 when it is about the whole text."""
        self.line = line
        """That line as written."""
        self.problem = problem
        """What is wrong with it, and what LXD's rules expect."""


class QemuError(HarnessError):
    """QEMU could not be found or started, died early, or its QMP socket did not answer."""

    def __init__(
        self, message: str, *, output: Sequence[str] = (), exit_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.output = list(output)
        """QEMU's last lines of output (stdout and stderr), oldest first; empty if none."""
        self.exit_status = exit_status
        """QEMU's exit status when it had exited; None while it ran (or never started)."""


class MonitorError(HarnessError):
    """The ring-buffer monitor could not read a ring (its QMP connection failed or was lost)."""

    def __init__(self, message: str, *, timeline: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.timeline = list(timeline)
        """The monitor's timeline when it gave up, rendered (`RingbufMonitor.render_timeline`)."""


class MonitorTimeout(MonitorError):
    """The monitor did not see the awaited state in time."""


class VmError(HarnessError):
    """The guest did not do what the harness waited for, or QEMU stopped under it.

    Raised by a running `Vm`, the fields hold what it had seen by then; empty when there was
    nothing yet (the VM never started) or the raiser cannot see it (the console alone).
    """

    def __init__(
        self,
        message: str,
        *,
        console_tail: Sequence[str] = (),
        qemu_output: Sequence[str] = (),
        timeline: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.console_tail = list(console_tail)
        """The last lines of the guest's serial console, escape sequences removed."""
        self.qemu_output = list(qemu_output)
        """QEMU's last lines of output, as `QemuError.output`."""
        self.timeline = list(timeline)
        """The ring-buffer monitor's timeline, rendered."""


class GuestStopped(VmError):
    """The guest stopped for good (powered off, or QEMU halted it) while the harness waited."""

    def __init__(self, message: str, *, run_state: str, **fields: Sequence[str]) -> None:
        super().__init__(message, **fields)
        self.run_state = run_state
        """QEMU's run state: `shutdown`, `internal-error`, `guest-panicked` or `io-error`."""

    @property
    def hypervisor_failed(self) -> bool:
        """The accelerator (KVM, TCG) failed to run the guest, not the guest itself."""
        return self.run_state == "internal-error"


class GuestPanicked(VmError):
    """The guest's kernel panicked (its console says so): nothing it was to do will happen."""

    def __init__(self, message: str, *, panic: str, oops: str, **fields: Sequence[str]) -> None:
        super().__init__(message, **fields)
        self.panic = panic
        """The kernel's reason, after `Kernel panic - not syncing: ` (`Fatal exception`)."""
        self.oops = oops
        """The first oops line before it (`Oops: int3: 0000 [#1] PREEMPT SMP NOPTI`), "" if none."""


class GuestStateMismatch(VmError):
    """What the guest's own systemd says did not hold (the boot, the agent's unit)."""

    def __init__(
        self, message: str, *, subject: str, seen: dict[str, str], **fields: Sequence[str]
    ) -> None:
        super().__init__(message, **fields)
        self.subject = subject
        """What was asked: `system` (`is-system-running`) or a unit's name."""
        self.seen = dict(seen)
        """What systemd answered, property by property (`SystemState` for the system)."""


class BootStuck(VmError):
    """The boot cannot go on by itself: the firmware's shell, no bootable disk, a panic, or no
    kernel in time. `dead_end` says which, in words (`firmware.DEAD_ENDS`)."""

    def __init__(self, message: str, *, dead_end: str, **fields: Sequence[str]) -> None:
        super().__init__(message, **fields)
        self.dead_end = dead_end


class ImageError(HarnessError):
    """The guest image could not be built: a tool, an apt source or a package is missing."""


class BuildStepFailed(ImageError):
    """A build step (mmdebstrap, mke2fs) exited non-zero; its output's last lines are kept."""

    def __init__(self, step: str, command: Sequence[str], status: int, tail: Sequence[str]) -> None:
        self.step = step
        self.command = list(command)
        self.status = status
        self.tail = list(tail)
        last = self.tail[-1] if self.tail else "no output"
        super().__init__(
            f"{step} ({self.command[0]}) failed with exit status {status}, last line: {last!r}"
        )


class RestoreRefused(VmError):
    """QEMU exited (or failed the migration) while loading a saved state: the restore is refused.

    What QEMU said is in `qemu_output` (its own lines, e.g. `Failed to load virtio-console:virtio`).
    """

    def __init__(
        self, message: str, *, state_file: str, exit_status: int | None, **fields: Sequence[str]
    ) -> None:
        super().__init__(message, **fields)
        self.state_file = state_file
        """The saved state QEMU was given (`-incoming`)."""
        self.exit_status = exit_status
        """QEMU's exit status; None when it stayed up with the migration failed."""


class SaveFailed(VmError):
    """Saving the guest's state (QMP `migrate` to a file) failed or did not finish in time."""

    def __init__(
        self, message: str, *, migration_status: str, qemu_error: str = "", **fields: Sequence[str]
    ) -> None:
        super().__init__(message, **fields)
        self.migration_status = migration_status
        """`query-migrate`'s last status: `failed`, `cancelled`, or where it was stuck."""
        self.qemu_error = qemu_error
        """QEMU's own `error-desc`, when it gave one."""


class StepMismatch(HarnessError):
    """A scenario's step ran to its end but did not do what the scenario says it must
    (a line came too late, QEMU accepted what it should refuse, refused for another reason)."""

    def __init__(self, message: str, *, expected: str, seen: str) -> None:
        super().__init__(message)
        self.expected = expected
        """What the step must show, in words."""
        self.seen = seen
        """What it showed instead, in words."""


class DaemonError(HarnessError):
    """A real LXD or Incus daemon could not be started, or refused or failed a request."""

    def __init__(
        self,
        message: str,
        *,
        daemon: str = "",
        request: str = "",
        status_code: int | None = None,
        error: str = "",
        log_tail: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.daemon = daemon
        """`lxd` or `incus`."""
        self.request = request
        """The request that failed (`POST /1.0/instances`); empty when it was not a request."""
        self.status_code = status_code
        """The HTTP status the daemon answered with; None when it did not answer."""
        self.error = error
        """The daemon's own error text (its JSON `error`, or an operation's `err`)."""
        self.log_tail = list(log_tail)
        """The daemon's last log lines, oldest first; empty when it had none."""
