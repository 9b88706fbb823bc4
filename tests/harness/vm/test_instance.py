"""Tests for lxd_agent_harness.vm.instance: the running `Vm`'s errors and its QMP commands, with
stand-ins for QEMU (no guest)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import GuestStopped, VmError
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.vm import instance as vm
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from tests.harness.base.test_aio import cancelled_as_it_completes
from tests.helpers import unbooted_config


def test_a_stopped_guest_is_a_typed_error_and_leaves_the_kvm_verdict_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    verdict = tmp_path / "lxd-agent" / "kvm-verdict.json"
    verdict.parent.mkdir()
    verdict.write_text("{}")
    config, _ = unbooted_config(tmp_path, Accel.KVM)
    machine = vm.Vm(config)
    with pytest.raises(GuestStopped, match="hypervisor error under kvm") as caught:
        machine._raise_if_stopped("internal-error")
    assert caught.value.run_state == "internal-error" and caught.value.hypervisor_failed
    assert verdict.exists()  # forgetting it is the accelerator's decision, not the VM's
    machine._raise_if_stopped("shutdown")  # a power-off is no error unless the caller says so
    with pytest.raises(GuestStopped) as caught:
        machine._raise_if_stopped("shutdown", powered_off="the guest powered off")
    assert caught.value.run_state == "shutdown" and not caught.value.hypervisor_failed
    assert not machine.qemu_started


def test_an_error_from_a_running_vm_carries_console_qemu_output_and_timeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Seen:
        """Stands in for the console, QEMU and the monitor of a VM that ran for a while."""

        def tail_lines(self, lines: int) -> list[str]:
            return ["login: root"]

        def output_tail(self, lines: int) -> list[str]:
            return ["qemu: warning"]

        def render_timeline(self) -> list[str]:
            return ["    0.000s  note   QEMU started"]

    config, _ = unbooted_config(tmp_path, Accel.TCG)
    machine = vm.Vm(config)
    for part in ("_console", "_qemu", "_monitor"):
        monkeypatch.setattr(machine, part, Seen())
    error = machine.error("no STARTED")
    assert str(error) == "no STARTED"
    assert error.console_tail == ["login: root"]
    assert error.qemu_output == ["qemu: warning"]
    assert error.timeline == ["    0.000s  note   QEMU started"]
    # What the raiser already knew is kept.
    own = machine.fill(VmError("console closed", console_tail=["its own"]))
    assert own.console_tail == ["its own"] and own.qemu_output == ["qemu: warning"]


def test_a_vm_qmp_command_cancelled_as_qemu_answers_ends_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher's `query-status`: cancelled as the answer lands, it must not poll on."""

    async def scenario() -> None:
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        class Qmp:
            async def execute(self, command: str, arguments: object = None) -> str:
                return await answer

        class Qemu:
            qmp = Qmp()
            returncode = None

        config = VmConfig(get_layout("lxd-5.20"), DirectBoot(GuestImage(tmp_path)), Accel.TCG)
        machine = vm.Vm(config)
        monkeypatch.setattr(machine, "_qemu", Qemu())
        ended = await cancelled_as_it_completes(answer, machine.execute("query-status"))
        assert isinstance(ended, asyncio.CancelledError), f"the command ended with {ended!r}"

    asyncio.run(scenario())
