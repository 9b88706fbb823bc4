"""The harness's results as lines for a person: verdicts, failures and their data, soak tables.

Pure functions from a verdict or an error to text; `cli.py` prints them, and so do the VM tests
when something fails. Host side only.
"""

from __future__ import annotations

from lxd_agent.host.errors import HarnessError, MonitorError, QemuError, VmError
from lxd_agent.host.interrupt import Interrupted
from lxd_agent.host.scenario import BootVerdict
from lxd_agent.host.snapshot import SnapshotVerdict, Step
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


def soak_lines(verdict: SoakVerdict) -> list[str]:
    """The table, each failure with its data, the mean cycle time and the verdict's line."""
    lines = soak_table(verdict)
    for failed in verdict.failures():
        if failed.error is not None:
            lines.append(f"cycle {failed.cycle} {failed.fault}:")
            lines += [f"  {line}" for line in failure_lines(failed.error)]
    if verdict.cycle_seconds:
        mean = sum(verdict.cycle_seconds) / len(verdict.cycle_seconds)
        lines.append(f"one cycle: {mean:.1f} s on average ({len(verdict.cycle_seconds)} completed)")
    passed = sum(r.passed for r in verdict.results)
    total = verdict.cycles * len(FAULTS)
    outcome = "OK" if verdict.passed else "FAILED"
    lines.append(
        f"{outcome}: {passed} of {total} faults passed in {verdict.cycles} cycles "
        f"({verdict.layout})"
    )
    return lines


def snapshot_lines(verdict: SnapshotVerdict) -> list[str]:
    """Each step: what it must show, whether it did, its figures, QEMU's lines, its timeline."""
    lines: list[str] = []
    for number, step in enumerate(Step, 1):
        seen = verdict.step(step)
        if seen is None:
            lines.append(f"step {number}: {step.value}: not run")
            continue
        outcome = "OK" if seen.passed else "FAILED"
        lines += [
            f"step {number}: {step.value} ({seen.layout}): {outcome} in {seen.seconds:.1f} s",
            f"  must:     {seen.expected}",
        ]
        if seen.port is not None and seen.started_after is not None:
            bound = f" (bound {seen.bound:g} s)" if seen.bound is not None else ""
            lines.append(
                f"  STARTED   on {seen.port}, {seen.started_after:.2f} s after {seen.since}{bound}"
            )
        if seen.saved is not None:
            lines.append(
                f"  state     {seen.saved.size / 1e6:.1f} MB written in {seen.saved.seconds:.2f} s"
            )
        if seen.record is not None:
            lines.append(f"  recorded  {seen.record.layout}: ports {', '.join(seen.record.ports)}")
        if seen.qemu_output:
            lines.append(f"  QEMU exited with status {seen.exit_status}; its own lines:")
            lines += [f"    {line}" for line in seen.qemu_output]
        if seen.stopped_after_power_off is not None and seen.off_after_power_off is not None:
            lines.append(
                f"  power-off STOPPED {seen.stopped_after_power_off:.2f} s after, "
                f"guest off {seen.off_after_power_off:.2f} s after"
            )
        if seen.error is not None:
            lines += [f"  {line}" for line in failure_lines(seen.error)]
        if seen.timeline:
            lines.append("  timeline (seconds since this step's QEMU start):")
            lines += [f"  {line}" for line in seen.timeline]
    if verdict.passed:
        lines.append("OK: every step behaved as the specification describes")
    else:
        lines.append("FAILED: a step did not behave as described (see above)")
    return lines
