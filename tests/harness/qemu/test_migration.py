"""Tests for lxd_agent_harness.qemu.migration: save a state, load it back, and QEMU's refusal as
data.

Every QEMU here is a paused q35 (`-S`, never continued): its devices are saved and loaded, and
no guest code ever runs, so no VM lock is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent.protocol import PORT_NAME
from lxd_agent_harness.base.errors import QemuError, RestoreRefused, SaveFailed, VmError
from lxd_agent_harness.lxd.layouts import LXD_5_19, LXD_5_20, Layout, Port
from lxd_agent_harness.qemu.migration import (
    as_refusal,
    incoming_uri,
    is_specification_refusal,
    outgoing_uri,
    save_state,
    wait_incoming,
)
from lxd_agent_harness.qemu.process import QemuProcess
from tests.helpers import MACHINE_PAUSED, run

# The specification's own lines ("Limitations"), as `lxc info --show-log` shows them.
SPECIFICATION_LINES = [
    "qemu-system-x86_64: Failed to load virtio-console:virtio",
    "qemu-system-x86_64: error while loading state for instance 0x0 of device "
    "'0000:00:01.0:00.5/virtio-console'",
    "qemu-system-x86_64: load of migration failed: Invalid argument",
]


def test_the_specifications_own_lines_are_recognised() -> None:
    assert is_specification_refusal(["char device redirected to /dev/pts/3", *SPECIFICATION_LINES])


@pytest.mark.parametrize("left_out", range(3))
def test_a_refusal_missing_one_of_the_lines_is_not_the_specifications(left_out: int) -> None:
    lines = [line for i, line in enumerate(SPECIFICATION_LINES) if i != left_out]
    assert not is_specification_refusal(lines)


def test_the_lines_count_only_in_the_specifications_order() -> None:
    assert not is_specification_refusal(list(reversed(SPECIFICATION_LINES)))


def _qemu(layout: Layout, workdir: Path, incoming: Path | None = None) -> QemuProcess:
    args = [*MACHINE_PAUSED, *layout.qemu_args(spice_socket=workdir / f"spice-{layout.name}")]
    if incoming is not None:
        args += ["-incoming", incoming_uri(incoming)]
    return QemuProcess(args, name=f"test-{layout.name}")


def _saved(layout: Layout, tmp_path: Path) -> Path:
    state = tmp_path / "saved state"  # a space: the exec: command goes through a shell

    async def scenario() -> None:
        async with _qemu(layout, tmp_path) as qemu:
            saved = await save_state(qemu.qmp, state)
            assert saved.size == state.stat().st_size > 0
            status = await qemu.qmp.execute("query-status")
            assert isinstance(status, dict) and status["status"] == "postmigrate"

    run(scenario())
    return state


def test_a_state_saved_on_lxd_5_19_loads_into_the_same_layout(tmp_path: Path) -> None:
    state = _saved(LXD_5_19, tmp_path)

    async def scenario() -> None:
        async with _qemu(LXD_5_19, tmp_path, incoming=state) as qemu:
            await wait_incoming(qemu, state, timeout=30)
            assert qemu.returncode is None

    run(scenario())


def test_qemu_checks_the_count_of_ports_not_their_names(tmp_path: Path) -> None:
    """facts §5: the same ports with the status port renamed still load."""
    state = _saved(LXD_5_19, tmp_path)
    ring, *spice = LXD_5_19.ports
    renamed = Layout(
        "renamed",
        "5.19 with the ring's port renamed",
        (Port(PORT_NAME, ring.device_id, ring.chardev), *spice),
    )

    async def scenario() -> None:
        async with _qemu(renamed, tmp_path, incoming=state) as qemu:
            await wait_incoming(qemu, state, timeout=30)

    run(scenario())


def test_lxd_5_20_refuses_a_5_19_state_with_the_specifications_lines(tmp_path: Path) -> None:
    state = _saved(LXD_5_19, tmp_path)

    async def scenario() -> RestoreRefused:
        try:
            async with _qemu(LXD_5_20, tmp_path, incoming=state) as qemu:
                await wait_incoming(qemu, state, timeout=30)
        except (RestoreRefused, QemuError) as e:
            # QEMU may exit before its QMP is ready, or while the harness waits.
            refusal = await as_refusal(e, None, state)
            assert refusal is not None, e
            return refusal
        raise AssertionError("QEMU loaded a 5.19 state into the 5.20 layout")

    refusal = run(scenario())
    assert refusal.exit_status == 1
    assert refusal.state_file == str(state)
    assert is_specification_refusal(refusal.qemu_output), refusal.qemu_output


def test_a_truncated_state_is_refused_but_not_for_the_specifications_reason(
    tmp_path: Path,
) -> None:
    state = _saved(LXD_5_19, tmp_path)
    with state.open("r+b") as f:
        f.truncate(state.stat().st_size // 2)

    async def scenario() -> RestoreRefused | None:
        try:
            async with _qemu(LXD_5_19, tmp_path, incoming=state) as qemu:
                await wait_incoming(qemu, state, timeout=30)
        except (RestoreRefused, QemuError) as e:
            return await as_refusal(e, None, state)
        return None

    refusal = run(scenario())
    assert refusal is not None
    assert refusal.qemu_output and not is_specification_refusal(refusal.qemu_output)


def test_a_missing_state_fails_at_once_instead_of_waiting(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _qemu(LXD_5_19, tmp_path, incoming=tmp_path / "none") as qemu:
            await wait_incoming(qemu, tmp_path / "none", timeout=30)

    with pytest.raises(VmError, match="no saved state at"):
        run(scenario(), deadline=10)


def test_a_save_into_a_missing_directory_fails_with_qemus_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _qemu(LXD_5_19, tmp_path) as qemu:
            await save_state(qemu.qmp, tmp_path / "no-such-dir" / "state", timeout=30)

    with pytest.raises(SaveFailed) as caught:
        run(scenario())
    assert caught.value.migration_status == "failed"


def test_an_error_while_qemu_still_runs_is_no_refusal(tmp_path: Path) -> None:
    async def scenario() -> RestoreRefused | None:
        async with _qemu(LXD_5_19, tmp_path) as qemu:
            return await as_refusal(VmError("something else"), qemu, tmp_path / "state")

    assert run(scenario()) is None


def test_the_uris_quote_the_path_for_the_shell() -> None:
    path = Path("/tmp/a b/it's")
    assert outgoing_uri(path) == "exec:cat > '/tmp/a b/it'\"'\"'s'"
    assert incoming_uri(path) == "exec:cat '/tmp/a b/it'\"'\"'s'"
