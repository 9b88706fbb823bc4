"""Check an image as it is: boot it once per layout and say what LXD's (or Incus's) host sees.

For people who build images for LXD: whatever agent the image carries (ours, LXD's own loader,
Debian's `lxd-agent`, an old one of theirs, none), does it survive the port rename? The image is
booted through its firmware with no seed and nothing added, once per layout, and only the host's
side is used: the rings read by the layout's reading rule, the QMP events (the guest opening a
port shows there even for a port with nothing behind it), the serial console (read, never typed
into) and the power button. No shell in the guest is needed.

Per layout: when `STARTED` came and on which ring; whether the power button powered the guest off
within a bound, or a job held it (what systemd printed); whether `STOPPED` followed. Then one
plain `Finding` per layout, judged with what the other layouts showed (an agent that reported on
`lxd-5.19`'s legacy ring and is silent on `lxd-5.20` reports only on the legacy port).

On an LXD layout an agent must report `STARTED` on the port that layout's host reads, `STOPPED`
after the power button, and never hold the power-off. On an Incus layout reporting is not asked
of an LXD agent (Incus reads its own port), only that it holds nothing. Returns a `CheckVerdict`;
never prints. Host side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.aio import in_turn
from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import HarnessError, MonitorTimeout, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.lxd_image import ImageInput
from lxd_agent_harness.lxd.layouts import Layout
from lxd_agent_harness.lxd.monitor import TimelineEntry
from lxd_agent_harness.lxd.qemu_conf import Override
from lxd_agent_harness.scenarios.observed import (
    PRESS_AGAIN_AFTER,
    PowerOffFigures,
    first_state,
    power_off_within,
    record,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import FirmwareBoot, Network, VmConfig
from lxd_agent_harness.vm.console import LOGIN_PROMPT
from lxd_agent_harness.vm.firmware import Firmware
from lxd_agent_harness.vm.instance import Vm

CHECK_LAYOUTS = ("lxd-5.19", "lxd-5.20", "incus")
"""What `check` boots by default: before the rename, after it, and Incus."""

DEFAULT_CHECK_TIMEOUT = 300.0
"""Seconds from QEMU's start to the login prompt (or `STARTED`): a cloud image through UEFI
under TCG reaches its login prompt in 30-50 s here."""

AGENT_GRACE = 20.0
"""Seconds an agent has to report after the console's login prompt. LXD's agent and ours start
as soon as udev sees the port, well before the prompt; a few refresh periods of slack."""

DEFAULT_CHECK_BOUND = 20.0
"""Seconds the power button has to power the guest off before the layout counts as held
(systemd itself waits 90 s for a stop job; 1-3 s is usual here)."""

FOREIGN_ARCH_FACTOR = 3.0
"""How many times the default bound a guest of another architecture than the host's gets: it
runs under TCG translating every instruction (an arm64 cloud image reaches STARTED in about
50 s on this amd64 machine against 20 s for amd64's), and on a busy machine its
systemd-logind's start job has run for 21 s, which the default bound took for a held boot."""


def default_bound(arch: Arch, host: Arch) -> tuple[float, str]:
    """The bound when none is given, and why, in words."""
    if arch is host:
        return DEFAULT_CHECK_BOUND, ""
    bound = DEFAULT_CHECK_BOUND * FOREIGN_ARCH_FACTOR
    return bound, (
        f"bound {bound:g} s ({DEFAULT_CHECK_BOUND:g} s x {FOREIGN_ARCH_FACTOR:g}: an "
        f"{arch.value} guest runs under TCG on this {host.value} host; --bound sets it)"
    )


_POLL_SECONDS = 0.5

START_JOB = re.compile(
    rb"(?:A start job is running for (.+?)|Job (\S+)/start running) \((?:(\d+)min )?(\d+)s / "
)
"""systemd's line while a start job keeps the boot waiting, with how long it has run so far: it
names the unit by its description and by its name, in turn."""


class Finding(str, enum.Enum):
    """What one layout showed, in one word; `reason` says it in a sentence."""

    REPORTS = "reports"
    """STARTED on the port the host reads, STOPPED after the power button, nothing held."""
    NO_STOPPED = "no-stopped"
    """STARTED on the right port, but no STOPPED after the power button."""
    LEGACY_ONLY = "legacy-only"
    """Silent on LXD >= 5.20's port, while it reports (or opened) the legacy one."""
    WRONG_PORT = "wrong-port"
    """STARTED only on a ring this layout's host does not read."""
    HOLDS_POWER_OFF = "holds-power-off"
    """The guest was still up `bound` s after the power button."""
    NO_AGENT = "no-agent"
    """Nothing reported on any ring, on a layout where an LXD agent must report."""
    STANDS_ASIDE = "stands-aside"
    """An Incus layout: nothing reported to Incus, and nothing held."""
    CONFIG_DIFFERS = "config-differs"
    """A real daemon started QEMU with a virtio-serial part other than the harness's layout of
    that host: the model is wrong, so nothing else this check says can be trusted."""
    NOT_CHECKED = "not-checked"
    """The harness could not boot or watch the image: see the error."""


@dataclass(frozen=True)
class HostReport:
    """The real daemon a check ran on (`check --host`): what it is, what was adapted for it on
    this machine, and its own log lines that the verdict rests on."""

    kind: str
    """`lxd` or `incus`."""
    version: str
    layout: str
    """The harness's layout of this daemon's version, by which it is judged and compared."""
    adaptations: tuple[tuple[str, str], ...] = ()
    """(name, reason) of each way around a limit of this machine (`host.probes`)."""
    log: tuple[str, ...] = ()
    qemu_conf: str = ""
    """The QEMU configuration the daemon wrote for the VM (its `qemu.conf`), whole."""
    smbios: tuple[str, ...] = ()
    """The `-smbios` values the daemon gave its QEMU (the host's identity, SMBIOS type 2)."""


PASSING = frozenset({Finding.REPORTS, Finding.STANDS_ASIDE})


@dataclass
class LayoutCheck(PowerOffFigures):
    """One boot of the image in one layout. Times are seconds since QEMU started."""

    layout: str
    status_port: str
    """The port this layout's host reads its status from."""
    must_report: bool
    """An LXD layout: the agent must report; an Incus one: it must only hold nothing."""
    started: TimelineEntry | None = None
    """The first `STARTED` the host saw, on any ring."""
    stopped: TimelineEntry | None = None
    """The first `STOPPED` the host saw on the status port after the power button."""
    opened_ports: list[str] = field(default_factory=list)
    """The ports the guest opened, by name, in the order of their first open."""
    kernel_up: float | None = None
    login_prompt: float | None = None
    powered_down: float | None = None
    guest_off: float | None = None
    power_off_held: bool = False
    job_running: str = ""
    boot_job: str = ""
    """A start job systemd showed running for `bound` s or more while the boot waited for it
    (what it printed: `start job for LXD - agent`); then the check stopped waiting for the
    login prompt. Empty when none did."""
    bound: float = DEFAULT_CHECK_BOUND
    error: HarnessError | None = None
    """Why this layout could not be checked (the image did not boot...), with its fields."""
    finding: Finding = Finding.NOT_CHECKED
    reason: str = ""
    entries: list[TimelineEntry] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    host: HostReport | None = None
    """The real daemon that ran this layout's VM; None for the harness's QEMU model."""
    config_differences: list[str] = field(default_factory=list)
    """How the daemon's `qemu.conf` differs from `layout` (a real daemon only)."""
    stopped_unchecked: str = ""
    """Why `STOPPED` could not be looked for on a real daemon (no shell in the guest to stop
    the agent's unit with); empty when it was."""
    agent_unstartable: str = ""
    """A real daemon's VM whose agent unit failed for want of what this machine's adaptations
    took away (its vsock device): what the unit and its journal said; empty otherwise."""
    agent_unit: str = ""
    """The agent unit's state in the guest when it never reported (a real daemon only)."""
    agent_journal: list[str] = field(default_factory=list)
    """The agent unit's journal in the guest when it never reported (a real daemon only)."""

    @property
    def passed(self) -> bool:
        return self.finding in PASSING


@dataclass
class CheckVerdict:
    image: Path
    firmware: Firmware
    secure_boot: bool = False
    checks: list[LayoutCheck] = field(default_factory=list)
    source: ImageInput | None = None
    """The image's shape and metadata, as `check --image` read them (None: a bare disk given
    to `check_image` directly)."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


def status_port(layout: Layout) -> str:
    """The port whose ring this layout's host reads: the one LXD's template calls `qemu_serial`."""
    return layout.rings[0].port_name


def judge(checks: Sequence[LayoutCheck]) -> None:
    """Fill each check's `finding` and `reason`, from itself and what the others saw."""
    legacy_elsewhere = any(
        c.started is not None and c.started.port == LEGACY_PORT_NAME for c in checks
    )
    for check in checks:
        check.finding, check.reason = _finding(check, legacy_elsewhere)


def _finding(check: LayoutCheck, legacy_elsewhere: bool) -> tuple[Finding, str]:
    """The root cause first: an agent that never wrote where this host reads is judged by that,
    whatever its blocking write then held (the details say what it held)."""
    if check.error is not None:
        return Finding.NOT_CHECKED, f"could not check: {check.error}"
    if check.config_differences:
        return (
            Finding.CONFIG_DIFFERS,
            f"the daemon's QEMU configuration differs from the {check.layout} layout: "
            + "; ".join(check.config_differences),
        )
    started = check.started
    if started is not None and started.port == check.status_port:
        if check.power_off_held:
            return Finding.HOLDS_POWER_OFF, _held(check)
        if check.stopped is None and check.stopped_unchecked:
            return (
                Finding.NOT_CHECKED,
                f"reports STARTED on {started.port}; "
                f"STOPPED not checked: {check.stopped_unchecked}",
            )
        if check.stopped is None:
            return (
                Finding.NO_STOPPED,
                f"reports STARTED on {started.port} but no STOPPED "
                + ("when its unit stopped" if check.host else "after the power button"),
            )
        return Finding.REPORTS, f"reports on {started.port}"
    if started is None and check.agent_unstartable:
        return (
            Finding.NOT_CHECKED,
            f"the image's agent could not start on this machine: {check.agent_unstartable}",
        )
    if started is not None:
        return (
            Finding.WRONG_PORT,
            f"reports on {started.port}, which this layout's host does not read "
            f"(it reads {check.status_port})",
        )
    if (
        check.must_report
        and check.status_port != LEGACY_PORT_NAME
        and (LEGACY_PORT_NAME in check.opened_ports or legacy_elsewhere)
    ):
        return (
            Finding.LEGACY_ONLY,
            f"reports only on the legacy port {LEGACY_PORT_NAME}: LXD >= 5.20 never sees it",
        )
    if check.power_off_held:
        return Finding.HOLDS_POWER_OFF, _held(check)
    if not check.must_report:
        return (
            Finding.STANDS_ASIDE,
            f"no status on {check.status_port} (not asked of an LXD agent); power-off not held",
        )
    if check.agent_unit:
        return Finding.NO_AGENT, f"no agent reported; lxd-agent.service: {check.agent_unit}"
    return Finding.NO_AGENT, "no agent reported"


def _held(check: LayoutCheck) -> str:
    why = f"; systemd was running a {check.job_running}" if check.job_running else ""
    if check.started is None and any(port != check.status_port for port in check.opened_ports):
        what = "a blocking write to a port with nothing behind it"
    else:
        what = f"the guest was still up {check.bound:g} s after the power button"
    return f"holds the power-off: {what}{why}"


async def check_image(
    disk: Path,
    disk_format: str,
    layouts: Sequence[Layout],
    *,
    arch: Arch = Arch.AMD64,
    firmware: Firmware = Firmware.UEFI,
    secure_boot: bool = False,
    accel: Accel = Accel.TCG,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
    bound: float = DEFAULT_CHECK_BOUND,
    network: Network = Network.NONE,
    credentials: tuple[tuple[str, str], ...] = (),
    raw_qemu_conf: tuple[Override, ...] = (),
    progress: Progress | None = None,
    jobs: int = 1,
) -> CheckVerdict:
    """Boot `disk` as it is once per layout, `jobs` layouts at a time (each guest on a fresh
    overlay of its own); the judged verdict. `network`, `credentials` and `raw_qemu_conf` are
    the VM's (`VmConfig`): nothing is added to the disk.

    A harness failure in one layout (the image does not boot) is kept in that layout's check.
    """
    verdict = CheckVerdict(image=disk, firmware=firmware, secure_boot=secure_boot)

    def start(layout: Layout) -> Callable[[], Awaitable[LayoutCheck]]:
        config = VmConfig(
            layout=layout,
            boot=FirmwareBoot(disk, disk_format, firmware, secure_boot),
            accel=accel,
            arch=arch,
            network=network,
            credentials=credentials,
            raw_qemu_conf=raw_qemu_conf,
        )

        async def one() -> LayoutCheck:
            if progress is not None:
                progress(f"check: {layout.name}")
            return await check_layout(config, timeout, bound, progress)

        return one

    verdict.checks.extend(await in_turn([start(layout) for layout in layouts], jobs))
    judge(verdict.checks)
    return verdict


async def check_layout(
    config: VmConfig, timeout: float, bound: float, progress: Progress | None = None
) -> LayoutCheck:
    """One boot in `config.layout`, observed from the host; unjudged (see `judge`)."""
    layout = config.layout
    check = LayoutCheck(
        layout=layout.name,
        status_port=status_port(layout),
        # An LXD agent is asked to report to LXD; on Incus (either rule) it may stand aside.
        must_report=status_port(layout) != INCUS_PORT_NAME,
        bound=bound,
    )
    vm = Vm(config, progress=progress)
    try:
        async with vm:
            try:
                await _observe(vm, check, timeout)
            finally:
                _record(vm, check)
    except HarnessError as e:
        check.error = e
    return check


async def _observe(vm: Vm, check: LayoutCheck, timeout: float) -> None:
    await _await_report(vm, check, timeout)
    # An agent may report long before the boot is done, and a guest drops a power button
    # pressed before logind runs: press it once the console offers a login (or at the timeout,
    # or once a start job has held the boot for the bound), and again while the console shows
    # no shutdown.
    while check.login_prompt is None and not check.boot_job and vm.seconds() < timeout:
        _see_login_prompt(vm, check)
        _see_boot_held(vm, check)
        await asyncio.sleep(_POLL_SECONDS)
    power_off = await power_off_within(vm, check.bound, press_again_after=PRESS_AGAIN_AFTER)
    check.power_off_held = power_off.held
    check.job_running = power_off.job_running


async def _await_report(vm: Vm, check: LayoutCheck, timeout: float) -> None:
    """Wait for `STARTED` on any ring until `AGENT_GRACE` after the login prompt (or `timeout`).

    A guest whose console shows no login prompt gets the whole `timeout`.
    """
    while True:
        _see_login_prompt(vm, check)
        _see_boot_held(vm, check)
        if check.boot_job:
            return
        limit = timeout
        if check.login_prompt is not None:
            # The grace counts the time the guest could run (`Vm.host_cpu_wait`).
            grace = AGENT_GRACE + vm.host_cpu_wait(check.login_prompt)
            limit = min(timeout, check.login_prompt + grace)
        remaining = limit - vm.seconds()
        if remaining <= 0:
            vm.note(f"no {STARTED} by {limit:.1f} s")
            return
        try:
            await vm.wait_for_state(STARTED, None, timeout=min(remaining, _POLL_SECONDS))
            return
        except VmError as e:
            if not isinstance(e.__cause__, MonitorTimeout):
                raise
        await asyncio.sleep(0)


def _see_login_prompt(vm: Vm, check: LayoutCheck) -> None:
    if check.login_prompt is None and vm.console.search(LOGIN_PROMPT, 0) is not None:
        check.login_prompt = vm.seconds()
        vm.note("login prompt on the console")
        vm.release_cores()  # the boot is done: what is left is waiting, and the power-off


def _see_boot_held(vm: Vm, check: LayoutCheck) -> None:
    """Whether the console's latest start job line says it has held the boot for `bound` s."""
    if check.boot_job:
        return
    groups = vm.console.last_groups(START_JOB)
    if groups is None:
        vm.host_cpu_wait()  # a sample, for the window of a start job to come
        return
    description, name, minutes, seconds = groups
    unit = description or name
    running = int(minutes or 0) * 60 + int(seconds or 0)
    # Counted in the time the guest could run: a job that only waited for a host CPU as long
    # as the guest did is a slow boot, not a held one (`vm/cpuwait.py`).
    starved = vm.host_cpu_wait(vm.seconds() - running)
    if running - starved >= check.bound and unit:
        check.boot_job = f"start job for {unit.decode(errors='replace')}"
        extra = f" ({starved:.1f} s of it waiting for a host CPU)" if starved >= 1.0 else ""
        vm.note(f"the boot held for {running} s{extra} by a {check.boot_job}")
        vm.release_cores()  # a held boot only waits


def _record(vm: Vm, check: LayoutCheck) -> None:
    starved = vm.host_cpu_wait()
    if starved >= 1.0:  # a busy host: said, as the bounds above were counted without it
        vm.note(f"the guest's vCPUs waited {starved:.1f} s for a host CPU in all")
    record(vm, check)
    check.started = first_state(check.entries, STARTED, 0.0)
    if check.powered_down is not None:
        check.stopped = first_state(check.entries, STOPPED, check.powered_down, check.status_port)
    with contextlib.suppress(VmError):  # a VM that failed to start has no monitor
        opened = sorted(vm.monitor.opened.items(), key=lambda item: item[1])
        layout = vm.config.layout
        check.opened_ports = [layout.port_named(device) or device for device, _ in opened]
