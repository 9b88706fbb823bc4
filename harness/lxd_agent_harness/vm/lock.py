"""One harness VM at a time on a machine: a lock file in the cache directory, waited for (bounded).

A 2-core host runs one guest at a time; a second harness VM (a test run, a demo) waits for the
first. Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import time
from pathlib import Path

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.base.progress import Progress

# Another harness VM (a test run, a demo) may hold the machine's cores for a few minutes.
VM_LOCK_TIMEOUT = 900.0


def vm_lock_path() -> Path:
    """Held by every running harness VM, so that VMs on this machine run one at a time."""
    return cache_root() / "vm.lock"


async def take_vm_lock(stack: contextlib.AsyncExitStack, progress: Progress) -> None:
    """Wait (bounded) until no other harness VM runs here; `stack`'s close releases the lock."""
    path = vm_lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = stack.enter_context(path.open("a"))  # closing it releases the lock
    deadline = time.monotonic() + VM_LOCK_TIMEOUT
    waiting = False
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise VmError(
                f"waited {VM_LOCK_TIMEOUT:g} s for another harness VM to finish (lock "
                f"{path} is held); stop it (see `pgrep -af lxd-agent-harness-`) and retry"
            )
        if not waiting:
            progress(f"waiting for another harness VM to finish (lock {path})")
            waiting = True
        await asyncio.sleep(0.5)
