"""How long a guest's vCPUs waited for a host CPU: what a busy host takes from a guest's bounds.

A bound on what a guest does (a start job holding the boot, the agent's grace after the login,
the power-off) is read on the host's clock, and a guest's clock runs with it. On a host whose
cores are all taken (a CI runner's other jobs, image builds beside the guests), a guest's vCPU
thread is ready to run but waits in the host's run queue, and a boot that is only starved looks
held: seen here, a start job for `dev-ttyS0.device` "held" a cloud image's boot for 25 s while
five processes wanted the two cores. The kernel counts that wait per thread
(`/proc/PID/task/TID/schedstat`, its second field, in ns); QMP's `query-cpus-fast` names the
vCPU threads. A bound is then counted in the time the guest could run: wall time less that
wait. A held guest idles, so its wait stays near zero and its bound is the bound.

Where the counts cannot be read (a kernel without schedstats, a thread gone), the wait is
taken as zero: the bound is then the plain wall-clock bound it always was.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

PROC = Path("/proc")


def thread_wait(pid: int, tid: int, proc: Path = PROC) -> float | None:
    """Seconds thread `tid` of process `pid` has waited in a run queue; None if unreadable."""
    try:
        fields = (proc / str(pid) / "task" / str(tid) / "schedstat").read_text().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class CpuWait:
    """The run-queue wait of one guest's vCPU threads, sampled on the guest's timeline.

    `clock` gives the VM's seconds (since QEMU started); every `now()` call is also a sample,
    so `since(t)` can say how much of the wait came after a moment `t` that was sampled."""

    pid: int
    threads: Sequence[int]
    clock: Callable[[], float]
    proc: Path = PROC
    _times: list[float] = field(default_factory=list)
    _waits: list[float] = field(default_factory=list)

    def now(self) -> float:
        """Seconds the vCPUs waited so far (the mean over their threads), and a sample of it."""
        read = [thread_wait(self.pid, tid, self.proc) for tid in self.threads]
        waits = [w for w in read if w is not None]
        wait = sum(waits) / len(waits) if waits else (self._waits[-1] if self._waits else 0.0)
        self._times.append(self.clock())
        self._waits.append(wait)
        return wait

    def since(self, moment: float) -> float:
        """The wait from `moment` (VM seconds) until now. The count at `moment` is the first
        sample taken at it or after, so the wait is never made larger than it was (a bound is
        never stretched by more than the host took)."""
        current = self.now()
        index = bisect.bisect_left(self._times, moment)
        return max(0.0, current - self._waits[index])


def vcpu_threads(cpus: object) -> list[int]:
    """The distinct vCPU thread ids in QMP's `query-cpus-fast` answer (one thread for all of
    them under single-threaded TCG)."""
    threads: list[int] = []
    if isinstance(cpus, list):
        for cpu in cpus:
            tid = cpu.get("thread-id") if isinstance(cpu, dict) else None
            if isinstance(tid, int) and tid not in threads:
                threads.append(tid)
    return threads
