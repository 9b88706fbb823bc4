"""Tests for lxd_agent_harness.testing.guest: the synchronous guest, on a real (warm) guest."""

from __future__ import annotations

import pytest

from lxd_agent.protocol import PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.qemu.process import process_exists
from lxd_agent_harness.testing.guest import LxdVm
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from tests.vms import Figures


@pytest.mark.vm
def test_a_synchronous_guest_runs_waits_powers_off_and_leaves_nothing(
    guest_image: GuestImage, figures: Figures
) -> None:
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(guest_image), accel=Accel.TCG)
    with LxdVm.start(config, warm=True, progress=print) as guest:
        assert guest.warm, guest.start_info.reason
        assert guest.port == PORT_NAME and guest.state() == STARTED
        entry = guest.wait_for(STARTED, timeout=10)
        assert entry.port == PORT_NAME
        ran = guest.run("systemctl show lxd-agent -p ActiveState --value")
        assert (ran.status, ran.output) == (0, "active")
        assert guest.run("sh -c 'exit 3'").status == 3
        assert isinstance(guest.qmp("query-status"), dict)
        # A wait that times out raises with what a reader needs, as fields.
        with pytest.raises(VmError) as raised:
            guest.wait_for(STOPPED, timeout=1)
        assert raised.value.timeline and raised.value.console_tail
        result = guest.power_off()
        assert result.stopped and result.guest_off, result.timeline
        assert result.powered_down_at is not None and result.stopped_at is not None
        assert result.stopped_at >= result.powered_down_at
        figures["lxd_vm (warm): power button -> STOPPED"] = (
            f"{result.stopped_at - result.powered_down_at:.2f} s"
        )
        pid = guest.vm.qemu.pid
    assert not process_exists(pid)
    guest.close()  # twice is fine
