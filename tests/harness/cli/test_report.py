"""Tests for lxd_agent_harness.cli.report: what the command prints of a failure, a snapshot
verdict, the matrix and a boot's verdict, and where the matrix's table goes in a README (no
guest)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import (
    HarnessError,
    MonitorTimeout,
    QemuError,
    StepMismatch,
    VmError,
)
from lxd_agent_harness.cli import report
from lxd_agent_harness.image.agents import AGENTS, OURS
from lxd_agent_harness.lxd.monitor import ONE_REFRESH, EntryKind, TimelineEntry
from lxd_agent_harness.qemu.migration import SavedState
from lxd_agent_harness.scenarios.boot import BootVerdict
from lxd_agent_harness.scenarios.matrix import MatrixVerdict
from lxd_agent_harness.scenarios.snapshot import SnapshotVerdict, Step, StepVerdict
from tests.harness.qemu.test_migration import SPECIFICATION_LINES
from tests.harness.scenarios.test_matrix import good_cell


def test_a_failure_prints_its_line_then_what_the_error_carries() -> None:
    error = VmError(
        "no STARTED within 5 s",
        console_tail=["login: root"],
        qemu_output=["qemu: warning"],
        timeline=["    0.000s  note   QEMU started"],
    )
    lines = report.failure_lines(error)
    assert lines[0] == "FAILED: no STARTED within 5 s"
    for section, line in [
        ("--- QEMU's output (last lines) ---", "qemu: warning"),
        ("--- console (last lines) ---", "login: root"),
        ("--- timeline (seconds since QEMU start) ---", "    0.000s  note   QEMU started"),
    ]:
        assert lines[lines.index(section) + 1] == line
    assert report.failure_lines(QemuError("exited", output=["bad option"]))[1:] == [
        "--- QEMU's output ---",
        "bad option",
    ]
    assert report.failure_lines(MonitorTimeout("no STARTED", timeline=["t"]))[-1] == "t"
    assert report.failure_lines(HarnessError("plain")) == ["FAILED: plain"]


# -- the snapshot's verdict --------------------------------------------------------------------


def _passed_verdict(tmp_path: Path) -> SnapshotVerdict:
    steps = [StepVerdict(step, "lxd-5.19", seconds=1.0) for step in Step]
    steps[1].port, steps[1].started_after, steps[1].since = LEGACY_PORT_NAME, 4.2, "x"
    steps[1].bound = ONE_REFRESH
    steps[2].saved = SavedState(tmp_path / "state", 123_000_000, 1.5)
    steps[3].qemu_output, steps[3].exit_status = SPECIFICATION_LINES, 1
    steps[5].timeline = ["   12.000s  state  com.canonical.lxd: unknown -> STARTED"]
    return SnapshotVerdict(steps=steps)


def test_every_step_is_printed_with_its_figures_qemus_lines_and_timeline(tmp_path: Path) -> None:
    verdict = _passed_verdict(tmp_path)
    assert verdict.passed
    text = "\n".join(report.snapshot_lines(verdict))
    for number, step in enumerate(Step, 1):
        assert f"step {number}: {step.value} (lxd-5.19): OK" in text
    assert f"on {LEGACY_PORT_NAME}, 4.20 s after x (bound {ONE_REFRESH:g} s)" in text
    assert "123.0 MB written in 1.50 s" in text
    assert "QEMU exited with status 1; its own lines:" in text
    assert all(f"    {line}" in text for line in SPECIFICATION_LINES)
    assert "unknown -> STARTED" in text
    assert text.endswith("OK: every step behaved as described")


def test_a_failed_step_fails_the_verdict_and_says_why(tmp_path: Path) -> None:
    verdict = _passed_verdict(tmp_path)
    verdict.steps[5].error = StepMismatch(
        "STARTED came 9.00 s after the resume", expected="", seen=""
    )
    assert not verdict.passed
    text = "\n".join(report.snapshot_lines(verdict))
    assert "step 6: restore with the saved layout pinned (lxd-5.19): FAILED" in text
    assert "FAILED: STARTED came 9.00 s after the resume" in text


def test_steps_never_run_fail_the_verdict(tmp_path: Path) -> None:
    verdict = _passed_verdict(tmp_path)
    del verdict.steps[3:]
    assert not verdict.passed
    assert "step 7: restart on lxd-5.20: not run" in report.snapshot_lines(verdict)


def test_an_old_agents_run_ends_after_the_way_through_and_says_so(tmp_path: Path) -> None:
    verdict = _passed_verdict(tmp_path)
    verdict.planned = tuple(Step)[:5]
    assert not verdict.passed  # it ran steps it was not to run
    del verdict.steps[5:]
    assert verdict.passed
    lines = report.snapshot_lines(verdict)
    assert "step 6: restore with the saved layout pinned: not planned for this agent" in lines


# -- the matrix's table ------------------------------------------------------------------------


def test_the_table_has_a_row_per_cell_and_says_held_in_bold() -> None:
    held = replace(
        good_cell(),
        agent="lxd-5.0",
        started=None,
        stopped=None,
        guest_off=None,
        power_off_held=True,
        job_running="stop job for LXD - agent",
    )
    verdict = MatrixVerdict(
        agents=[AGENTS[OURS], AGENTS["lxd-5.0"]], layouts=["lxd-5.20"], cells=[good_cell(), held]
    )
    table = report.matrix_markdown(verdict)
    rows = [line for line in table if line.startswith(f"| {AGENTS['lxd-5.0'].title} |")]
    assert rows == [
        f"| {AGENTS['lxd-5.0'].title} | `lxd-5.20` | never | no | active (running) "
        "| **held > 20 s** (stop job for LXD - agent) | no |"
    ]
    ours = next(line for line in table if line.startswith(f"| {AGENTS[OURS].title} |"))
    assert f"11.0 s, `{PORT_NAME}`" in ours and "| 1.2 s | 0.7 s after power-off |" in ours
    assert any(AGENTS["lxd-5.0"].follows in line for line in table)
    assert verdict.passed  # the emulation's hang is data, not a failure
    assert report.matrix_lines(verdict)[-1].startswith("OK:")


def test_the_table_goes_between_the_markers_and_nothing_else_changes() -> None:
    text = f"intro\n{report.MATRIX_BEGIN}\nold table\n{report.MATRIX_END}\noutro\n"
    new = report.with_matrix(text, ["| a |", "| b |"], "README.md")
    assert new == f"intro\n{report.MATRIX_BEGIN}\n\n| a |\n| b |\n\n{report.MATRIX_END}\noutro\n"
    assert report.with_matrix(new, ["| a |", "| b |"], "README.md") == new
    with pytest.raises(report.MissingMarkers) as raised:
        report.with_matrix("no markers\n", [], "notes.md")
    assert raised.value.path == "notes.md"


# -- a boot's verdict ----------------------------------------------------------------------------


def test_a_boots_summary_shows_each_moment_and_the_seconds_after_the_power_off() -> None:
    verdict = BootVerdict(
        layout="lxd-5.20",
        port=PORT_NAME,
        started=TimelineEntry(11.0, EntryKind.STATE, f"unknown -> {STARTED}", PORT_NAME),
        stopped=TimelineEntry(21.0, EntryKind.STATE, f"{STARTED} -> {STOPPED}", PORT_NAME),
        kernel_up=2.5,
        powered_down=20.25,
        guest_off=21.5,
    )
    assert report.summary(verdict) == [
        "  QEMU start           0.00 s",
        "  kernel up            2.50 s",
        f"  STARTED             11.00 s   on {PORT_NAME}",
        "  power-off           20.25 s   (system_powerdown)",
        f"  STOPPED             21.00 s   on {PORT_NAME}, 0.75 s after power-off",
        "  guest off           21.50 s   1.25 s after power-off",
    ]


def test_a_summary_says_what_was_not_reached_and_what_the_unit_showed() -> None:
    """Incus: no LXD ring, so no STARTED; the agent unit's state instead. Never powered off."""
    verdict = BootVerdict(layout="incus", port=None, unit_state="ActiveState=inactive")
    lines = report.summary(verdict)
    assert lines[1] == "  kernel up               -  "
    assert "  agent unit        ActiveState=inactive" in lines
    assert not any("STARTED" in line or "STOPPED" in line or "guest off" in line for line in lines)
    assert lines[-1] == "  power-off               -     (system_powerdown)"
