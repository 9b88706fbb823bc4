"""How long a guest's vCPUs waited for a host CPU (`vm/cpuwait.py`)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from lxd_agent_harness.vm.cpuwait import CpuWait, thread_wait, vcpu_threads


def schedstat(proc: Path, pid: int, tid: int, wait_ns: int) -> None:
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True, exist_ok=True)
    (task / "schedstat").write_text(f"123456 {wait_ns} 7\n")


def test_a_threads_wait_is_the_second_field_of_its_schedstat(tmp_path: Path) -> None:
    schedstat(tmp_path, 10, 11, 2_500_000_000)
    assert thread_wait(10, 11, tmp_path) == 2.5
    assert thread_wait(10, 12, tmp_path) is None  # gone: unreadable, not an error
    (tmp_path / "10" / "task" / "11" / "schedstat").write_text("garbage\n")
    assert thread_wait(10, 11, tmp_path) is None


def test_this_machines_kernel_counts_a_threads_wait() -> None:
    """The kernel the harness runs on has the counts (schedstats) the bounds rely on."""
    wait = thread_wait(os.getpid(), threading.get_native_id())
    assert wait is not None and wait >= 0.0


def test_the_wait_since_a_moment_counts_from_the_first_sample_at_or_after_it(
    tmp_path: Path,
) -> None:
    clock = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    waits = iter([0, 1_000_000_000, 3_000_000_000, 3_000_000_000, 7_000_000_000, 7_000_000_000])
    wait = CpuWait(10, [11], lambda: next(clock), tmp_path)

    def sample() -> float:
        schedstat(tmp_path, 10, 11, next(waits))
        return wait.now()

    assert [sample(), sample(), sample()] == [0.0, 1.0, 3.0]  # at 1, 2 and 3 s
    schedstat(tmp_path, 10, 11, next(waits))
    # Asked at 4 s about 1.5 s on: the sample at 2 s (1 s waited) is the first after 1.5 s.
    assert wait.since(1.5) == 2.0
    schedstat(tmp_path, 10, 11, next(waits))
    assert wait.since(0.0) == 7.0  # at 5 s, from the first sample
    schedstat(tmp_path, 10, 11, next(waits))
    assert wait.since(6.0) == 0.0  # a window that begins now has waited nothing


def test_the_wait_of_several_vcpus_is_their_mean_and_an_unreadable_one_is_left_out(
    tmp_path: Path,
) -> None:
    schedstat(tmp_path, 10, 11, 1_000_000_000)
    schedstat(tmp_path, 10, 12, 3_000_000_000)
    assert CpuWait(10, [11, 12], lambda: 0.0, tmp_path).now() == 2.0
    assert CpuWait(10, [11, 13], lambda: 0.0, tmp_path).now() == 1.0
    assert CpuWait(10, [], lambda: 0.0, tmp_path).now() == 0.0  # nothing to read: no wait


def test_the_vcpu_threads_are_the_distinct_thread_ids_qmp_names() -> None:
    cpus = [
        {"cpu-index": 0, "thread-id": 501, "target": "x86_64"},
        {"cpu-index": 1, "thread-id": 501},  # single-threaded TCG: one thread for both
        {"cpu-index": 2, "thread-id": 502},
        {"cpu-index": 3},
    ]
    assert vcpu_threads(cpus) == [501, 502]
    assert vcpu_threads({"error": "x"}) == []
