"""`check` on a real daemon: the image booted by LXD itself, judged by what the daemon saw.

The same findings as the QEMU model's `check` (`scenarios.check`), from other observations:
  - `started`: when the daemon's agent flag went up (its monitor read `STARTED` on the ring it
    reads), seen through its answer to `exec`, with its own log line where it has a log;
  - `stopped`: when that flag went down after the agent's unit was stopped in the guest (a host
    reads its ring only while the VM runs, so `STOPPED` at power-off is never seen by it); the
    unit is then started again and the flag must come back up;
  - `power_off_held`: the daemon's `stop` (the power button, with the bound as its timeout)
    did not end in time;
  - `config_differences`: the daemon's own `qemu.conf` against the harness's layout of that
    daemon's version, which outranks everything else.
The guest's console is used only to stop and start the agent's unit. Host side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import HarnessError, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host import probes
from lxd_agent_harness.host.config import read_sections, serial_differences
from lxd_agent_harness.host.daemon import DaemonInfo, local_daemon, running_daemon
from lxd_agent_harness.host.instance import AgentFlag, HostVm
from lxd_agent_harness.host.probes import Adaptation
from lxd_agent_harness.host.rest import Daemon
from lxd_agent_harness.lxd.layouts import Layout, get_layout
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.lxd.qemu_conf import Override, Section, render
from lxd_agent_harness.scenarios.check import (
    AGENT_GRACE,
    CheckVerdict,
    HostReport,
    LayoutCheck,
    judge,
    status_port,
)
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.console import (
    LOGIN_PROMPT,
    ConsoleShell,
    SerialConsole,
)
from lxd_agent_harness.vm.firmware import Firmware
from lxd_agent_harness.vm.kvm_probe import choose_accel
from lxd_agent_harness.vm.lock import Cores, take_vm_lock
from lxd_agent_harness.vm.units import AGENT_UNIT

AGENT_UNITS = (AGENT_UNIT, "incus-agent.service")
"""The agent units looked at when nothing reported: ours (and LXD's, Debian's `lxd-agent`
package), then Incus's (Debian's `incus-agent` package)."""

FLAG_POLL = 1.0
"""Seconds between two looks at the daemon's agent flag."""

FLAG_CHANGE_TIMEOUT = 30.0
"""Seconds for the flag to follow the agent's unit: LXD's monitor reads the ring on every QMP
event and at least every 10 s (facts §1), so three refreshes."""

LOGIN_TIMEOUT = 120.0


def host_layout(kind: str, version: tuple[int, ...]) -> Layout:
    """The harness's layout of a daemon of `kind` at `version`."""
    if kind == "lxd":
        return get_layout("lxd-5.20" if version >= (5, 20) else "lxd-5.19")
    return get_layout("incus" if version >= (7, 3) else "incus-6")


