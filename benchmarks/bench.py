"""The agent's costs next to their floors, measured in one run and printed as one table.

Natively: the CPU time of one refresh on Incus's port (gather, write) with Incus 7.3's state
line and without it; exec -> READY=1 and peak RSS of the unit's own command line (`lxd-agent run
--if-no-port=skip`, started as the package starts it: `/usr/bin/python3 -IS`) against a bare
`/usr/bin/python3 -I -S -c pass`. In one real guest (TCG, LXD 5.20's layout, the .deb from
out/ or $LXD_AGENT_DEB): the unit's start -> active and CPU to READY by systemd's own
accounting against a bare interpreter run the same way (`systemd-run`), whether the unit is on
multi-user.target's critical chain, the idle agent's wake-ups and CPU against its 12 writes a
minute, guest write -> host state change against QEMU's 1 s VSERPORT_CHANGE limit, and QEMU
start -> STARTED against QEMU start -> login prompt. Then warm starts (`vm.warm`): a guest
restored from a saved one to STARTED readable, against a cold boot to STARTED.

Figures, not verdicts: nothing is asserted (these machines are shared and noisy).
Run: `make bench` (root: the native part mounts a private /dev for the agent's port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import pty
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Callable, List, Tuple

from lxd_agent.guest.ports import write_line
from lxd_agent.guest.state import guest_state, state_line
from lxd_agent.protocol import INCUS_PORT_NAME, LINES_PER_WRITE, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.image.rootfs import ImageSpec, build_image
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.monitor import EntryKind
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, VmConfig
from lxd_agent_harness.vm.instance import Vm
from lxd_agent_harness.vm.units import parse_properties
from lxd_agent_harness.vm.warm import How, started_vm
from tests.repo import built_deb

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"
BARE = [PYTHON, "-I", "-S", "-c", "pass"]
# The same bare start, printing its own memory figures at the end (for its peak RSS).
BARE_STATUS = [PYTHON, "-I", "-S", "-c", "print(open('/proc/self/status').read())"]
VSERPORT_LIMIT = 1.0  # QEMU's rate limit on VSERPORT_CHANGE, per port (facts §1)
REFRESH_WRITES_PER_MINUTE = 12  # STARTED every 5 s

Row = Tuple[str, str, str, str]  # what, figure, anchor, ratio
Rows = List[Row]


# -- natively -----------------------------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def _private_dev(port_target: str | None) -> Callable[[], None]:
    """A pre-exec hook: a private mount namespace whose /dev holds only our port's link.

    The agent then runs with its real default paths, as the unit runs it. Used for the bare
    interpreter too, so that both pay the same few syscalls.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) (run as root)")
        libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)
        if libc.mount(b"none", b"/dev", b"tmpfs", 0, None) != 0:
            raise OSError(ctypes.get_errno(), "mount tmpfs on /dev")
        if port_target is not None:
            os.mkdir("/dev/virtio-ports")
            os.symlink(port_target, f"/dev/virtio-ports/{PORT_NAME}")

    return hook


def agent_command(tree: Path) -> list[str]:
    """The unit's command line for ``tree``'s agent, started the way its package starts it.

    packaging/lxd-agent (``python3 -IS``) with ``tree`` first on sys.path; a tree from before
    it (0.2.0) shipped the generated console script: site, ``import re``, then the entry point.
    The arguments are the ExecStart= of the tree's own unit.
    """
    unit = (tree / "systemd" / "lxd-agent.service").read_text()
    start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    if start is None:
        raise RuntimeError(f"no ExecStart= in {tree}/systemd/lxd-agent.service")
    args = start.group(1).split()[1:]
    launcher = tree / "packaging" / "lxd-agent"
    first = f"import sys\nsys.path.insert(0, {str(tree)!r})\n"
    if launcher.exists():
        shebang, _, code = launcher.read_text().partition("\n")
        flags = shebang.split()[1:]
        return [PYTHON, *flags, "-c", code.replace("import sys\n", first, 1), *args]
    code = first + "import re\nfrom lxd_agent.guest.cli import main\nsys.exit(main())\n"
    return [PYTHON, "-c", code, *args]


