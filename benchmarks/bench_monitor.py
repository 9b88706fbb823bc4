"""Measure the ring-buffer monitor: interpretation speed, and how soon it reads after an event.

Run by hand (`.venv/bin/python benchmarks/bench_monitor.py`); prints figures, asserts nothing,
and is outside `tests/` so pytest never collects it. It starts one cheap QEMU
(`-machine none -S`, no guest) and uses `stop`/`cont` as the QMP events that stand in for a
guest's `VSERPORT_CHANGE`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import time

from lxd_agent.protocol import PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.lxd.layouts import Ring
from lxd_agent_harness.lxd.monitor import EntryKind, RingbufMonitor
from lxd_agent_harness.lxd.reading_rules import interpret_ring_read
from lxd_agent_harness.qemu.process import QemuProcess

SAMPLES = [
    b"",
    b"STARTED\n",
    b"STOPPED\n",
    b"CONNECTED\n",
    b"STARTED\nSTOPPED\n",
    b"PPED\nCONNECTED\n",
    b"\xff\xfe\x00\x01\nSTOPPED\n",
    b"xxxxxxxxSTARTED\n",
]


def bench_interpretation(seconds: float) -> None:
    count = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for sample in SAMPLES:
            interpret_ring_read(sample)
        count += len(SAMPLES)
    elapsed = time.perf_counter() - start
    print(f"interpretation (16-byte reads): {count / elapsed / 1e6:.2f} M reads/s")
    big = bytes(range(256)) * 64 + b"\nSTARTED\n"
    start = time.perf_counter()
    for _ in range(1000):
        interpret_ring_read(big)
    per = (time.perf_counter() - start) / 1000
    print(f"interpretation (16 KiB junk read): {per * 1e6:.1f} us per read")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench_latency(rounds: int) -> None:
    args = ["-machine", "none", "-nodefaults", "-display", "none", "-S"]
    args += ["-chardev", "ringbuf,id=ring,size=16"]
    async with QemuProcess(args, name="bench") as qemu, RingbufMonitor(
        qemu.qmp, [Ring(PORT_NAME, "ring")], poll_interval=600.0, max_timeline=10 * rounds
    ) as monitor:
        event_to_state: list[float] = []
        command_to_state: list[float] = []
        running = False
        for number in range(rounds):
            status = STARTED if number % 2 == 0 else STOPPED
            data = base64.b64encode(f"{status}\n".encode()).decode()
            await qemu.qmp.execute(
                "ringbuf-write", {"device": "ring", "data": data, "format": "base64"}
            )
            sent = time.monotonic() - monitor.timeline.t0
            await qemu.qmp.execute("stop" if running else "cont")
            running = not running
            state = await monitor.wait_for(status, port=PORT_NAME, timeout=10.0)
            events = [
                e
                for e in monitor.timeline.entries
                if e.kind is EntryKind.EVENT and sent <= e.seconds <= state.seconds
            ]
            command_to_state.append(state.seconds - sent)
            if events:
                event_to_state.append(state.seconds - events[0].seconds)
        for label, values in (
            ("QMP event received -> state changed", event_to_state),
            ("command sent -> state changed", command_to_state),
        ):
            print(
                f"{label}: median {statistics.median(values) * 1e3:.2f} ms, "
                f"p95 {_percentile(values, 0.95) * 1e3:.2f} ms, "
                f"max {max(values) * 1e3:.2f} ms ({len(values)} rounds)"
            )

        start = time.monotonic()
        flood = 2000
        for _ in range(flood // 2):
            await qemu.qmp.execute("stop" if running else "cont")
            await qemu.qmp.execute("cont" if running else "stop")
        await monitor.read_rings()
        elapsed = time.monotonic() - start
        print(
            f"event flood: {flood} events in {elapsed:.2f} s ({flood / elapsed:.0f}/s), "
            f"{monitor.reads} ring reads in all, timeline kept {len(monitor.timeline.entries)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="interpretation run time")
    parser.add_argument("--rounds", type=int, default=200, help="event->read rounds")
    options = parser.parse_args()
    bench_interpretation(options.seconds)
    asyncio.run(bench_latency(options.rounds))


if __name__ == "__main__":
    main()
