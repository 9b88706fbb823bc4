"""Tests for lxd_agent_harness.scenarios.snapshot: the layout record, what an upgraded host reads
and a step's bound (no guest); then the whole scenario on real guests (marked vm). How the
command line renders its verdict is cli/test_report.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME
from lxd_agent_harness.base.errors import LayoutError, StepMismatch
from lxd_agent_harness.cli import report
from lxd_agent_harness.image.agents import AGENTS, agent_images
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE
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
from lxd_agent_harness.qemu.migration import is_specification_refusal
from lxd_agent_harness.scenarios.snapshot import (
    LayoutRecord,
    Step,
    StepVerdict,
    check_bound,
    snapshot_and_restore,
    upgraded_host_rings,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import GuestImage
from tests.helpers import run
from tests.vms import BOOT_TIMEOUT, Figures


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


# Five QEMUs, each of which may wait for another harness VM on this machine first.
SCENARIO_DEADLINE = 1200.0

# What the restored guest calls the port it writes to: the name it saw at boot on LXD 5.19.
GUEST_SIDE_NAME = f"the guest's first port is named {LEGACY_PORT_NAME!r} in the guest"


def assert_the_way_through(through: StepVerdict) -> float:
    """The state saved on 5.19 loaded into 5.20's configuration less the legacy stub; the
    guest wrote on to the port it knew, and the host read it from 5.20's ring, in time."""
    assert through.layout == "lxd-5.20" and through.error is None, through.error
    assert through.port == PORT_NAME  # the ring LXD 5.20 reads: qemu_serial-chardev
    assert through.started_after is not None and through.started_after <= ONE_REFRESH
    assert through.stopped_after_power_off is not None
    assert any("state loaded from" in line for line in through.timeline), through.timeline
    assert any(GUEST_SIDE_NAME in line for line in through.timeline), through.timeline
    return through.started_after


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
    through = assert_the_way_through(step[Step.RESTORE_RAW_CONF])
    figures["snapshot: raw.qemu.conf restore -> STARTED on 5.20's ring"] = f"{through:.2f} s"
    assert step[Step.RESTART].port == PORT_NAME
    assert verdict.workdir is not None and not verdict.workdir.exists()
    saved = step[Step.SAVE].saved
    assert saved is not None
    figures["snapshot: host upgraded -> STARTED"] = f"{upgrade.started_after:.2f} s"
    figures["snapshot: state saved"] = f"{saved.size / 1e6:.0f} MB in {saved.seconds:.2f} s"
    figures["snapshot: restored -> STARTED"] = f"{pinned.started_after:.2f} s"


@pytest.mark.vm
def test_the_way_through_works_for_lxd_5_0s_agent_in_an_old_snapshot(
    deb: Path, figures: Figures
) -> None:
    image = agent_images([AGENTS["lxd-5.0"]], deb, DEFAULT_RELEASE, print, rebuild=False)["lxd-5.0"]
    verdict = run(
        snapshot_and_restore(image, Accel.TCG, BOOT_TIMEOUT, progress=print, old_agent=True),
        SCENARIO_DEADLINE,
    )
    print("\n".join(report.snapshot_lines(verdict)))
    assert verdict.passed
    assert [seen.step for seen in verdict.steps] == [
        Step.BOOT,
        Step.HOST_UPGRADE,
        Step.SAVE,
        Step.RESTORE_UPGRADED,
        Step.RESTORE_RAW_CONF,
    ]
    assert verdict.steps[0].port == LEGACY_PORT_NAME
    through = assert_the_way_through(verdict.steps[-1])
    figures["snapshot, LXD 5.0's agent: raw.qemu.conf restore -> STARTED"] = f"{through:.2f} s"
