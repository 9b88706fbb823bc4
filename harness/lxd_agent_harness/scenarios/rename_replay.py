"""The specification replayed on real daemons: Debian's LXD 5.0.2, then the same LXD with the
status port's rename (`host.lxd_rename`), upgraded under a running VM.

Neither build is installed: each is a root of its own (`dpkg-deb -x`), and the upgrade is what a
package upgrade does to the daemon: SIGTERM to the old one (LXD leaves its instances running),
the new one started on the same state directory (`host.daemon.LocalDaemon.upgrade`). One
verdict per step, each from the daemon's side (its agent flag, its `qemu.conf`, its log), the
guest's console used only to act (stop and start the agent's unit) and to ask the agent which
port it reports on:
  1. `on-5.0.2`: our agent's `STARTED` read by LXD 5.0.2, whose `qemu.conf` is the `lxd-5.19`
     layout;
  2. `upgraded-while-running`: after the upgrade the VM still runs, and the new daemon reads a
     fresh cycle of the agent (its unit stopped: the flag goes down; started: up again), the
     specification's "Existing VMs will remain completely functional";
  3. `stateful-restore`: a stateful snapshot taken on LXD 5.0.2 (the VM is made with
     `migration.stateful`), first restored there as the control (it must load, and the daemon
     read the restored agent's `STARTED`), restored statefully after the upgrade fails as the
     specification says (QEMU's `Failed to load virtio-console` and `load of migration
     failed`: the bus has one more port), and restored statelessly it works (the cold start
     of step 5 boots it);
  4. `way-through` (README, "Restoring a pre-upgrade stateful snapshot on LXD 5.20 and later"):
     `raw.qemu.conf` on a profile the snapshot lists removes `[device "qemu_serial_legacy"]`,
     so the bus has 5.0.2's count of ports: the stateful restore loads and the daemon reads
     the restored agent's `STARTED`; then the key is removed (step 5's cold start moves the
     agent to `com.canonical.lxd`);
  5. `restarted`: the VM started cold by the new daemon (after the stateless restore) gets the
     new layout (its `qemu.conf` is `lxd-5.20`'s), our agent reports on `com.canonical.lxd`, and
     nothing holds the power-off on the chardev-less legacy port;
  6. `debian-agent` (when asked for, with a cloud disk carrying Debian's own `lxd-agent` 5.0.2):
     a control first, that disk on LXD 5.0.2 before the upgrade, which must read its `STARTED`;
     then the same disk on the rename build, which must never read it, with what that costs
     the boot and the power-off (the failure this project exists for). Each is `check`'s own
     run of a VM on the daemon (`scenarios.host_check`). When the control never reads
     `STARTED` (LXD's agent listens on vsock before it writes it, and this machine's VMs have
     no vsock device; or Debian's unit skipped itself), the step is `not-checked` and says why.
A step whose premise failed is `not-checked`, never a pass. Host side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME
from lxd_agent_harness.base.errors import DaemonError, HarnessError, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.host.config import read_sections, serial_differences
from lxd_agent_harness.host.daemon import LocalDaemon
from lxd_agent_harness.host.instance import AGENT_STARTED_LOG, AgentFlag, HostVm
from lxd_agent_harness.host.lxd_rename import debian_lxd_root, rename_build
from lxd_agent_harness.host.probes import Adaptation
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.scenarios.check import LayoutCheck
from lxd_agent_harness.scenarios.host_check import (
    FLAG_CHANGE_TIMEOUT,
    FLAG_POLL,
    LOGIN_TIMEOUT,
    check_on_host,
    open_console,
    vm_config,
    vm_probes,
)
from lxd_agent_harness.vm.console import ConsoleShell
from lxd_agent_harness.vm.lock import take_vm_lock
from lxd_agent_harness.vm.units import AGENT_UNIT

PASS, FAIL, NOT_CHECKED = "pass", "fail", "not-checked"
STEPS = ("on-5.0.2", "upgraded-while-running", "stateful-restore", "way-through", "restarted")
DEBIAN_AGENT_STEP = "debian-agent"
STOP_BOUND = 20.0
SNAPSHOT = "before-upgrade"
# A stateful snapshot saves the guest's memory: LXD wants the root disk's `size.state` above
# `limits.memory`. Half LXD's default memory halves the state written and read three times.
MEMORY = "512MiB"
STATE_SIZE = "1GiB"
# What QEMU says when a saved state meets one more port on the bus (the specification's
# "Limitations"; facts §5).
LOAD_FAILED = ("Failed to load virtio-console", "load of migration failed")
# The way through: the legacy port's section removed, so the bus has 5.0.2's count of ports.
LEGACY_SECTION = '[device "qemu_serial_legacy"]'


@dataclass
class Step:
    """One step of the specification and what the daemon showed for it."""

    name: str
    verdict: str = NOT_CHECKED
    seen: list[str] = field(default_factory=list)
    """What was seen, in order, each a short line (seconds since the VM's first start)."""
    daemon_lines: list[str] = field(default_factory=list)
    """The daemon's own log lines about the VM during the step."""


@dataclass
class ReplayVerdict:
    steps: list[Step]
    build: dict[str, Any] = field(default_factory=dict)
    """The rename build's record (`host.lxd_rename`: version, seconds, Go tests)."""
    error: HarnessError | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(step.verdict == PASS for step in self.steps)


async def _flag_becomes(vm: HostVm, wanted: AgentFlag, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while await vm.agent_flag() is not wanted:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(FLAG_POLL)
    return True


class _Replay:
    def __init__(
        self, disk: Path, debian_disk: Path | None, timeout: float, progress: Progress
    ) -> None:
        self.disk = disk
        self.debian_disk = debian_disk
        self.timeout = timeout
        self.progress = progress
        names = STEPS if debian_disk is None else (*STEPS, DEBIAN_AGENT_STEP)
        self.steps = {name: Step(name) for name in names}
        self.vm: HostVm | None = None
        self._log_seen = 0
        self.daemon: LocalDaemon | None = None
        self.profile = ""
        """The VM's own profile: this machine's raw.qemu.conf, and the way through's section."""
        self.raw_qemu_conf = ""

    def see(self, step: str, text: str, seconds: float | None = None) -> None:
        if seconds is None:
            seconds = self.vm.seconds() if self.vm is not None else 0.0
        self.steps[step].seen.append(f"{seconds:6.1f} s  {text}")
        self.progress(f"replay: {step}: {seconds:6.1f} s  {text}")

    def daemon_lines(self, step: str) -> None:
        """The daemon's log lines about the VM since the last step's."""
        assert self.vm is not None
        lines = self.vm.log_lines()
        self.steps[step].daemon_lines = lines[self._log_seen :]
        self._log_seen = len(lines)

    async def shell_in(self, stack: contextlib.AsyncExitStack) -> ConsoleShell:
        assert self.vm is not None
        console = open_console(self.vm, stack)
        if console is None:
            raise VmError("the daemon's console socket is not there")
        return ConsoleShell(console, lambda text: None)

    async def cycle(self, step: str, shell: ConsoleShell) -> bool:
        """Stop and start the agent's unit in the guest: the flag must go down, then up."""
        assert self.vm is not None
        await shell.login(LOGIN_TIMEOUT, attached_late=True)
        await shell.run(f"systemctl stop {AGENT_UNIT}", timeout=60)
        down = await _flag_becomes(self.vm, AgentFlag.DOWN, FLAG_CHANGE_TIMEOUT)
        self.see(step, f"unit stopped: the flag {'went down' if down else 'stayed up'}")
        await shell.run(f"systemctl start {AGENT_UNIT}", timeout=60)
        up = await _flag_becomes(self.vm, AgentFlag.UP, FLAG_CHANGE_TIMEOUT)
        self.see(step, f"unit started: the flag {'went up' if up else 'stayed down'}")
        return down and up

    def layout_differences(self, layout: str) -> list[str]:
        assert self.vm is not None
        conf = self.vm.qemu_conf() or ""
        return serial_differences(read_sections(conf, "the daemon's qemu.conf"), get_layout(layout))

    async def run(self, before: Path, after: Path) -> None:
        vm_adaptations = await vm_probes(self.progress)
        daemon = LocalDaemon(
            self.progress, "lxd", str(before / "usr/bin/lxd"), [before / "usr/bin"]
        )
        with daemon:
            adaptations = [*daemon.started.adaptations, *vm_adaptations]
            control = await self._debian_agent_control(daemon, adaptations)
            config = vm_config(adaptations)
            # The VM's raw.qemu.conf (this machine's adaptations) goes on a profile of its own:
            # a restore brings back the instance's own keys as the snapshot had them, and a
            # profile the snapshot lists as it is now (facts §11), so the way through goes there.
            self.raw_qemu_conf = config.pop("raw.qemu.conf", "")
            config |= {"migration.stateful": "true", "limits.memory": MEMORY}
            self.daemon = daemon
            self.profile = f"lxd-agent-replay-{secrets.token_hex(4)}"
            self.vm = vm = HostVm(
                daemon.client, daemon.started, self.disk, "qcow2", config, self.progress,
                profiles=(self.profile,), root_options={"size.state": STATE_SIZE},
            )  # fmt: skip
            async with contextlib.AsyncExitStack() as stack:
                await take_vm_lock(stack, self.progress, int(config.get("limits.cpu", "1")))
                await asyncio.to_thread(
                    daemon.client.request, "POST", "/1.0/profiles", {"name": self.profile}
                )
                stack.push_async_callback(self._delete_profile)  # after the VM is gone
                await self._set_profile(way_through=False)
                await stack.enter_async_context(vm)
                await self._on_5_0_2(stack)
                if self.steps["on-5.0.2"].verdict != PASS:
                    return
                snapshot = await self._snapshot_control()
                await self._upgraded(daemon, after, stack)
                failed = snapshot and await self._stateful_restore_fails()
                loaded = failed and await self._way_through()
                await self._restarted(stateless_restore=snapshot)
                self._snapshot_verdicts(snapshot, failed, loaded)
            if control is not None:
                await self._debian_agent_renamed(daemon, adaptations, control)

    async def _debian_agent_on(
        self, daemon: LocalDaemon, adaptations: list[Adaptation], where: str
    ) -> LayoutCheck:
        """Debian's agent's disk on the daemon as it is now, as `check --host lxd` runs it."""
        assert self.debian_disk is not None
        step = DEBIAN_AGENT_STEP
        check = await check_on_host(
            daemon.client, daemon.started, self.debian_disk, "qcow2", adaptations,
            self.timeout, STOP_BOUND, progress=self.progress,
        )  # fmt: skip
        if check.started is not None:
            self.see(step, f"{where}: STARTED read", check.started.seconds)
        elif check.login_prompt is not None:
            self.see(
                step, f"{where}: never STARTED (login prompt at that time)", check.login_prompt
            )
        if check.agent_unit:  # looked at just before the stop request
            self.see(step, f"{where}: guest: {check.agent_unit}", check.powered_down)
        if check.guest_off is not None and check.powered_down is not None:
            took = check.guest_off - check.powered_down
            self.see(step, f"{where}: stopped {took:.1f} s after the stop request", check.guest_off)
        elif check.power_off_held:
            self.see(step, f"{where}: not off {STOP_BOUND:g} s after the stop request: forced")
        self.steps[step].daemon_lines += list(check.host.log) if check.host is not None else []
        return check

    async def _debian_agent_control(
        self, daemon: LocalDaemon, adaptations: list[Adaptation]
    ) -> LayoutCheck | None:
        """The control, on LXD 5.0.2: None when the step cannot go on, having said why."""
        if self.debian_disk is None:
            return None
        step = DEBIAN_AGENT_STEP
        check = await self._debian_agent_on(daemon, adaptations, "control on LXD 5.0.2")
        if check.error is not None:
            self.see(step, f"not checked: the control did not run: {check.error}")
            return None
        if check.started is None:
            why = check.agent_unstartable or check.agent_unit or "its unit was not found"
            self.see(
                step,
                f"not checked: LXD 5.0.2 never read Debian's agent either ({why})",
                check.guest_off,
            )
            return None
        return check

    async def _debian_agent_renamed(
        self, daemon: LocalDaemon, adaptations: list[Adaptation], control: LayoutCheck
    ) -> None:
        step = DEBIAN_AGENT_STEP
        if self.steps["restarted"].verdict != PASS:
            self.see(step, "not checked: the rename build's step did not pass")
            return
        check = await self._debian_agent_on(daemon, adaptations, "on the rename build")
        if check.error is not None:
            self.see(step, f"the run failed: {check.error}")
            self.steps[step].verdict = FAIL
            return
        self.steps[step].verdict = PASS if check.started is None else FAIL

    async def _set_profile(self, way_through: bool) -> None:
        assert self.daemon is not None
        raw = self.raw_qemu_conf + (f"\n{LEGACY_SECTION}\n" if way_through else "")
        await asyncio.to_thread(
            self.daemon.client.request,
            "PATCH",
            f"/1.0/profiles/{self.profile}",
            {"config": {"raw.qemu.conf": raw}},
        )

    async def _delete_profile(self) -> None:
        assert self.daemon is not None
        with contextlib.suppress(HarnessError):  # the daemon is stopped next in any case
            await asyncio.to_thread(
                self.daemon.client.request, "DELETE", f"/1.0/profiles/{self.profile}"
            )

    async def _restored_agent_read(self, step: str, restored: str) -> bool:
        """Whether the daemon reads the agent of a VM restored from its saved state."""
        assert self.vm is not None
        up = await _flag_becomes(self.vm, AgentFlag.UP, FLAG_CHANGE_TIMEOUT)
        read = "the restored agent's STARTED read" if up else "the flag never went up"
        self.see(step, f"{restored}, {read}")
        return up

    async def _snapshot_control(self) -> bool:
        """The stateful snapshot on LXD 5.0.2, and the control: restored there statefully, it
        must load and the daemon read the restored agent's `STARTED`."""
        step = "stateful-restore"
        assert self.vm is not None
        try:
            await self.vm.snapshot(SNAPSHOT, stateful=True)
            self.see(step, f"stateful snapshot {SNAPSHOT} taken on LXD 5.0.2")
            await self.vm.restore(SNAPSHOT, stateful=True)
        except DaemonError as e:
            self.see(step, f"not checked: the control on LXD 5.0.2 failed: {e.error}")
            self.steps[step].daemon_lines = list(e.log_tail)
            return False
        up = await self._restored_agent_read(step, "control: restored statefully on LXD 5.0.2")
        if not up:
            self.see(step, "not checked: the control's restored agent was never read")
        return up

    async def _stateful_restore_fails(self) -> bool:
        """After the upgrade: the 5.0.2 snapshot's state meets one more port and fails to load,
        with QEMU's words for it."""
        step = "stateful-restore"
        assert self.vm is not None
        if self.steps["upgraded-while-running"].verdict != PASS:
            self.see(step, "not checked: the upgrade step did not pass")
            return False
        await self.vm.stop(STOP_BOUND)
        try:
            await self.vm.restore(SNAPSHOT, stateful=True)
        except DaemonError as e:
            said = [line for line in e.log_tail if any(words in line for words in LOAD_FAILED)]
            self.see(step, f"restored statefully on the rename build: refused ({e.error})")
            for line in said:
                self.see(step, f"qemu.log: {line}")
            self.steps[step].daemon_lines = list(e.log_tail)
            return all(any(words in line for line in said) for words in LOAD_FAILED)
        self.see(step, "restored statefully on the rename build: it loaded")
        await self.vm.stop(STOP_BOUND)
        return False

    async def _way_through(self) -> bool:
        """The profile's raw.qemu.conf removes the legacy port: the restore loads, and the
        restored agent's `STARTED` is read; then the key goes (the cold start is step 5's)."""
        step = "way-through"
        assert self.vm is not None
        await self._set_profile(way_through=True)
        self.see(step, f"the snapshot's profile {self.profile}: raw.qemu.conf {LEGACY_SECTION}")
        try:
            await self.vm.restore(SNAPSHOT, stateful=True)
        except DaemonError as e:
            self.see(step, f"restored statefully: refused ({e.error})")
            self.steps[step].daemon_lines = list(e.log_tail)
            return False
        up = await self._restored_agent_read(step, "restored statefully: loaded")
        self.daemon_lines(step)
        await self.vm.stop(STOP_BOUND)
        await self._set_profile(way_through=False)  # a running VM's raw.qemu.conf is fixed
        self.see(step, f"{LEGACY_SECTION} removed from the profile again")
        return up

    def _snapshot_verdicts(self, snapshot: bool, failed: bool, loaded: bool) -> None:
        """Both need step 5's cold start: the stateless restore boots, and the agent moves."""
        restarted = self.steps["restarted"].verdict == PASS
        if snapshot and self.steps["upgraded-while-running"].verdict == PASS:
            self.steps["stateful-restore"].verdict = PASS if failed and restarted else FAIL
        if failed:
            self.steps["way-through"].verdict = PASS if loaded and restarted else FAIL
        else:
            self.see("way-through", "not checked: the stateful restore step did not pass")

    async def _on_5_0_2(self, stack: contextlib.AsyncExitStack) -> None:
        step = "on-5.0.2"
        assert self.vm is not None
        await self.vm.start()
        self.see(step, f"LXD {self.vm.info.version} (Debian's build) started the VM")
        differences = self.layout_differences("lxd-5.19")
        self.see(step, f"its qemu.conf against lxd-5.19: {len(differences)} differences")
        up = await _flag_becomes(self.vm, AgentFlag.UP, self.timeout)
        self.see(step, f"{LEGACY_PORT_NAME}: STARTED" if up else "the flag never went up")
        self.daemon_lines(step)
        ok = up and not differences
        self.steps[step].verdict = PASS if ok else FAIL

    async def _upgraded(
        self, daemon: LocalDaemon, after: Path, stack: contextlib.AsyncExitStack
    ) -> None:
        step = "upgraded-while-running"
        assert self.vm is not None
        info = await asyncio.to_thread(
            daemon.upgrade, str(after / "usr/bin/lxd"), [after / "usr/bin"]
        )
        self.vm.info = info
        self.see(step, f"the daemon upgraded to the rename build ({after})")
        status = await self.vm.status()
        self.see(step, f"the VM is {status}")
        shell = await self.shell_in(stack)
        cycled = status == "Running" and await self.cycle(step, shell)
        self.daemon_lines(step)
        read = any(AGENT_STARTED_LOG in line for line in self.steps[step].daemon_lines)
        self.see(step, f"the new daemon logged {AGENT_STARTED_LOG}: {read}")
        self.steps[step].verdict = PASS if cycled and read else FAIL

    async def _restarted(self, stateless_restore: bool) -> None:
        step = "restarted"
        assert self.vm is not None
        if self.steps["upgraded-while-running"].verdict != PASS:
            self.see(step, "not checked: the upgrade step did not pass")
            return
        if await self.vm.status() == "Running":
            took = await self.vm.stop(STOP_BOUND)
            self.see(step, f"stopped in {took:.1f} s" if took is not None else "stop held: forced")
        if stateless_restore:
            await self.vm.restore(SNAPSHOT, stateful=False)
            self.see(step, f"{SNAPSHOT} restored statelessly")
            self.see("stateful-restore", f"{SNAPSHOT} restored statelessly: see restarted")
        await self.vm.start()
        differences = self.layout_differences("lxd-5.20")
        self.see(step, f"its qemu.conf against lxd-5.20: {len(differences)} differences")
        old = self.layout_differences("lxd-5.19")
        up = await _flag_becomes(self.vm, AgentFlag.UP, self.timeout)
        self.see(step, "the flag went up" if up else "the flag never went up")
        port = ""
        async with contextlib.AsyncExitStack() as stack:
            shell = await self.shell_in(stack)
            await shell.login(LOGIN_TIMEOUT, attached_late=True)
            status = await shell.run(f"systemctl show -p StatusText {AGENT_UNIT}", timeout=60)
            port = PORT_NAME if f"reporting to {PORT_NAME}" in status.output else ""
            self.see(step, f"the agent says: {status.output.strip()}")
        held = await self.vm.stop(STOP_BOUND)
        self.see(step, f"stopped in {held:.1f} s" if held is not None else "stop held: forced")
        self.daemon_lines(step)
        ok = up and not differences and bool(old) and port == PORT_NAME and held is not None
        self.steps[step].verdict = PASS if ok else FAIL


async def replay_rename(
    disk: Path,
    timeout: float = 300.0,
    progress: Progress = print,
    debian_agent_disk: Path | None = None,
) -> ReplayVerdict:
    """The replay on `disk` (a cloud image with our agent), and step 4 with `debian_agent_disk`;
    its verdict, never raising for a step that failed (a `HarnessError` ends the replay and is
    kept)."""
    build = await asyncio.to_thread(rename_build, progress)
    before = await asyncio.to_thread(debian_lxd_root, progress)
    after = await asyncio.to_thread(build.root)
    replay = _Replay(disk, debian_agent_disk, timeout, progress)
    verdict = ReplayVerdict(steps=list(replay.steps.values()), build=build.record)
    try:
        await replay.run(before, after)
    except HarnessError as e:
        verdict.error = e
    return verdict
