"""Tests for lxd_agent_harness.base.errors: every error is a `HarnessError` whose message is one
line, and what a reader of the failure needs travels in its fields."""

from __future__ import annotations

import importlib
import inspect

import pytest

from lxd_agent_harness.base.errors import (
    BootStuck,
    BuildStepFailed,
    GuestStopped,
    HarnessError,
    MonitorError,
    MonitorTimeout,
    QemuError,
    RestoreRefused,
    SaveFailed,
    StepMismatch,
    VmError,
)
from tests.harness.test_layers import modules

INTERRUPT = "lxd_agent_harness.cli.interrupt"


def test_every_error_the_harness_defines_is_a_harness_error() -> None:
    """The command line catches `HarnessError` alone: anything else would be a traceback.

    Every module of the harness is read, not only this one: errors live by what raises them
    (`image.deb.PackageNotFound`, `cli.interrupt.Interrupted` is the one exception on purpose).
    """
    defined = []
    for name in modules():
        if name.endswith(".__main__"):  # runs the command line when imported
            continue
        module = importlib.import_module(name)
        defined += [
            value
            for value in vars(module).values()
            if inspect.isclass(value)
            and issubclass(value, BaseException)
            and value.__module__ == name
        ]
    assert len(defined) > 15
    others = [f"{c.__module__}.{c.__name__}" for c in defined if not issubclass(c, HarnessError)]
    assert others == [f"{INTERRUPT}.Interrupted"]


def test_a_vm_errors_message_is_one_line_and_what_it_saw_is_in_its_fields() -> None:
    error = VmError(
        "no STARTED within 5 s",
        console_tail=("login: root",),
        qemu_output=("qemu: warning",),
        timeline=("    0.000s  note   QEMU started",),
    )
    assert str(error) == "no STARTED within 5 s"
    assert error.console_tail == ["login: root"]
    assert error.qemu_output == ["qemu: warning"]
    assert error.timeline == ["    0.000s  note   QEMU started"]
    bare = VmError("the VM is not running")
    assert (bare.console_tail, bare.qemu_output, bare.timeline) == ([], [], [])


def test_an_error_keeps_its_own_copy_of_the_lines_it_was_given() -> None:
    output = ["qemu: -accel kvm: no KVM"]
    error = QemuError("QEMU exited at start", output=output, exit_status=1)
    output.append("a line written after the error was raised")
    assert error.output == ["qemu: -accel kvm: no KVM"]
    assert error.exit_status == 1
    assert QemuError("no answer on QMP").exit_status is None


def test_a_monitor_timeout_is_a_monitor_error_with_the_timeline() -> None:
    error = MonitorTimeout("no STARTED on com.canonical.lxd within 5 s", timeline=["t"])
    assert isinstance(error, MonitorError) and error.timeline == ["t"]


@pytest.mark.parametrize(
    ("run_state", "hypervisor"),
    [
        ("internal-error", True),
        ("guest-panicked", False),
        ("shutdown", False),
        ("io-error", False),
    ],
)
def test_only_an_internal_error_is_the_hypervisors_failure(
    run_state: str, hypervisor: bool
) -> None:
    stopped = GuestStopped("the guest stopped", run_state=run_state, console_tail=["x"])
    assert stopped.run_state == run_state
    assert stopped.hypervisor_failed is hypervisor
    assert isinstance(stopped, VmError) and stopped.console_tail == ["x"]


def test_a_failed_build_step_names_its_program_its_status_and_its_last_line() -> None:
    failed = BuildStepFailed(
        "Debian bookworm", ["mmdebstrap", "--variant=apt"], 1, ["I: a", "E: b"]
    )
    assert str(failed) == (
        "Debian bookworm (mmdebstrap) failed with exit status 1, last line: 'E: b'"
    )
    assert (failed.step, failed.command, failed.status) == (
        "Debian bookworm",
        ["mmdebstrap", "--variant=apt"],
        1,
    )
    assert failed.tail == ["I: a", "E: b"]
    silent = BuildStepFailed("the disk", ("mke2fs",), 2, ())
    assert str(silent).endswith("last line: 'no output'") and silent.tail == []


def test_the_boots_and_the_snapshots_errors_carry_their_own_facts() -> None:
    stuck = BootStuck("no kernel in 60 s", dead_end="the UEFI shell", console_tail=["Shell>"])
    assert stuck.dead_end == "the UEFI shell" and stuck.console_tail == ["Shell>"]
    refused = RestoreRefused(
        "the restore was refused",
        state_file="/tmp/state",
        exit_status=1,
        qemu_output=["qemu-system-x86_64: load of migration failed: Invalid argument"],
    )
    assert (refused.state_file, refused.exit_status) == ("/tmp/state", 1)
    assert refused.qemu_output[0].endswith("Invalid argument")
    save = SaveFailed("the save did not finish", migration_status="failed")
    assert (save.migration_status, save.qemu_error) == ("failed", "")
    mismatch = StepMismatch("STARTED came late", expected="within 5 s", seen="after 9 s")
    assert (mismatch.expected, mismatch.seen) == ("within 5 s", "after 9 s")
    assert str(mismatch) == "STARTED came late"
