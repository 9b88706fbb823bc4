"""Save a guest's state to a file and load it into a new QEMU: QEMU's migration through `exec:`.

A stateful snapshot is taken the way LXD takes one: QMP `stop`, then `migrate` to a command that
writes the stream to a file. A restore is a new QEMU started with `-incoming` reading that file
back (`incoming_uri`, put on the command line by `lxd_agent_harness.vm.config`), then `cont`. The
stream holds the guest's memory and devices, not its disk: the caller keeps the disk the state
belongs to. Ring-buffer contents are not in it either, so after a restore the host needs a
fresh line from the agent.

QEMU checks that the devices it loads into are the ones it saved (the count of virtio-serial
ports, not their names): a layout with one port more refuses the state, and QEMU exits with
its reasons on its output. `wait_incoming` turns that into a `RestoreRefused` carrying them.

Host side only. It drives QEMU over QMP and waits, bounded; it never starts or stops QEMU
(`lxd_agent_harness.qemu.process` does) and never builds its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from qemu.qmp import QMPClient, QMPError

from lxd_agent_harness.base.aio import bounded
from lxd_agent_harness.base.errors import (
    HarnessError,
    QemuError,
    RestoreRefused,
    SaveFailed,
    VmError,
)
from lxd_agent_harness.qemu.process import QemuProcess

SAVE_TIMEOUT = 120.0
RESTORE_TIMEOUT = 120.0
COMMAND_TIMEOUT = 10.0
POLL_SECONDS = 0.1
# QEMU's last lines a refusal carries: its three lines of why, and what came before.
REFUSAL_OUTPUT_LINES = 10
# The guest is stopped and the stream goes to a local file: no reason to throttle it
# (QEMU's default limit would make a 1 GiB guest's save take seconds longer).
SAVE_BANDWIDTH = 8 << 30


def outgoing_uri(state_file: Path) -> str:
    """`migrate`'s target: the stream into `state_file`, through a shell (hence the quoting)."""
    return f"exec:cat > {shlex.quote(str(state_file))}"


def incoming_uri(state_file: Path) -> str:
    """`-incoming`'s source: the stream read back from `state_file`."""
    return f"exec:cat {shlex.quote(str(state_file))}"


SPECIFICATION_REFUSAL = (
    re.compile(r"Failed to load virtio-console:virtio$"),
    re.compile(r"error while loading state for instance 0x0 of device '[^']*virtio-console'$"),
    re.compile(r"load of migration failed: Invalid argument$"),
)
"""QEMU's lines when the saved virtio-serial bus has fewer ports than the one it loads into,
in order, as the specification's "Limitations" quotes them (the PCI address varies)."""


def is_specification_refusal(qemu_output: Sequence[str]) -> bool:
    """Whether QEMU's output holds the specification's three lines, in order."""
    awaited = list(SPECIFICATION_REFUSAL)
    for line in qemu_output:
        if awaited and awaited[0].search(line):
            awaited.pop(0)
    return not awaited


@dataclass(frozen=True)
class SavedState:
    path: Path
    size: int
    """Bytes in the file."""
    seconds: float
    """From `stop` to the migration's `completed`."""


async def execute(qmp: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command, bounded; a `VmError` saying which command failed and how."""
    try:
        return await bounded(qmp.execute(command, arguments), COMMAND_TIMEOUT)
    except asyncio.TimeoutError:
        raise VmError(
            f"QEMU did not answer {command} within {COMMAND_TIMEOUT:g} s; is it wedged?"
        ) from None
    except (QMPError, OSError, EOFError) as e:
        raise VmError(f"QMP command {command} failed ({type(e).__name__}: {e})") from None


async def save_state(qmp: QMPClient, state_file: Path, timeout: float = SAVE_TIMEOUT) -> SavedState:
    """Stop the guest and write its state to `state_file`; QEMU stays paused (`postmigrate`).

    A `SaveFailed` (with QEMU's own `error-desc`) if the migration fails or is not done in
    `timeout` s.
    """
    started = time.monotonic()
    await execute(qmp, "stop")
    await execute(qmp, "migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
    await execute(qmp, "migrate", {"uri": outgoing_uri(state_file)})
    while True:
        info = await execute(qmp, "query-migrate")
        status = str(info.get("status", "none"))
        if status == "completed":
            return SavedState(state_file, state_file.stat().st_size, time.monotonic() - started)
        if status in ("failed", "cancelled"):
            error = str(info.get("error-desc", ""))
            raise SaveFailed(
                f"QEMU could not save the guest's state to {state_file}: migration {status}"
                f"{f' ({error})' if error else ''}; is there room on its file system?",
                migration_status=status,
                qemu_error=error,
            )
        if time.monotonic() - started > timeout:
            raise SaveFailed(
                f"saving the guest's state to {state_file} was still {status!r} after "
                f"{timeout:g} s; is the machine overloaded?",
                migration_status=status,
            )
        await asyncio.sleep(POLL_SECONDS)


async def wait_incoming(
    qemu: QemuProcess, state_file: Path, timeout: float = RESTORE_TIMEOUT
) -> None:
    """Wait until QEMU (started with `-incoming`) has loaded `state_file`.

    A `RestoreRefused` with QEMU's lines when it exits or fails the load; a `VmError` when the
    load is not done in `timeout` s.
    """
    if not state_file.is_file():
        # QEMU would wait for the stream without end (its `cat` failed, yet no error shows).
        raise VmError(f"no saved state at {state_file}; save one first (QMP migrate)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await execute(qemu.qmp, "query-migrate")
        except VmError as e:
            raise (await as_refusal(e, qemu, state_file) or e) from None
        status = str(info.get("status", "none"))
        if status == "completed":
            return
        if status == "failed":
            raise refused(state_file, None, qemu.output_tail(REFUSAL_OUTPUT_LINES))
        if time.monotonic() > deadline:
            raise VmError(
                f"QEMU was still loading the saved state {state_file} ({status!r}) after "
                f"{timeout:g} s; is the machine overloaded?"
            )
        await asyncio.sleep(POLL_SECONDS)


def refused(state_file: Path, exit_status: int | None, output: list[str]) -> RestoreRefused:
    how = f"exited with status {exit_status}" if exit_status is not None else "failed the load"
    return RestoreRefused(
        f"QEMU {how} while loading the saved state {state_file}: it refuses this state "
        "with these devices (its output says which); restore with the layout it was saved with",
        state_file=str(state_file),
        exit_status=exit_status,
        qemu_output=output,
    )


async def as_refusal(
    error: HarnessError, qemu: QemuProcess | None, state_file: Path
) -> RestoreRefused | None:
    """`error`, met while starting a restore, as a `RestoreRefused` if QEMU exited meanwhile.

    QEMU exits as soon as the load fails, which may be before its QMP socket is ready
    (`QemuError`) or during any command the harness sends it: either way the refusal is
    QEMU's exit. None when QEMU still runs: `error` is something else.
    """
    if isinstance(error, RestoreRefused):
        return error
    if isinstance(error, QemuError) and error.exit_status is not None:
        return refused(state_file, error.exit_status, error.output)
    if qemu is None:
        return None
    with contextlib.suppress(QemuError):  # a dropped connection comes just before the exit
        await qemu.wait(timeout=1.0)
    if qemu.returncode is None:
        return None
    return refused(state_file, qemu.returncode, qemu.output_tail(REFUSAL_OUTPUT_LINES))
