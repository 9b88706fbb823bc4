"""The harness's results as lines for a person: verdicts, failures and their data, soak tables.

Pure functions from a verdict or an error to text; `cli.main` prints them, and so do the VM tests
when something fails. Host side only.
"""

from __future__ import annotations

from lxd_agent_harness.base.errors import (
    DaemonError,
    HarnessError,
    MonitorError,
    QemuError,
    VmError,
)
from lxd_agent_harness.cli.interrupt import Interrupted
from lxd_agent_harness.scenarios.boot import BootVerdict
from lxd_agent_harness.scenarios.check import CheckVerdict, LayoutCheck
from lxd_agent_harness.scenarios.matrix import Cell, MatrixVerdict
from lxd_agent_harness.scenarios.snapshot import SnapshotVerdict, Step
from lxd_agent_harness.scenarios.soak import FAULTS, SoakVerdict


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
    if isinstance(error, DaemonError):
        sections.append((f"the {error.daemon} daemon's log (last lines)", error.log_tail))
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


def _check_details(check: LayoutCheck) -> str:
    parts = []
    if check.boot_job:
        parts.append(f"the boot waited {check.bound:g}+ s on a {check.boot_job}")
    if check.started is not None:
        parts.append(
            f"STARTED {check.started.seconds:.1f} s after QEMU start on {check.started.port}"
        )
    if check.power_off_held:
        parts.append(f"power button: still up after {check.bound:g} s")
    elif check.off_after_power_off is not None:
        parts.append(f"off {check.off_after_power_off:.1f} s after the power button")
    if check.stopped_after_power_off is not None:
        parts.append(f"STOPPED {check.stopped_after_power_off:.1f} s after it")
    others = [port for port in check.opened_ports if port != check.status_port]
    if others:
        parts.append(f"also opened {', '.join(others)}")
    return "; ".join(parts)


def _where(check: LayoutCheck) -> str:
    """A layout's name, or the real daemon it ran on with the layout it is judged by."""
    host = check.host
    if host is None:
        return check.layout
    return f"{host.kind} {host.version} ({host.layout})" if host.version else host.kind


def check_lines(verdict: CheckVerdict, verbose: bool = False) -> list[str]:
    """One line per layout (verdict, finding, what was seen), failures' data, the overall line."""
    width = max((len(_where(check)) for check in verdict.checks), default=0)
    lines = []
    for check in verdict.checks:
        mark = "PASS" if check.passed else "FAIL"
        lines.append(f"{_where(check):<{width}}  {mark}  {check.reason}")
        details = _check_details(check)
        if details:
            lines.append(f"{'':<{width}}        {details}")
        if check.host is not None:
            lines += [
                f"{'':<{width}}        adapted: {name}: {why}"
                for name, why in check.host.adaptations
            ]
    for check in verdict.checks:
        if check.error is not None:
            lines.append(f"{_where(check)}:")
            lines += [f"  {line}" for line in failure_lines(check.error)]
        elif verbose or not check.passed:
            since = "the start request" if check.host is not None else "QEMU start"
            lines.append(f"--- {_where(check)}: timeline (seconds since {since}) ---")
            lines += check.timeline
            if check.host is not None and check.host.log:
                lines.append(f"--- {_where(check)}: the daemon's log ---")
                lines += list(check.host.log)
    failed = [_where(check) for check in verdict.checks if not check.passed]
    if failed:
        lines.append(f"FAILED: {verdict.image} on {', '.join(failed)} (see above)")
    else:
        lines.append(
            f"OK: the agent in {verdict.image} survives the rename on "
            f"{', '.join(_where(check) for check in verdict.checks)}"
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
            why = "not run" if step in verdict.planned else "not planned for this agent"
            lines.append(f"step {number}: {step.value}: {why}")
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
        lines.append("OK: every step behaved as described")
    else:
        lines.append("FAILED: a step did not behave as described (see above)")
    return lines


# -- the compatibility matrix ------------------------------------------------------------------

MATRIX_BEGIN = "<!-- matrix: generated by `lxd-agent-harness matrix --readme`; do not edit -->"
MATRIX_END = "<!-- matrix: end -->"


class MissingMarkers(HarnessError):
    """The file to put the matrix in has no place marked for it."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"{path} has no line {MATRIX_BEGIN!r} followed by {MATRIX_END!r}; "
            "add both where the table belongs"
        )


def _cell_texts(cell: Cell) -> list[str]:
    """The row's columns after agent and layout: STARTED, boot, unit, power-off, STOPPED."""
    if cell.error is not None:
        return ["harness failed: " + str(cell.error).splitlines()[0], "", "", "", ""]
    started = f"{cell.started.seconds:.1f} s, `{cell.started.port}`" if cell.started else "never"
    if cell.boot_held_past_bound:
        boot = f"**held > {cell.bound:g} s** (start job still running)"
    elif cell.boot_held is not None:
        boot = f"yes, {cell.boot_held:.1f} s to READY=1"
    else:
        boot = "no"
    if cell.system_state and cell.system_state != "running" and not cell.boot_held_past_bound:
        boot += f"; system `{cell.system_state}` after {cell.bound:g} s"
    unit = cell.unit.summary() if cell.unit is not None else "unknown"
    if cell.power_off_held:
        job = f" ({cell.job_running})" if cell.job_running else ""
        power_off = f"**held > {cell.bound:g} s**{job}"
    elif cell.off_after_power_off is not None:
        power_off = f"{cell.off_after_power_off:.1f} s"
    else:
        power_off = "not reached"
    after = cell.stopped_after_power_off
    stopped = f"{after:.1f} s after power-off" if after is not None else "no"
    return [started, boot, unit, power_off, stopped]


def matrix_markdown(verdict: MatrixVerdict) -> list[str]:
    """The agents, then one table row per agent and layout: what the host and systemd saw."""
    lines = ["Agents:", ""]
    for agent in verdict.agents:
        lines.append(f"- **{agent.title}** (`{agent.name}`): {agent.follows}.")
    lines += [
        "",
        "| agent | layout | STARTED seen (since QEMU start) | boot waits for it | unit after boot "
        "| power button -> off | STOPPED seen |",
        "|---|---|---|---|---|---|---|",
    ]
    titles = {agent.name: agent.title for agent in verdict.agents}
    for cell in verdict.cells:
        texts = [titles[cell.agent], f"`{cell.layout}`", *_cell_texts(cell)]
        lines.append("| " + " | ".join(t.replace("|", "\\|") for t in texts) + " |")
    return lines


def matrix_lines(verdict: MatrixVerdict) -> list[str]:
    """The table, each harness failure with its data, our shortfalls, the verdict's line."""
    lines = matrix_markdown(verdict)
    for cell in verdict.harness_failures():
        assert cell.error is not None
        lines.append(f"{cell.agent} on {cell.layout}:")
        lines += [f"  {line}" for line in failure_lines(cell.error)]
    for cell, problems in verdict.our_problems():
        lines += [f"REGRESSION: ours on {cell.layout}: {problem}" for problem in problems]
    if verdict.passed:
        lines.append(f"OK: {len(verdict.cells)} cells; ours did what it must in every layout")
    else:
        lines.append("FAILED: see the lines above")
    return lines


def with_matrix(text: str, table: list[str], path: str) -> str:
    """`text` with the lines between the matrix markers replaced by `table`."""
    lines = text.split("\n")
    try:
        begin = lines.index(MATRIX_BEGIN)
        end = lines.index(MATRIX_END, begin)
    except ValueError:
        raise MissingMarkers(path) from None
    return "\n".join([*lines[: begin + 1], "", *table, "", *lines[end:]])
