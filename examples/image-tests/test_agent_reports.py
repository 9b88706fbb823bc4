"""What an image builder's CI asks of an image for LXD, on the lxd-agent-harness pytest plugin."""

import pytest


@pytest.mark.parametrize("lxd_layout", ["lxd-5.19", "lxd-5.20"])
def test_the_agent_reports_before_and_after_the_rename(lxd_vm):
    lxd_vm.wait_for("STARTED", timeout=300)
    assert lxd_vm.run("systemctl is-active lxd-agent").output == "active"
    assert lxd_vm.power_off().stopped
