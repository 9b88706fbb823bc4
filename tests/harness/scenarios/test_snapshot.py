"""Tests for the harness's scenarios.snapshot: the specification's lines, the layout record, what an
upgraded host reads and how the command line renders a verdict (no guest); then the whole
scenario on real guests (marked vm)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxd_agent_harness.base.errors import LayoutError, StepMismatch
from lxd_agent_harness.cli import report
from lxd_agent_harness.lxd.layouts import (
    INCUS,
    LXD_5_19,
    LXD_5_20,
    SPICE_PORTS,
    Backend,
    Chardev,
    Layout,
    Port,
)
from lxd_agent_harness.lxd.monitor import ONE_REFRESH
from lxd_agent_harness.qemu.migration import SavedState, is_specification_refusal
from lxd_agent_harness.scenarios.snapshot import (
    LayoutRecord,
    SnapshotVerdict,
    Step,
    StepVerdict,
    check_bound,
    snapshot_and_restore,
    upgraded_host_rings,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import GuestImage

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME
from tests.host.guests import BOOT_TIMEOUT, Figures
from tests.host.helpers import run
from tests.host.test_migration import SPECIFICATION_LINES


def test_the_layout_record_round_trips_and_pins_the_saved_layout(tmp_path: Path) -> None:
    record = LayoutRecord.of(LXD_5_19)
    record.write(tmp_path / "state.json")
    again = LayoutRecord.read(tmp_path / "state.json")
    assert again == record
    assert again.pinned() is LXD_5_19
    assert again.ports == (LEGACY_PORT_NAME, *(p.name for p in SPICE_PORTS))


def test_a_record_whose_ports_differ_from_the_layout_of_its_name_is_refused(tmp_path: Path) -> None:
    # Saved with 5.19's name but 5.20's four ports: restoring "5.19" would not match the state.
    LayoutRecord("lxd-5.19", LXD_5_20.port_names, 16).write(tmp_path / "state.json")
    with pytest.raises(LayoutError, match="QEMU would refuse it"):
        LayoutRecord.read(tmp_path / "state.json").pinned()


def test_an_unreadable_record_says_to_save_again(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"layout": "lxd-5.19"}')
    with pytest.raises(LayoutError, match="save the state again"):
        LayoutRecord.read(tmp_path / "state.json")


def test_the_upgraded_host_reads_its_chardev_behind_the_port_the_vm_booted_with() -> None:
    rings = upgraded_host_rings(LXD_5_20, LXD_5_19)
    assert [(r.port_name, r.chardev_id) for r in rings] == [
        (LEGACY_PORT_NAME, LXD_5_20.ring_for(PORT_NAME).chardev_id)
    ]
    assert upgraded_host_rings(INCUS, LXD_5_19)[0].rule is INCUS.rule


def test_an_upgraded_host_that_reads_another_chardev_cannot_read_the_running_vm() -> None:
    other = Layout(
        "other",
        "a ring on a chardev of another name",
        (Port(PORT_NAME, "elsewhere", Chardev("elsewhere-chardev", Backend.RINGBUF)),),
    )
    with pytest.raises(LayoutError, match="could not read the running VM"):
        upgraded_host_rings(other, LXD_5_19)


@pytest.mark.parametrize(
    ("after", "passes"), [(ONE_REFRESH - 0.01, True), (ONE_REFRESH + 0.01, False)]
)
def test_started_later_than_one_refresh_fails_the_step(after: float, passes: bool) -> None:
    step = StepVerdict(Step.RESTORE_PINNED, "lxd-5.19", started_after=after, bound=ONE_REFRESH)
    check_bound(step)
    assert step.passed is passes
    if not passes:
        assert isinstance(step.error, StepMismatch) and step.error.expected == step.expected


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
    assert text.endswith("OK: every step behaved as the specification describes")


def test_a_failed_step_fails_the_verdict_and_says_why(tmp_path: Path) -> None:
    verdict = _passed_verdict(tmp_path)
    verdict.steps[4].error = StepMismatch(
        "STARTED came 9.00 s after the resume", expected="", seen=""
    )
    assert not verdict.passed
    text = "\n".join(report.snapshot_lines(verdict))
    assert "step 5: restore with the saved layout pinned (lxd-5.19): FAILED" in text
    assert "FAILED: STARTED came 9.00 s after the resume" in text


def test_steps_never_run_fail_the_verdict(tmp_path: Path) -> None:
    verdict = _passed_verdict(tmp_path)
    del verdict.steps[3:]
    assert not verdict.passed
    assert "step 6: restart on lxd-5.20: not run" in report.snapshot_lines(verdict)


# Four QEMUs, each of which may wait for another harness VM on this machine first.
SCENARIO_DEADLINE = 900.0


@pytest.mark.vm
def test_the_snapshot_scenario_behaves_as_the_specification_says(
    guest_image: GuestImage, figures: Figures
) -> None:
    verdict = run(
        snapshot_and_restore(guest_image, Accel.TCG, BOOT_TIMEOUT, progress=print),
        SCENARIO_DEADLINE,
    )
    print("\n".join(report.snapshot_lines(verdict)))
    assert verdict.passed
    step = {seen.step: seen for seen in verdict.steps}
    assert step[Step.BOOT].port == LEGACY_PORT_NAME
    upgrade, pinned = step[Step.HOST_UPGRADE], step[Step.RESTORE_PINNED]
    for within_a_refresh in (upgrade, pinned):
        assert within_a_refresh.port == LEGACY_PORT_NAME
        assert within_a_refresh.started_after is not None
        assert within_a_refresh.started_after <= ONE_REFRESH
    refused = step[Step.RESTORE_UPGRADED]
    assert refused.exit_status == 1 and is_specification_refusal(refused.qemu_output)
    assert step[Step.RESTART].port == PORT_NAME
    assert verdict.workdir is not None and not verdict.workdir.exists()
    saved = step[Step.SAVE].saved
    assert saved is not None
    figures["snapshot: host upgraded -> STARTED"] = f"{upgrade.started_after:.2f} s"
    figures["snapshot: state saved"] = f"{saved.size / 1e6:.0f} MB in {saved.seconds:.2f} s"
    figures["snapshot: restored -> STARTED"] = f"{pinned.started_after:.2f} s"
