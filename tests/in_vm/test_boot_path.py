"""The agent is off the boot's critical path, and one Python process per boot runs it.

Booted with the kernel's exec tracepoint on from the first instant (`trace_event=` on the
command line), so the guest's own kernel counts every start of `/usr/bin/lxd-agent`: the
daemon, a condition probe, a stop hook that started an interpreter. Nothing the agent or its
unit could forget to log. On LXD 5.20's layout and Incus's (the agent reports on each host's
own port).
"""

from __future__ import annotations

import pytest

from lxd_agent.protocol import PORT_NAME
from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, kernel_append
from lxd_agent_harness.vm.instance import Vm
from tests.vms import Figures, checked_boot

pytestmark = pytest.mark.vm

TRACE_APPEND = f"{kernel_append(Arch.AMD64)} trace_event=sched:sched_process_exec"
TRACE = "/sys/kernel/tracing/trace"
AGENT = "/usr/bin/lxd-agent"


async def agent_starts(vm: Vm) -> list[str]:
    """Every exec of the agent's command in this boot, from the kernel's trace."""
    everything = await vm.run(f"grep -c 'sched_process_exec: ' {TRACE}")
    # The trace must have seen the boot (systemd's own execs): an empty one proves nothing.
    assert int(everything.output.strip() or 0) > 20, everything.output
    ours = await vm.run(f"grep 'sched_process_exec: filename={AGENT} ' {TRACE}")
    return [line.strip() for line in ours.output.splitlines() if line.strip()]


@pytest.mark.parametrize("layout", ["lxd-5.20", "incus"])
def test_nothing_waits_for_the_agent_and_one_interpreter_runs_it(
    guest_image: GuestImage, layout: str, figures: Figures
) -> None:
    async def checks(vm: Vm) -> None:
        await vm.run("systemctl is-system-running --wait", timeout=90)
        chain = await vm.run("systemd-analyze critical-chain --no-pager multi-user.target")
        print(f"{layout}: critical chain:\n{chain.output}")
        assert "multi-user.target @" in chain.output, chain.output
        assert "lxd-agent" not in chain.output, chain.output
        starts = await agent_starts(vm)
        print(f"{layout}: agent starts in this boot:\n" + "\n".join(starts))
        figures[f"{layout}: lxd-agent starts in the boot"] = str(len(starts))
        assert len(starts) == 1, starts
        # What that one start logged reached journald with its structured fields.
        if layout == "lxd-5.20":
            fields = f"LXD_AGENT_PORT={PORT_NAME} SYSLOG_IDENTIFIER=lxd-agent"
            journal = await vm.run(f"journalctl -b -q -o cat {fields} --no-pager")
            assert f"reporting to {PORT_NAME} (" in journal.output, journal.output

    checked_boot(DirectBoot(guest_image, TRACE_APPEND), layout, while_up=checks)
