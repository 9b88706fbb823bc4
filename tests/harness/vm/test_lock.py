"""Tests for lxd_agent_harness.vm.lock: harness VMs share the machine's cores (a slot per vCPU,
taken in turn), and the lock is free again after a failed start (no guest: the VMs here never get
to boot)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.vm import instance as vm
from lxd_agent_harness.vm import lock as vmlock
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DEFAULT_CPUS, VCPUS_ENV, default_cpus
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


def test_one_vcpu_guests_share_the_cores_and_a_two_vcpu_guest_waits_for_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(vmlock, "LOCK_POLL", 0.02)

    async def scenario() -> list[str]:
        order: list[str] = []
        first, second = contextlib.AsyncExitStack(), contextlib.AsyncExitStack()
        await vmlock.take_vm_lock(first, order.append, cpus=1)
        await vmlock.take_vm_lock(second, order.append, cpus=1)  # the other core: no wait
        assert order == []

        async def big() -> None:
            async with contextlib.AsyncExitStack() as stack:
                await vmlock.take_vm_lock(stack, order.append, cpus=2)
                order.append("two-vcpu guest runs")

        waiting = asyncio.ensure_future(big())
        await asyncio.sleep(0.2)
        await first.aclose()
        await asyncio.sleep(0.2)
        order.append("one core free")
        await second.aclose()
        await waiting
        return order

    order = asyncio.run(scenario())
    assert order[0].startswith("waiting for another harness VM")
    assert order[1:] == ["one core free", "two-vcpu guest runs"]


def test_a_guest_that_only_waits_gives_its_core_to_the_next_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two 1-vCPU guests hold both cores and a third VM waits; once one guest's boot is done
    (from then on it only waits out its bounds) the third gets its core while both still run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(vmlock, "LOCK_POLL", 0.02)

    async def scenario() -> list[str]:
        order: list[str] = []
        first, second, third = (contextlib.AsyncExitStack() for _ in range(3))
        booted = await vmlock.take_vm_lock(first, order.append, cpus=1)
        await vmlock.take_vm_lock(second, order.append, cpus=1)

        async def next_vm() -> None:
            await vmlock.take_vm_lock(third, order.append, cpus=1)
            order.append("third VM runs")

        waiting = asyncio.ensure_future(next_vm())
        await asyncio.sleep(0.3)
        order.append("the first guest's boot is done")
        booted.release()
        await waiting
        assert booted.held == 0
        for stack in (first, second, third):
            await stack.aclose()
        return order

    order = asyncio.run(scenario())
    assert order[0].startswith("waiting for another harness VM")
    assert order[1:] == ["the first guest's boot is done", "third VM runs"]
    for slot in vmlock.vm_slot_paths():  # all free again, the released one closed once
        with slot.open("a") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cores_released_for_good_are_not_taken_back_and_a_second_release_is_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            cores = await vmlock.take_vm_lock(stack, print, cpus=2)
            assert cores.held == 2
            cores.release()
            cores.release()
            assert cores.held == 0
            async with contextlib.AsyncExitStack() as other:  # both free at once
                assert (await vmlock.take_vm_lock(other, print, cpus=2)).held == 2

    asyncio.run(scenario())


def test_vcpus_come_from_the_environment_else_two_and_nonsense_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(VCPUS_ENV, raising=False)
    assert default_cpus() == DEFAULT_CPUS == 2
    monkeypatch.setenv(VCPUS_ENV, "1")
    assert default_cpus() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(VCPUS_ENV, bad)
        with pytest.raises(VmError, match=VCPUS_ENV):
            default_cpus()
