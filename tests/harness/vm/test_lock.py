"""Tests for lxd_agent_harness.vm.lock: one harness VM at a time on this machine, and the lock
free again after a failed start (no guest: the VMs here never get to boot)."""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.vm import instance as vm
from lxd_agent_harness.vm import lock as vmlock
from lxd_agent_harness.vm.accel import Accel
from tests.helpers import unbooted_config


def test_a_second_vm_waits_for_the_lock_and_gives_up_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(vmlock, "VM_LOCK_TIMEOUT", 0.6)
    lock_path = vmlock.vm_lock_path()
    lock_path.parent.mkdir(parents=True)
    config, _ = unbooted_config(tmp_path, Accel.TCG)
    messages: list[str] = []
    with lock_path.open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)

        async def second() -> None:
            async with vm.Vm(config, progress=messages.append):
                raise AssertionError("started while another VM held the lock")

        with pytest.raises(VmError, match="another harness VM"):
            asyncio.run(second())
    assert any("waiting for another harness VM" in m for m in messages)
    assert not list(tmp_path.glob("lxd-agent-vm-*"))


def test_the_vm_lock_is_free_again_after_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config, _ = unbooted_config(tmp_path, Accel.TCG)  # its image does not exist: the start fails

    async def start() -> None:
        async with vm.Vm(config):
            raise AssertionError("started without an image")

    with pytest.raises(VmError, match="overlay"):
        asyncio.run(start())
    with vmlock.vm_lock_path().open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
