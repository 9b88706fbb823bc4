"""VM tests: the built image with the installed .deb, booted under TCG with each LXD layout.

Each test boots one guest (never two at once) and checks, from the host's side, what the agent
reported on the ring buffers and when. A test that cannot run because a tool or the .deb is
missing fails; it never skips. On failure the console tail and the ring-buffer timeline are
printed (pytest shows them under "Captured stdout"). The figures measured are printed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Dict, Iterator

import pytest

from lxd_agent.host.accel import Accel
from lxd_agent.host.image import BASE_PACKAGES, CLOUD_INIT_PACKAGES, GuestImage, ImageSpec
from lxd_agent.host.image import build_image as build_guest_image
from lxd_agent.host.layouts import get_layout
from lxd_agent.host.monitor import EntryKind
from lxd_agent.host.package import DEB_PACKAGE, PackageNotFound, find_test_deb
from lxd_agent.host.qemu import process_exists
from lxd_agent.host.seed import INSTALLED_MARKER, SEED_DIR, make_seed_iso
from lxd_agent.host.vm import DirectBoot, Vm, VmConfig
from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from tests.host.helpers import run

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "dpkg-deb")

# Generous bounds: the point is catching a hang (90 s is systemd's stop timeout), not speed.
BOOT_TIMEOUT = 120.0
SEED_BOOT_TIMEOUT = 420.0
STOP_TIMEOUT = 30.0
POWER_OFF_BOUND = 20.0
TEST_DEADLINE = 300.0

Figures = Dict[str, str]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """Measured figures, printed after the run whether the tests passed or not."""
    measured: Figures = {}
    yield measured
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not measured:
        return
    # Session teardown runs inside the last test's captured teardown: print past the capture.
    with capture.global_and_fixture_disabled():
        reporter.section("VM figures (TCG)")
        for name, value in measured.items():
            reporter.write_line(f"{name:<48} {value}")


@pytest.fixture(scope="session")
def deb() -> Path:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH: the VM tests need it; run `make setup`")
    try:
        return find_test_deb()
    except PackageNotFound as e:
        pytest.fail(f"the VM tests need the package: {e}")


@pytest.fixture(scope="session")
def guest_image(deb: Path, figures: Figures) -> GuestImage:
    """The image with the package installed, built once per session (or reused)."""
    started = time.monotonic()
    image = build_guest_image(ImageSpec(debs=(deb,)), progress=print)
    figures["image with the .deb: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image


@pytest.fixture(scope="session")
def cloud_init_image(figures: Figures) -> GuestImage:
    """The image with cloud-init and WITHOUT the package: the seed has to install it."""
    started = time.monotonic()
    spec = ImageSpec(packages=BASE_PACKAGES + CLOUD_INIT_PACKAGES)
    image = build_guest_image(spec, progress=print)
    figures["image with cloud-init: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image


@contextlib.asynccontextmanager
async def booted(image: GuestImage, layout: str, seed: Path | None = None) -> AsyncIterator[Vm]:
    """A running guest; on any failure, its console tail and timeline are printed."""
    config = VmConfig(layout=get_layout(layout), boot=DirectBoot(image), accel=Accel.TCG, seed=seed)
    vm = Vm(config, progress=print)
    async with vm:
        pid = vm.qemu.pid
        assert vm.files is not None
        workdir = vm.files.workdir
        try:
            yield vm
        except BaseException:
            print(f"=== {layout}: console tail and ring-buffer timeline ===")
            print(vm.report(console_lines=40))
            raise
        print(f"=== {layout}: ring-buffer timeline ===")
        print("\n".join(vm.render_timeline()))
    assert not process_exists(pid), f"QEMU {pid} outlived its VM"
    assert not workdir.exists(), f"{workdir} outlived its VM"


async def power_off_and_wait_stopped(vm: Vm, port: str) -> float:
    """Power off; STOPPED must follow the power button. Seconds from power-off to STOPPED."""
    await vm.power_off()
    stopped = await vm.wait_for_state(STOPPED, port, timeout=STOP_TIMEOUT)
    await vm.wait_guest_off(timeout=POWER_OFF_BOUND)
    assert vm.powerdown_at is not None
    after = stopped.seconds - (vm.powerdown_at - vm.t0)
    assert after >= 0, f"STOPPED at {stopped.seconds:.2f} s came before the power button"
    return after


async def multi_user_after(vm: Vm) -> float:
    """Seconds from the start of userspace (systemd) to multi-user.target, in the guest."""
    await vm.run("systemctl is-system-running --wait", timeout=90)
    manager = await vm.run("systemctl show -p UserspaceTimestampMonotonic")
    target = await vm.run("systemctl show -p ActiveEnterTimestampMonotonic multi-user.target")
    start = int(manager.output.strip().split("=", 1)[1])
    reached = int(target.output.strip().split("=", 1)[1])
    assert reached > 0, "multi-user.target never became active"
    return (reached - start) / 1e6


def state_changes(vm: Vm, port: str) -> list[str]:
    return [
        e.text for e in vm.monitor.timeline.entries if e.kind is EntryKind.STATE and e.port == port
    ]


def nonempty_reads(vm: Vm, port: str) -> list[str]:
    return [
        e.text for e in vm.monitor.timeline.entries if e.kind is EntryKind.READ and e.port == port
    ]


# -- one test per layout ------------------------------------------------------------------------


def _started_then_stopped(image: GuestImage, layout: str, port: str, figures: Figures) -> None:
    async def scenario() -> None:
        async with booted(image, layout) as vm:
            started = await vm.wait_for_state(STARTED, port, timeout=BOOT_TIMEOUT)
            figures[f"{layout}: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            probe = await vm.run("lxd-agent probe")
            assert f"would use: {port}" in probe.output, probe.output
            multi_user = await multi_user_after(vm)
            figures[f"{layout}: userspace -> multi-user.target"] = f"{multi_user:.2f} s"
            stopped_after = await power_off_and_wait_stopped(vm, port)
            figures[f"{layout}: power-off -> STOPPED"] = f"{stopped_after:.2f} s"
            assert state_changes(vm, port) == [f"unknown -> {STARTED}", f"{STARTED} -> {STOPPED}"]

    run(scenario(), TEST_DEADLINE)


def test_lxd_5_20_reports_started_at_boot_and_stopped_at_power_off(
    guest_image: GuestImage, figures: Figures
) -> None:
    _started_then_stopped(guest_image, "lxd-5.20", PORT_NAME, figures)


def test_lxd_5_19_falls_back_to_the_legacy_port(guest_image: GuestImage, figures: Figures) -> None:
    _started_then_stopped(guest_image, "lxd-5.19", LEGACY_PORT_NAME, figures)


def test_bridged_reports_on_the_new_name_and_leaves_the_legacy_ring_empty(
    guest_image: GuestImage, figures: Figures
) -> None:
    async def scenario() -> None:
        async with booted(guest_image, "bridged") as vm:
            started = await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            figures["bridged: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            stopped_after = await power_off_and_wait_stopped(vm, PORT_NAME)
            figures["bridged: power-off -> STOPPED"] = f"{stopped_after:.2f} s"
            await vm.monitor.read_rings("final")  # whatever is left in either ring
            assert vm.monitor.state(LEGACY_PORT_NAME) is None
            assert nonempty_reads(vm, LEGACY_PORT_NAME) == []

    run(scenario(), TEST_DEADLINE)


def test_incus_dead_stub_does_not_hang_boot_or_power_off(
    guest_image: GuestImage, figures: Figures
) -> None:
    async def scenario() -> None:
        async with booted(guest_image, "incus") as vm:
            await vm.login(timeout=BOOT_TIMEOUT)
            # A hanging agent would hold is-system-running in "starting" past this timeout.
            system = await vm.run("systemctl is-system-running --wait", timeout=90)
            target = await vm.run("systemctl is-active multi-user.target")
            multi_user = await multi_user_after(vm)
            figures["incus: userspace -> multi-user.target"] = f"{multi_user:.2f} s"
            agent = await vm.run("systemctl show lxd-agent -p ActiveState,SubState,Result")
            print(f"incus guest: {system.output!r}, agent: {agent.output!r}")
            figures["incus: agent unit state after boot"] = " ".join(agent.output.split())
            assert system.output.strip() == "running", system.output  # not degraded
            assert target.output.strip() == "active", target.output
            # Skipped by its ExecCondition= (probe finds no usable port): not hanging in its
            # start phase, not failed, not looping through restarts.
            assert "ActiveState=inactive" in agent.output, agent.output
            assert "Result=exec-condition" in agent.output, agent.output
            # ...and a start that systemd had to time out was a hang, even if it is over now.
            journal = await vm.run("journalctl -b -q -u lxd-agent --no-pager")
            assert "timed out" not in journal.output, journal.output
            await vm.power_off()
            off = await vm.wait_guest_off(timeout=POWER_OFF_BOUND)
            assert vm.powerdown_at is not None
            took = off - (vm.powerdown_at - vm.t0)
            figures["incus: power-off -> guest off"] = f"{took:.2f} s (bound {POWER_OFF_BOUND:g} s)"
            # The agent never writes to Incus's own port.
            assert vm.monitor.state(INCUS_PORT_NAME) is None

    run(scenario(), TEST_DEADLINE)


# -- the agent as a unit in the real guest ------------------------------------------------------


def test_systemctl_stop_and_start_move_the_host_state(
    guest_image: GuestImage, figures: Figures
) -> None:
    async def scenario() -> None:
        async with booted(guest_image, "lxd-5.20") as vm:
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            stop = await vm.run("systemctl stop lxd-agent")
            assert stop.status == 0, stop.output
            await vm.wait_for_state(STOPPED, PORT_NAME, timeout=STOP_TIMEOUT)
            before = time.monotonic()
            start = await vm.run("systemctl start lxd-agent")
            assert start.status == 0, start.output
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=STOP_TIMEOUT)
            figures["systemctl start -> STARTED on the host"] = f"{time.monotonic() - before:.2f} s"
            await power_off_and_wait_stopped(vm, PORT_NAME)
            assert state_changes(vm, PORT_NAME) == [
                f"unknown -> {STARTED}",
                f"{STARTED} -> {STOPPED}",
                f"{STOPPED} -> {STARTED}",
                f"{STARTED} -> {STOPPED}",
            ]

    run(scenario(), TEST_DEADLINE)


def test_probe_in_the_guest_skips_the_hung_up_legacy_stub(guest_image: GuestImage) -> None:
    async def scenario() -> None:
        async with booted(guest_image, "lxd-5.20") as vm:
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            probe = await vm.run("lxd-agent probe")
            status = await vm.run("systemctl show lxd-agent -p StatusText")
            print(f"probe in the guest:\n{probe.output}\n{status.output}")
            assert probe.status == 0, probe.output
            new, legacy, verdict = probe.output.strip().splitlines()
            assert new.startswith(PORT_NAME) and "host-connected=yes  usable" in new
            # The kernel reports POLLHUP for the port that has no chardev on the host.
            assert legacy.startswith(LEGACY_PORT_NAME) and "POLLHUP" in legacy, legacy
            assert verdict.startswith(f"would use: {PORT_NAME} (")
            assert f"StatusText=reporting to {PORT_NAME} (" in status.output, status.output
            await power_off_and_wait_stopped(vm, PORT_NAME)

    run(scenario(), TEST_DEADLINE)


def test_hardened_unit_runs_as_shipped(guest_image: GuestImage, figures: Figures) -> None:
    async def scenario() -> None:
        async with booted(guest_image, "lxd-5.20") as vm:
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=BOOT_TIMEOUT)
            show = await vm.run(
                "systemctl show lxd-agent -p ActiveState,SubState,Result,Type,DropInPaths"
            )
            props = dict(line.split("=", 1) for line in show.output.splitlines() if "=" in line)
            assert props.get("ActiveState") == "active", show.output
            assert props.get("SubState") == "running", show.output
            assert props.get("Result") == "success", show.output
            assert props.get("Type") == "notify", show.output
            assert props.get("DropInPaths", "") == "", "the unit must run without drop-ins"
            security = await vm.run("systemd-analyze security --no-pager lxd-agent | tail -1")
            match = re.search(r"exposure level for lxd-agent\.service: ([0-9.]+)", security.output)
            assert match, security.output
            figures["systemd-analyze security exposure (guest)"] = match.group(1)
            assert float(match.group(1)) <= 1.5, security.output
            errors = await vm.run("journalctl -b -q -u lxd-agent -p err --no-pager")
            assert errors.output.strip() == "", errors.output
            await power_off_and_wait_stopped(vm, PORT_NAME)

    run(scenario(), TEST_DEADLINE)


# -- the NoCloud install path ------------------------------------------------------------------


def test_cloud_init_seed_installs_the_agent_which_reports_started_and_stopped(
    cloud_init_image: GuestImage, deb: Path, tmp_path: Path, figures: Figures
) -> None:
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    seed = make_seed_iso(deb, tmp_path / "seed.iso")

    async def scenario() -> None:
        async with booted(cloud_init_image, "lxd-5.20", seed=seed) as vm:
            started = await vm.wait_for_state(STARTED, PORT_NAME, timeout=SEED_BOOT_TIMEOUT)
            figures["cloud-init seed: QEMU start -> STARTED"] = f"{started.seconds:.2f} s"
            assert INSTALLED_MARKER in vm.console.tail(2000)
            installed = await vm.run(f"dpkg-query -W -f '${{Version}}' {DEB_PACKAGE}")
            assert installed.output.strip() == version, installed.output
            # Removing stops the agent (the host sees STOPPED); installing again in the same
            # boot starts it (the port already exists: no new device event would do it).
            removed = await vm.run(f"dpkg -r {DEB_PACKAGE}", timeout=60)
            assert removed.status == 0, removed.output
            await vm.wait_for_state(STOPPED, PORT_NAME, timeout=STOP_TIMEOUT)
            again = await vm.run(f"dpkg -i {SEED_DIR}/{deb.name}", timeout=120)
            assert again.status == 0, again.output
            await vm.wait_for_state(STARTED, PORT_NAME, timeout=STOP_TIMEOUT)
            stopped_after = await power_off_and_wait_stopped(vm, PORT_NAME)
            figures["cloud-init seed: power-off -> STOPPED"] = f"{stopped_after:.2f} s"
            assert state_changes(vm, PORT_NAME) == [
                f"unknown -> {STARTED}",
                f"{STARTED} -> {STOPPED}",
                f"{STOPPED} -> {STARTED}",
                f"{STARTED} -> {STOPPED}",
            ]

    run(scenario(), SEED_BOOT_TIMEOUT + 120)


def test_a_guest_without_the_agent_never_reports_started(cloud_init_image: GuestImage) -> None:
    """The harness does not pass by itself: no package, no seed, no STARTED."""

    async def scenario() -> None:
        async with booted(cloud_init_image, "lxd-5.20") as vm:
            await vm.login(timeout=BOOT_TIMEOUT)
            await vm.run("systemctl is-system-running --wait", timeout=90)
            await vm.monitor.read_rings("after boot")
            assert vm.monitor.state(PORT_NAME) is None
            assert nonempty_reads(vm, PORT_NAME) == []

    run(scenario(), TEST_DEADLINE)


# -- the command line ----------------------------------------------------------------------------


def _harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "lxd_agent.host.cli", *args]


def test_harness_boot_exits_0_after_started_then_stopped(
    deb: Path, guest_image: GuestImage
) -> None:
    result = subprocess.run(
        _harness("boot", "--layout", "lxd-5.20", "--accel", "tcg", "--deb", str(deb)),
        capture_output=True, text=True, timeout=TEST_DEADLINE, cwd=REPO,
    )  # fmt: skip
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert f"OK: STARTED then STOPPED on {PORT_NAME}" in result.stdout
    assert re.search(r"STARTED +[0-9.]+ s +on com\.canonical\.lxd", result.stdout)


def test_harness_keep_cleans_up_after_ctrl_c(deb: Path, guest_image: GuestImage) -> None:
    proc = subprocess.Popen(
        _harness("boot", "--layout", "lxd-5.20", "--accel", "tcg", "--deb", str(deb), "--keep"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    pid = qmp = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"QEMU pid: +(\d+)", line):
                pid = int(m.group(1))
            if m := re.search(r"QMP: +(\S+)", line):
                qmp = Path(m.group(1))
            if pid is not None or time.monotonic() > deadline:
                break
        assert pid is not None and qmp is not None, "".join(lines)
        assert process_exists(pid) and qmp.is_socket()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print("".join(lines), rest)
    assert proc.returncode == 130, rest
    assert not process_exists(pid), f"QEMU {pid} survived Ctrl-C"
    assert not qmp.parent.exists(), f"{qmp.parent} survived Ctrl-C"


def test_no_vm_test_left_a_qemu_behind() -> None:
    ours = subprocess.run(
        ["pgrep", "-f", "lxd-agent-harness-"], capture_output=True, text=True
    ).stdout.split()
    assert [pid for pid in ours if int(pid) != os.getpid()] == []
