"""The harness's results as lines for a person: verdicts, failures and their data, soak tables.

Pure functions from a verdict or an error to text; `cli.py` prints them, and so do the VM tests
when something fails. Host side only.
"""

from __future__ import annotations

from lxd_agent.host.errors import HarnessError, MonitorError, QemuError, VmError
from lxd_agent.host.interrupt import Interrupted
from lxd_agent.host.scenario import BootVerdict
from lxd_agent.host.soak import FAULTS, SoakVerdict


def failure_lines(error: HarnessError) -> list[str]:
    """The error's one line, then what it carries: QEMU's output, the console, the timeline."""
    sections: list[tuple[str, list[str]]] = []
    if isinstance(error, QemuError):
        sections.append(("QEMU's output", error.output))
    if isinstance(error, VmError):
        sections += [
            ("QEMU's output (last lines)", error.qemu_output),
            ("console (last lines)", error.console_tail),
            ("timeline (seconds since QEMU start)", error.timeline),
        ]
    if isinstance(error, MonitorError):
        sections.append(("timeline (seconds since QEMU start)", error.timeline))
    lines = [f"FAILED: {error}"]
    for title, body in sections:
        if body:
            lines += [f"--- {title} ---", *body]
    return lines


def summary(verdict: BootVerdict) -> list[str]:
    """The timeline in a few lines: what a person wants to see first."""

    def at(seconds: float | None) -> str:
        return f"{seconds:7.2f} s" if seconds is not None else "      -  "

    lines = [f"  QEMU start        {0:7.2f} s", f"  kernel up         {at(verdict.kernel_up)}"]
    if verdict.started is not None:
        lines.append(f"  STARTED           {at(verdict.started.seconds)}   on {verdict.port}")
    if verdict.unit_state:
        lines.append(f"  agent unit        {verdict.unit_state}")
    lines.append(f"  power-off         {at(verdict.powered_down)}   (system_powerdown)")
    if verdict.stopped is not None and verdict.stopped_after_power_off is not None:
        lines.append(
            f"  STOPPED           {at(verdict.stopped.seconds)}   on {verdict.port}, "
            f"{verdict.stopped_after_power_off:.2f} s after power-off"
        )
    if verdict.off_after_power_off is not None:
        lines.append(
            f"  guest off         {at(verdict.guest_off)}   "
            f"{verdict.off_after_power_off:.2f} s after power-off"
        )
    return lines


def interrupted_line(interrupt: Interrupted) -> str:
    return (
        f"INTERRUPTED: {interrupt.signal_name}; QEMU, mounts, build and temporary directories "
        f"cleaned up (exit status {interrupt.exit_status})"
    )


def soak_table(verdict: SoakVerdict) -> list[str]:
    """One row per cycle, one column per fault: its seconds, or FAILED / not run."""
    width = max(len(fault) for fault in FAULTS)
    lines = ["cycle " + " ".join(f"{fault:>{width}}" for fault in FAULTS)]
    for cycle in range(1, verdict.cycles + 1):
        cells = []
        for result in (r for r in verdict.results if r.cycle == cycle):
            if result.passed:
                cells.append(f"{result.seconds:>{width - 2}.1f} s")
            elif result.error is not None:
                cells.append(f"{'FAILED':>{width}}")
            else:
                cells.append(f"{'-':>{width}}")
        lines.append(f"{cycle:>5} " + " ".join(cells))
    return lines