def _hwm_kib(status: str) -> int:
    """VmHWM (peak RSS of this process image, from its exec on) from /proc/PID/status.

    Not getrusage's ru_maxrss: that also counts the forked parent's memory before the exec.
    """
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    if match is None:
        raise RuntimeError(f"no VmHWM in {status[:200]!r}")
    return int(match.group(1))


def _agent_to_ready(command: list[str], port_target: str, notify_path: Path) -> tuple[float, int]:
    """Seconds from exec to READY=1, and the agent's peak RSS in KiB once it is up."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    env = {"NOTIFY_SOCKET": str(notify_path), "PATH": "/usr/bin:/bin"}
    hook = _private_dev(port_target)
    began = time.perf_counter()
    proc = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.DEVNULL,
        preexec_fn=hook,
    )
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.perf_counter() - began
        time.sleep(0.05)  # let it finish logging "reporting to"
        peak = _hwm_kib(Path(f"/proc/{proc.pid}/status").read_text())
        proc.terminate()
        proc.wait(timeout=10)
        return ready, peak
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        sock.close()
        notify_path.unlink()


def _bare() -> tuple[float, int]:
    hook = _private_dev(None)
    began = time.perf_counter()
    subprocess.run(BARE, preexec_fn=hook, check=True)
    took = time.perf_counter() - began
    status = subprocess.run(BARE_STATUS, capture_output=True, text=True, check=True).stdout
    return took, _hwm_kib(status)


def native_rows(runs: int, tree: Path) -> Rows:
    master, slave = pty.openpty()
    tty.setraw(slave)
    command = agent_command(tree)
    agent: list[tuple[float, int]] = []
    bare: list[tuple[float, int]] = []
    try:
        with tempfile.TemporaryDirectory() as top:
            # Interleaved, so that a noisy moment hits both.
            port = f"/proc/{os.getpid()}/fd/{slave}"
            for _ in range(runs):
                agent.append(_agent_to_ready(command, port, Path(top, "notify")))
                bare.append(_bare())
    finally:
        os.close(master)
        os.close(slave)
    agent_s = statistics.median(a for a, _ in agent)
    bare_s = statistics.median(b for b, _ in bare)
    agent_kib = max(m for _, m in agent)
    bare_kib = max(m for _, m in bare)
    return [
        (
            f"native: exec -> READY=1 (median of {runs})",
            f"{agent_s * 1e3:.1f} ms",
            f"bare start {bare_s * 1e3:.1f} ms",
            f"{agent_s / bare_s:.2f}x",
        ),
        (
            "native: peak RSS",
            f"{agent_kib / 1024:.1f} MiB",
            f"bare {bare_kib / 1024:.1f} MiB",
            f"+{(agent_kib - bare_kib) / 1024:.1f} MiB",
        ),
    ]


def refresh_rows(count: int) -> Rows:
    """CPU time (this process's, user + system) of one refresh to a pty, median of `count`,
    with the state line gathered and written and without it; interleaved."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    device = os.ttyname(slave)
    copies = LINES_PER_WRITE[INCUS_PORT_NAME]
    sizes: list[int] = []

    def plain() -> None:
        write_line(device, STARTED, 2.0, copies)

    def with_state() -> None:
        line = state_line(guest_state())
        sizes.append(len(line))
        write_line(device, STARTED, 2.0, copies, line)

    timings: dict[Callable[[], None], list[float]] = {plain: [], with_state: []}
    try:
        with_state()  # the imports (json, socket) once, as the agent's first full state does
        for _ in range(count):
            for refresh, times in timings.items():
                began = time.process_time()
                refresh()
                times.append(time.process_time() - began)
                with contextlib.suppress(BlockingIOError):
                    while os.read(master, 65536):
                        pass
    finally:
        os.close(master)
        os.close(slave)
    plain_s = statistics.median(timings[plain])
    state_s = statistics.median(timings[with_state])
    return [
        (
            f"native: one refresh with the state line, CPU (median of {count})",
            f"{state_s * 1e3:.2f} ms ({statistics.median(sizes):.0f} B of JSON)",
            f"without {plain_s * 1e3:.3f} ms",
            f"{state_s / plain_s:.1f}x",
        ),
        (
            "native: the state line's CPU a minute (12 refreshes)",
            f"{REFRESH_WRITES_PER_MINUTE * state_s * 1e3:.1f} ms",
            f"without {REFRESH_WRITES_PER_MINUTE * plain_s * 1e3:.2f} ms",
            f"{REFRESH_WRITES_PER_MINUTE * state_s / 60 * 100:.3f}% of a core",
        ),
    ]


# -- in a guest ---------------------------------------------------------------------------------


def _ms(text: str) -> float:
    """systemd's "1.234s" / "56ms" / "789us" as milliseconds."""
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(min|ms|us|s)", text):
        total += float(number) * {"min": 60e3, "s": 1e3, "ms": 1.0, "us": 1e-3}[unit]
    return total


async def _unit_start(vm: Vm) -> tuple[float, float]:
    """A warm `systemctl start` (returns at READY=1): start -> active and CPU, in ms."""
    await vm.run("systemctl stop lxd-agent")
    await vm.run("systemctl start lxd-agent")
    show = await vm.run(
        "systemctl show lxd-agent -p InactiveExitTimestampMonotonic,"
        "ActiveEnterTimestampMonotonic,CPUUsageNSec"
    )
    p = parse_properties(show.output)
    return _start_to_active(p), int(p["CPUUsageNSec"]) / 1e6


def _start_to_active(p: dict[str, str]) -> float:
    """Milliseconds from leaving inactive to active (READY=1), from the unit's timestamps."""
    entered = int(p["ActiveEnterTimestampMonotonic"])
    return (entered - int(p["InactiveExitTimestampMonotonic"])) / 1e3


# The unit's keys that are about how it runs, not how it is sandboxed.
_NOT_SANDBOX = {"Type", "NotifyAccess", "ExecStart", "ExecStopPost", "Restart", "RestartSec"}
_NOT_SANDBOX |= {"TimeoutStartSec", "TimeoutStopSec", "WatchdogSec"}


def sandbox_properties(unit_text: str) -> list[str]:
    """The unit's sandboxing as `systemd-run -p` arguments, so the anchor pays for it too."""
    service = unit_text.split("[Service]", 1)[1]
    properties: list[str] = []
    for line in (raw.strip() for raw in service.splitlines()):
        key, _, value = line.partition("=")
        if line.startswith(("#", "[")) or not _ or key in _NOT_SANDBOX:
            continue
        properties += ["-p", shlex.quote(f"{key}={value}")]
    return properties


async def _bare_unit(vm: Vm, properties: list[str]) -> tuple[float, float]:
    """A bare interpreter as a transient unit: its runtime and CPU, as systemd counts them."""
    command = ["systemd-run", "--wait", "-p", "Type=exec", *properties, *BARE]
    result = await vm.run(" ".join(command) + " 2>&1")
    runtime = re.search(r"Service runtime: (\S+)", result.output)
    cpu = re.search(r"CPU time consumed: (\S+)", result.output)
    if runtime is None or cpu is None:
        raise RuntimeError(f"systemd-run said: {result.output!r}")
    return _ms(runtime.group(1)), _ms(cpu.group(1))


def _write_latencies(vm: Vm, since: float) -> list[float]:
    """For each state change after `since`: seconds since the `open=true` event before it."""
    latencies: list[float] = []
    opened: float | None = None
    for entry in vm.monitor.timeline.entries:
        if entry.seconds < since:
            continue
        if (
            entry.kind is EntryKind.EVENT
            and "VSERPORT_CHANGE" in entry.text
            and "open=true" in entry.text
        ):
            opened = entry.seconds
        elif entry.kind is EntryKind.STATE and entry.port == PORT_NAME and opened is not None:
            latencies.append(entry.seconds - opened)
            opened = None
    return latencies


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def guest_rows(idle_seconds: float, writes: int) -> Rows:
    image = build_image(ImageSpec(debs=(built_deb(),)), progress=lambda _: None)
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=Accel.TCG)
    rows: Rows = []
    async with Vm(config) as vm:
        started = await vm.wait_for_state(STARTED, PORT_NAME, timeout=180)
        await vm.login(timeout=120)
        login = vm.since_start(vm.console.milestones["login prompt"])
        assert login is not None
        await vm.run("systemctl is-system-running --wait", timeout=120)
        chain = await vm.run("systemd-analyze critical-chain --no-pager multi-user.target")
        target = re.search(r"multi-user\.target @(\S+)", chain.output)
        boot = parse_properties(
            (
                await vm.run(
                    "systemctl show lxd-agent -p InactiveExitTimestampMonotonic,"
                    "ActiveEnterTimestampMonotonic,CPUUsageNSec,MainPID"
                )
            ).output
        )
        boot_active = _start_to_active(boot)
        rows.append(
            (
                "guest: lxd-agent on multi-user.target's critical chain",
                "yes" if "lxd-agent" in chain.output else "no",
                f"multi-user.target @{target.group(1) if target else '?'}",
                "",
            )
        )
        unit = (await vm.run("cat /lib/systemd/system/lxd-agent.service")).output
        sandbox = sandbox_properties(unit)
        bare = [await _bare_unit(vm, sandbox) for _ in range(5)]
        bare_ms = statistics.median(b for b, _ in bare)
        bare_cpu = statistics.median(c for _, c in bare)
        plain = [await _bare_unit(vm, []) for _ in range(5)]
        rows.append(
            (
                "guest: bare interpreter unit, in the agent's sandbox",
                f"{bare_ms:.0f} ms, CPU {bare_cpu:.0f} ms",
                f"without it {statistics.median(b for b, _ in plain):.0f} ms, "
                f"CPU {statistics.median(c for _, c in plain):.0f} ms",
                "",
            )
        )
        pycache = await vm.run(
            "ls /usr/lib/python3/dist-packages/lxd_agent/guest/__pycache__ | wc -l"
        )
        rows.append(("guest: agent's byte-code files installed", pycache.output.strip(), "", ""))
        rows.append(
            (
                "guest: unit start -> active, at boot (cold)",
                f"{boot_active:.0f} ms",
                f"sandboxed bare unit {bare_ms:.0f} ms",
                f"{boot_active / bare_ms:.2f}x",
            )
        )
        warm = [await _unit_start(vm) for _ in range(3)]
        warm_ms = statistics.median(w for w, _ in warm)
        warm_cpu = statistics.median(c for _, c in warm)
        rows.append(
            (
                "guest: unit start -> active, systemctl start",
                f"{warm_ms:.0f} ms",
                f"sandboxed bare unit {bare_ms:.0f} ms",
                f"{warm_ms / bare_ms:.2f}x",
            )
        )
        rows.append(
            (
                "guest: unit CPU up to READY=1",
                f"{warm_cpu:.0f} ms",
                f"sandboxed bare unit {bare_cpu:.0f} ms",
                f"{warm_cpu / bare_cpu:.2f}x",
            )
        )

        # Idle: the agent as it runs for days. Context switches are its wake-ups.
        pid = (await vm.run("systemctl show -p MainPID --value lxd-agent")).output.strip()
        probe = (
            f"grep -h ctxt_switches /proc/{pid}/status | awk '{{s+=$2}} END {{print s}}';"
            " systemctl show -p CPUUsageNSec --value lxd-agent"
        )
        before = (await vm.run(probe)).output.split()
        await asyncio.sleep(idle_seconds)
        after = (await vm.run(probe)).output.split()
        minutes = idle_seconds / 60
        wakeups = (int(after[0]) - int(before[0])) / minutes
        cpu_per_hour = (int(after[1]) - int(before[1])) / 1e6 / minutes * 60
        rss = await vm.run(f"grep VmHWM /proc/{pid}/status")
        bare_rss = await vm.run(
            " ".join(BARE_STATUS[:-1]) + ' "' + BARE_STATUS[-1] + '" | grep VmHWM'
        )
        rows.append(
            (
                f"guest: idle wake-ups per minute ({idle_seconds:.0f} s)",
                f"{wakeups:.1f}",
                f"{REFRESH_WRITES_PER_MINUTE} refresh writes",
                f"{wakeups / REFRESH_WRITES_PER_MINUTE:.2f}x",
            )
        )
        rows.append(("guest: idle CPU per hour", f"{cpu_per_hour:.0f} ms", "", ""))
        rows.append(
            (
                "guest: agent peak RSS (VmHWM)",
                " ".join(rss.output.split()[1:]),
                "bare " + " ".join(bare_rss.output.split()[1:]),
                "",
            )
        )

        # Guest write -> host state change: the agent stopped, lines written by hand.
        await vm.run("systemctl stop lxd-agent")
        await vm.wait_for_state(STOPPED, PORT_NAME, timeout=30)
        since = vm.seconds()
        device = f"/dev/virtio-ports/{PORT_NAME}"
        loop = (
            f"for i in $(seq {writes // 2}); do printf 'STARTED\\n' > {device}; sleep 2.5;"
            f" printf 'STOPPED\\n' > {device}; sleep 2.5; done"
        )
        await vm.run(loop, timeout=writes * 3 + 60)
        await asyncio.sleep(2.0)
        latencies = _write_latencies(vm, since)
        rows.append(
            (
                f"guest write -> host state change, p50 / p99 ({len(latencies)} writes)",
                f"{_percentile(latencies, 0.5):.2f} / {_percentile(latencies, 0.99):.2f} s",
                f"VSERPORT_CHANGE limit {VSERPORT_LIMIT:.0f} s",
                f"{_percentile(latencies, 0.5) / VSERPORT_LIMIT:.2f}x",
            )
        )
        rows.append(
            (
                "QEMU start -> STARTED",
                f"{started.seconds:.2f} s",
                f"QEMU start -> login prompt {login:.2f} s",
                f"{started.seconds / login:.2f}",
            )
        )
        await vm.power_off()
        await vm.wait_guest_off(timeout=30)
    return rows


