"""Harness VMs share this machine's cores: a VM holds one slot per vCPU, waited for (bounded).

The machine has one slot per core (`os.cpu_count()`), each an flock on a file in the cache
directory. A VM with N vCPUs holds N slots while it runs, so a 2-core host runs one 2-vCPU guest,
or two 1-vCPU guests side by side (two 1-vCPU guests booted together took 24 s here against 35 s
for two 2-vCPU guests one after the other). Slots are taken in turn: whoever holds the gate (an
flock on `vm.lock`) is next, and takes its slots as running VMs free them while the others wait
for the gate, so a 2-vCPU guest is not starved by a stream of 1-vCPU ones and no two waiters can
hold part of what each needs. A guest whose boot is done and that only waits from then on (out a
bound or a grace period) gives its slots up (`Cores.release`): the harness's measured waits then
cost no core. Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.base.progress import Progress

# Other harness VMs (a test run, a demo) may hold the machine's cores for a few minutes.
VM_LOCK_TIMEOUT = 900.0
LOCK_POLL = 0.2


def vm_lock_path() -> Path:
    """The gate: held by the next VM to take its slots, for as long as it waits for them."""
    return cache_root() / "vm.lock"


def vm_slot_paths() -> list[Path]:
    """One slot per core of this machine; a running VM holds as many as it has vCPUs."""
    return [cache_root() / f"vm-slot-{n}.lock" for n in range(os.cpu_count() or 1)]


def _try_flock(path: Path) -> IO[str] | None:
    """`path` opened and locked, or None if another process holds it."""
    held = path.open("a")
    try:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        return None
    return held


async def _wait(deadline: float, path: Path, progress: Progress, told: list[bool]) -> None:
    if time.monotonic() > deadline:
        raise VmError(
            f"waited {VM_LOCK_TIMEOUT:g} s for another harness VM to free this machine's cores "
            f"(lock {path} is held); stop them (see `pgrep -af lxd-agent-harness-`) and retry"
        )
    if not told:
        progress(f"waiting for another harness VM to finish (lock {path})")
        told.append(True)
    await asyncio.sleep(LOCK_POLL)


async def _take_slots(wanted: int, progress: Progress) -> list[IO[str]]:
    """`wanted` slots, taken in turn through the gate (bounded wait)."""
    gate_path = vm_lock_path()
    gate_path.parent.mkdir(parents=True, exist_ok=True)
    slots = vm_slot_paths()
    deadline = time.monotonic() + VM_LOCK_TIMEOUT
    told: list[bool] = []
    while (gate := _try_flock(gate_path)) is None:
        await _wait(deadline, gate_path, progress, told)
    with gate:  # closing it lets the next waiter in
        held: list[IO[str]] = []
        try:
            while len(held) < wanted:
                taken = {Path(f.name) for f in held}
                for path in (p for p in slots if p not in taken):
                    if len(held) < wanted and (slot := _try_flock(path)) is not None:
                        held.append(slot)
                if len(held) < wanted:
                    await _wait(deadline, gate_path, progress, told)
        except BaseException:
            for slot in held:
                slot.close()
            raise
    return held


class Cores:
    """The slots a running VM holds. A guest whose boot is done and that only waits from then
    on (out a bound, the agent's grace, a held power-off) needs no core: `release()` gives its
    slots to the next VM for the rest of its run."""

    def __init__(self, wanted: int, progress: Progress) -> None:
        self.wanted = wanted
        self.progress = progress
        self._held: list[IO[str]] = []

    @property
    def held(self) -> int:
        return len(self._held)

    async def take(self) -> None:
        if not self._held:
            self._held = await _take_slots(self.wanted, self.progress)

    def release(self) -> None:
        held, self._held = self._held, []
        for slot in held:
            slot.close()  # closing a slot's file frees it


async def take_vm_lock(
    stack: contextlib.AsyncExitStack, progress: Progress, cpus: int = 2
) -> Cores:
    """Wait (bounded) for `cpus` of this machine's slots (all of them at most); `stack`'s close
    frees them."""
    cores = Cores(max(1, min(cpus, len(vm_slot_paths()))), progress)
    await cores.take()
    stack.callback(cores.release)
    return cores