def vm_config(
    adaptations: Sequence[Adaptation],
    raw_qemu_conf: Sequence[Override] = (),
    credentials: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
    """The VM's configuration keys: the daemon's defaults, changed only by the adaptations this
    machine needs, the user's `raw.qemu.conf` and systemd credentials (Incus's
    `systemd.credential.NAME` keys: a daemon without them refuses the VM, and says so)."""
    names = {adaptation.name for adaptation in adaptations}
    config = {f"systemd.credential.{name}": value for name, value in credentials}
    sections: list[Section] = []
    if "tcg" in names:
        config["limits.cpu"] = "1"  # QEMU 7.2's multi-threaded TCG has a translation race
        config["raw.qemu"] = "-cpu max"  # QEMU keeps the last -cpu; the daemon asks for host
        config["security.secureboot"] = "false"
        sections.append(Section("machine", (("accel", "tcg"),)))
    if "no-vsock-device" in names:
        sections.append(Section('device "qemu_vsock"', ()))  # a section with no keys: removed
    sections += [
        Section(o.name if not o.index else f"{o.name}][{o.index}", o.entries) for o in raw_qemu_conf
    ]
    if sections:
        config["raw.qemu.conf"] = render(sections)
    return config


async def check_on_host(
    client: Daemon,
    info: DaemonInfo,
    disk: Path,
    disk_format: str,
    adaptations: Sequence[Adaptation],
    timeout: float,
    bound: float,
    raw_qemu_conf: Sequence[Override] = (),
    progress: Progress = print,
    credentials: Sequence[tuple[str, str]] = (),
) -> LayoutCheck:
    """One VM of `disk` on the daemon; the check unjudged (`scenarios.check.judge`)."""
    layout = host_layout(info.kind, info.version_tuple)
    port = status_port(layout)
    check = LayoutCheck(
        layout=layout.name,
        status_port=port,
        must_report=info.kind == "lxd",
        bound=bound,
    )
    config = vm_config(adaptations, raw_qemu_conf, credentials)
    vm = HostVm(client, info, disk, disk_format, config, progress)
    notes: list[TimelineEntry] = []
    qemu_conf = ""
    smbios: list[str] = []

    def note(text: str) -> None:
        notes.append(TimelineEntry(vm.seconds(), EntryKind.NOTE, text))
        progress(f"{info.kind}: {vm.seconds():6.1f} s  {text}")

    def state(before: str, after: str, why: str) -> TimelineEntry:
        entry = TimelineEntry(vm.seconds(), EntryKind.STATE, f"{before} -> {after}", port, why)
        notes.append(entry)
        progress(f"{info.kind}: {vm.seconds():6.1f} s  {port}: {before} -> {after} [{why}]")
        return entry

    try:
        async with contextlib.AsyncExitStack() as stack, vm:
            # The daemon's QEMU shares this machine's cores with the harness's own guests.
            cores = await take_vm_lock(stack, progress, int(vm.config.get("limits.cpu", "1")))
            await vm.start()
            note("the daemon started the VM")
            console = open_console(vm, stack)
            qemu_conf = vm.qemu_conf() or ""
            if not qemu_conf:
                note("the daemon's qemu.conf was not found: not compared")
            else:
                sections = read_sections(qemu_conf, "the daemon's qemu.conf")
                check.config_differences = serial_differences(sections, layout)
                note(
                    f"the daemon's qemu.conf against {layout.name}: "
                    f"{len(check.config_differences)} differences"
                )
            smbios = await _compare_identity(vm, layout, check, note)
            if await _started(vm, console, check, timeout, note, cores):
                check.started = state("unknown", STARTED, "the daemon's agent flag went up")
            if check.started is None and console is not None:
                await _agent_unit(ConsoleShell(console, note), check, adaptations, note)
            if check.started is not None and console is None:
                check.stopped_unchecked = "the daemon's console cannot be had"
            elif check.started is not None and console is not None:
                await _cycle_agent(vm, ConsoleShell(console, note), check, note, state)
            if console is not None:
                # A guest drops a power button pressed before logind runs (README, `check`).
                await _see_login_prompt(vm, console, check, timeout, note)
            check.powered_down = vm.seconds()
            note(f"stop asked, within {bound:g} s")
            cores.release()
            took = await vm.stop(bound)
            check.guest_off = vm.seconds() if took is not None else None
            check.power_off_held = took is None
            note(f"stopped in {took:.1f} s" if took is not None else "not off in time: forced")
            check.host = _report(info, layout, adaptations, vm.log_lines(), qemu_conf, smbios)
    except HarnessError as e:
        check.error = e
        check.host = _report(info, layout, adaptations, vm.log_lines(), qemu_conf, smbios)
    check.entries = notes
    check.timeline = [entry.render() for entry in notes]
    return check


def _report(
    info: DaemonInfo,
    layout: Layout,
    adaptations: Sequence[Adaptation],
    log: list[str],
    qemu_conf: str,
    smbios: Sequence[str],
) -> HostReport:
    return HostReport(
        kind=info.kind,
        version=info.version,
        layout=layout.name,
        adaptations=tuple((a.name, a.reason) for a in adaptations),
        log=tuple(log),
        qemu_conf=qemu_conf,
        smbios=tuple(smbios),
    )


async def _compare_identity(
    vm: HostVm, layout: Layout, check: LayoutCheck, note: Callable[[str], None]
) -> list[str]:
    """The daemon's QEMU's `-smbios` values against the layout's identity (`Layout.identity`):
    a host that says it is another is a difference of the model, as a `qemu.conf` one is."""
    smbios = await vm.qemu_smbios()
    if smbios is None:
        note("the daemon's QEMU command line could not be read: its identity not compared")
        return []
    baseboards = [value for value in smbios if value.startswith("type=2,")]
    if baseboards != [layout.identity.smbios]:
        check.config_differences.append(
            f"-smbios type=2: the daemon passes {baseboards or 'none'}, "
            f"{layout.name} {layout.identity.smbios}"
        )
    note(f"the daemon's QEMU identity: {', '.join(baseboards) or 'none'}")
    return smbios


async def _flag_becomes(vm: HostVm, wanted: AgentFlag, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if await vm.agent_flag() is wanted:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(FLAG_POLL)


def open_console(vm: HostVm, stack: contextlib.AsyncExitStack) -> SerialConsole | None:
    """The guest's console, read from the daemon from the start (None when it cannot be had):
    to see the login prompt, and to act in the guest."""
    opener = vm.console_opener()
    if opener is None:
        return None
    console = SerialConsole(f"{vm.name}'s console", vm.work / "console.log", opener=opener)
    return stack.enter_context(console)


async def _see_login_prompt(
    vm: HostVm,
    console: SerialConsole,
    check: LayoutCheck,
    timeout: float,
    note: Callable[[str], None],
) -> None:
    """Wait (up to `timeout` s since the start) for the console's login prompt."""
    while check.login_prompt is None and vm.seconds() < timeout:
        if console.search(LOGIN_PROMPT, 0) is not None:
            check.login_prompt = vm.seconds()
            note("login prompt on the console")
            return
        await asyncio.sleep(FLAG_POLL)


async def _started(
    vm: HostVm,
    console: SerialConsole | None,
    check: LayoutCheck,
    timeout: float,
    note: Callable[[str], None],
    cores: Cores,
) -> bool:
    """Wait for the daemon's flag to go up: until `AGENT_GRACE` after the console's login
    prompt (as the QEMU model's check waits), or `timeout` without a console. From the login
    prompt on, the guest's core goes to the next VM (`Cores`): the boot is done."""
    while True:
        if await vm.agent_flag() is AgentFlag.UP:
            return True
        seen = console is not None and console.search(LOGIN_PROMPT, 0) is not None
        if seen and check.login_prompt is None:
            check.login_prompt = vm.seconds()
            note("login prompt on the console")
            cores.release()
        limit = timeout
        if check.login_prompt is not None:
            limit = min(timeout, check.login_prompt + AGENT_GRACE)
        if vm.seconds() >= limit:
            note(f"the daemon's agent flag stayed down until {limit:.1f} s")
            return False
        await asyncio.sleep(FLAG_POLL)


async def _agent_unit(
    shell: ConsoleShell,
    check: LayoutCheck,
    adaptations: Sequence[Adaptation],
    note: Callable[[str], None],
) -> None:
    """Why an agent never reported, in its unit's words: LXD's and Incus's own agents listen on
    vsock before they write `STARTED`, so on a VM whose vsock device this machine took away
    (`no-vsock-device`) a failed agent unit is this machine's doing, not the image's."""
    try:
        await shell.login(LOGIN_TIMEOUT)
        for name in AGENT_UNITS:
            shown = await shell.run(
                "systemctl show -p LoadState -p ActiveState -p Result -p NRestarts "
                f"-p ConditionResult {name}",
                timeout=60,
            )
            unit = dict(line.split("=", 1) for line in shown.output.splitlines() if "=" in line)
            if unit.get("LoadState") == "loaded":
                break
        else:
            note(f"guest: none of {', '.join(AGENT_UNITS)}")
            return
        journal = await shell.run(f"journalctl -b -u {name} -o cat --no-pager -n 12", timeout=60)
    except VmError as e:
        note(f"the agent's unit could not be looked at: {e}")
        return
    check.agent_journal = [line for line in journal.output.splitlines() if line.strip()]
    state = f"{unit.get('ActiveState')} ({unit.get('Result')}, {unit.get('NRestarts')} restarts)"
    if unit.get("ConditionResult") == "no":
        # e.g. Debian's lxd-agent: ConditionPathExists on the port's /dev/virtio-ports link,
        # checked early in the boot (DefaultDependencies=no) and with no udev rule to retry.
        state += ", skipped: a condition of its unit was not met"
    check.agent_unit = f"{name}: {state}"
    note(f"guest: {name} {state}")
    vsock_taken = any(a.name == "no-vsock-device" for a in adaptations)
    ran = unit.get("ConditionResult") != "no"
    if vsock_taken and ran and unit.get("ActiveState") != "active":
        # The agent's own words (`Error: ...`, its setup script's) rather than systemd's.
        said = [line for line in check.agent_journal if not _systemds(line, name)]
        said = [line for line in said if "rror" in line] or said or check.agent_journal
        check.agent_unstartable = (
            f"{name} is {state} in a VM without a vsock device (this machine has no "
            f"/dev/vhost-vsock); it said: {said[-1] if said else 'nothing'}"
        )


def _systemds(line: str, unit: str) -> bool:
    """A journal line of systemd's about `unit` rather than the unit's own output."""
    return line.startswith((f"{unit}:", "Starting ", "Started ", "Stopping ", "Stopped ")) or (
        line.startswith("Failed to start ")
    )


async def _cycle_agent(
    vm: HostVm,
    shell: ConsoleShell,
    check: LayoutCheck,
    note: Callable[[str], None],
    state: Callable[[str, str, str], TimelineEntry],
) -> None:
    """Stop the agent's unit in the guest (the flag must go down: `STOPPED`), start it again
    (the flag must come back up)."""
    try:
        await shell.login(LOGIN_TIMEOUT)
        await shell.run(f"systemctl stop {AGENT_UNIT}", timeout=60)
        note(f"guest: systemctl stop {AGENT_UNIT}")
        if await _flag_becomes(vm, AgentFlag.DOWN, FLAG_CHANGE_TIMEOUT):
            check.stopped = state(STARTED, STOPPED, "the daemon's agent flag went down")
        else:
            note(f"the daemon's agent flag stayed up {FLAG_CHANGE_TIMEOUT:g} s")
        await shell.run(f"systemctl start {AGENT_UNIT}", timeout=60)
        note(f"guest: systemctl start {AGENT_UNIT}")
        if await _flag_becomes(vm, AgentFlag.UP, FLAG_CHANGE_TIMEOUT):
            state(STOPPED, STARTED, "the daemon's agent flag went up again")
        else:
            note(f"the daemon's agent flag stayed down {FLAG_CHANGE_TIMEOUT:g} s")
    except VmError as e:
        check.stopped_unchecked = f"no root shell on the daemon's console ({e})"
        note(check.stopped_unchecked)


HOST_KINDS = ("lxd", "incus")


async def vm_probes(progress: Progress) -> list[Adaptation]:
    """What a daemon's VM needs on this machine (`vm_config`): TCG where KVM fails the
    harness's probe, no vsock device without `/dev/vhost-vsock`."""
    accel = await choose_accel(Accel.AUTO, None, progress, arch=Arch.AMD64)
    found = (
        probes.tcg(accel.reason) if accel.accel is Accel.TCG else None,
        probes.vsock_device_missing(),
    )
    return [a for a in found if a is not None]


async def check_image_on_hosts(
    disk: Path,
    disk_format: str,
    hosts: Sequence[str],
    *,
    timeout: float,
    bound: float,
    raw_qemu_conf: Sequence[Override] = (),
    credentials: Sequence[tuple[str, str]] = (),
    host_socket: Path | None = None,
    progress: Progress = print,
) -> CheckVerdict:
    """`disk` checked on each of `hosts` (`lxd`, `incus`), one daemon at a time: a daemon of
    the harness's own, or the one listening on `host_socket`. Judged like the QEMU model's."""
    verdict = CheckVerdict(image=disk, firmware=Firmware.UEFI)
    for kind in hosts:
        verdict.checks.append(
            await _one_host(
                kind,
                disk,
                disk_format,
                timeout,
                bound,
                raw_qemu_conf,
                credentials,
                host_socket,
                progress,
            )
        )
    judge(verdict.checks)
    return verdict


async def _one_host(
    kind: str,
    disk: Path,
    disk_format: str,
    timeout: float,
    bound: float,
    raw_qemu_conf: Sequence[Override],
    credentials: Sequence[tuple[str, str]],
    host_socket: Path | None,
    progress: Progress,
) -> LayoutCheck:
    vm_adaptations = await vm_probes(progress)
    try:
        with contextlib.ExitStack() as stack:
            if host_socket is not None:
                client, info = running_daemon(kind, host_socket)
            else:
                daemon = stack.enter_context(local_daemon(kind, progress))
                client, info = daemon.client, daemon.started
            adaptations = [*info.adaptations, *vm_adaptations]
            return await check_on_host(
                client, info, disk, disk_format, adaptations, timeout, bound, raw_qemu_conf,
                progress, credentials,
            )  # fmt: skip
    except HarnessError as e:
        check = LayoutCheck(layout=kind, status_port="", must_report=kind == "lxd", bound=bound)
        check.error = e
        check.host = HostReport(kind=kind, version="", layout="")
        return check
