"""Tests for lxd_agent_harness.scenarios.soak: the soak's VM configuration, then the scenario in
real guests: a short soak (2 cycles) through the scenario, as the CLI runs it; `make soak` runs
50 through the command line. On failure each failed fault's error, console tail and timeline
are printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.cli.report import failure_lines, soak_table
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.monitor import ONE_REFRESH
from lxd_agent_harness.scenarios.soak import FAULTS, soak, soak_config
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig, VmFiles, qemu_args
from tests.helpers import run
from tests.vms import BOOT_TIMEOUT


def test_a_soak_vm_may_reboot_inside_its_qemu_and_others_may_not(tmp_path: Path) -> None:
    image = GuestImage(tmp_path)
    base = VmConfig(get_layout("lxd-5.20"), DirectBoot(image), Accel.TCG)
    files = VmFiles(tmp_path)
    assert "shutdown=pause,reboot=shutdown" in qemu_args(base, files)
    assert "shutdown=pause,reboot=reset" in qemu_args(soak_config(base), files)
    assert "-qmp" in qemu_args(soak_config(base), files)  # the restarted reader's socket


SHORT_SOAK_CYCLES = 2
# Per cycle: a boot, a reboot, the faults and a power-off, under TCG: about 2 minutes.
SOAK_DEADLINE = 300.0 * SHORT_SOAK_CYCLES


@pytest.mark.vm
def test_short_soak_every_fault_of_every_cycle_passes(guest_image: GuestImage) -> None:
    config = VmConfig(get_layout("lxd-5.20"), DirectBoot(guest_image), Accel.TCG)
    # Warm: each cycle's guest is restored, not booted (the faults are what is soaked here; the
    # reboot fault still boots, and `make soak` boots every cycle).
    verdict = run(
        soak(config, SHORT_SOAK_CYCLES, BOOT_TIMEOUT, progress=print, warm=True), SOAK_DEADLINE
    )
    print("\n".join(soak_table(verdict)))
    for failed in verdict.failures():
        if failed.error is not None:
            print(f"--- cycle {failed.cycle} {failed.fault} ---")
            print("\n".join(failure_lines(failed.error)))
    assert verdict.passed, [(r.cycle, r.fault, str(r.error)) for r in verdict.failures()]
    assert len(verdict.results) == SHORT_SOAK_CYCLES * len(FAULTS)
    by_fault = {r.fault: r for r in verdict.results if r.cycle == 1}
    assert by_fault["boot"].detail == "STARTED after a restore"
    # The two faults the agent must answer within one refresh, by the same process.
    assert by_fault["port-replug"].seconds is not None
    assert by_fault["port-replug"].seconds <= ONE_REFRESH
    assert by_fault["monitor-restart"].seconds is not None
    assert by_fault["monitor-restart"].seconds <= ONE_REFRESH