async def warm_rows(restores: int) -> Rows:
    """A restored guest to STARTED readable, next to a cold boot to STARTED, in the same run."""
    image = build_image(ImageSpec(debs=(built_deb(),)), progress=lambda _: None)
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=Accel.TCG)
    async with Vm(config) as vm:
        cold = (await vm.wait_for_state(STARTED, PORT_NAME, timeout=180)).seconds
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as store:
        began = time.monotonic()
        async with started_vm(config, warm=True, store=Path(store)) as (_vm, start):
            assert start.how is How.WARM, start.reason
        first = time.monotonic() - began  # the cold boot that saves, then the first restore
        seconds = []
        for _ in range(restores):
            async with started_vm(config, warm=True, store=Path(store)) as (_vm, start):
                assert start.how is How.WARM, start.reason
                seconds.append(start.seconds)
    warm = statistics.median(seconds)
    return [
        (
            f"warm start: restore -> STARTED readable (median of {restores})",
            f"{warm:.2f} s",
            f"cold boot -> STARTED {cold:.2f} s",
            f"{warm / cold:.2f}x",
        ),
        ("warm start: the first (boot, save, restore)", f"{first:.2f} s", "", ""),
    ]


def print_table(rows: Rows) -> None:
    headers: Row = ("what", "figure", "anchor (same run)", "ratio")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(4)]
    for row in [headers, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="native starts (default: 20)")
    parser.add_argument("--refreshes", type=int, default=200, help="timed refreshes (default: 200)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window in s (default: 60)")
    parser.add_argument("--writes", type=int, default=24, help="timed writes (default: 24)")
    parser.add_argument("--restores", type=int, default=5, help="warm starts (default: 5)")
    parser.add_argument("--native-only", action="store_true", help="no guest")
    parser.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        help="the source tree whose agent runs natively (default: this one; the guest runs "
        "the .deb from out/ or $LXD_AGENT_DEB): an older checkout gives the before figures",
    )
    options = parser.parse_args()
    print(f"agent: {options.tree}; package: {'-' if options.native_only else built_deb()}")
    rows = refresh_rows(options.refreshes)
    rows += native_rows(options.runs, options.tree.resolve())
    if not options.native_only:
        rows += asyncio.run(guest_rows(options.idle, options.writes))
        rows += asyncio.run(warm_rows(options.restores))
    print(f"python {sys.version.split()[0]} (host), {PYTHON}; guest under TCG, 2 vCPUs")
    print_table(rows)


if __name__ == "__main__":
    main()
