"""The rename across a stateful snapshot, as one scenario: saved on LXD 5.19, restored after it.

The specification's "Limitations" says a state saved before the upgrade cannot be restored after
it (LXD 5.20 adds a port; QEMU refuses the state), and its "Compatibility" says running VMs go
on working after the upgrade and switch ports at their next start. The scenario runs both on
one disk (a qcow2 overlay kept in its own temporary directory), in these steps:

1. boot on lxd-5.19 (LXD's 3 ports): the agent reports STARTED on `org.linuxcontainers.lxd`;
2. the host upgraded while the VM runs: the monitor that read the ring goes (the ring read
   empty), a new one attaches on its own QMP connection, reading the chardev LXD 5.20 reads,
   and sees STARTED within one refresh;
3. save: QMP `stop` + `migrate` to a file, the layout recorded next to it (JSON);
4. restore on lxd-5.20: QEMU refuses, with the specification's lines;
5. the way through for an LXD user: restore into lxd-5.20's configuration with its
   `raw.qemu.conf` applied (by default `[device "qemu_serial_legacy"]`, removing the chardev-less
   stub: 5.19's port count, which is what QEMU checks): the state loads, the guest's agent
   keeps writing to the port it saw at boot, which is now the one on LXD 5.20's ring, and the
   host reads STARTED there within one refresh; power-off: STOPPED. On an overlay of its own
   over the disk as saved, so the steps after it find that disk as it was;
6. restore with the saved layout pinned: the guest resumes and the host reads STARTED on the
   port the guest saw at boot within one refresh (ring contents are not saved); power-off;
7. restart on lxd-5.20 (a new QEMU on the same disk, as LXD does at the VM's next start): the
   agent now reports on `com.canonical.lxd`; power-off.

The first step that fails ends the run. Every QEMU runs through `vm.Vm` (so it holds the
machine's VM lock), every wait is bounded, and the temporary directory (overlay, state file,
record) goes on every exit path. Like every scenario it returns a verdict and never prints.
Host side only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxd_agent.protocol import STARTED
from lxd_agent_harness.base.errors import HarnessError, LayoutError, RestoreRefused, StepMismatch
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.lxd.layouts import (
    LXD_5_19,
    LXD_5_20,
    Layout,
    Ring,
    get_layout,
    lxd_ring_port,
)
from lxd_agent_harness.lxd.monitor import ONE_REFRESH, RingbufMonitor, TimelineEntry
from lxd_agent_harness.lxd.qemu_conf import Override, parse_raw_qemu_conf
from lxd_agent_harness.qemu.disk import make_overlay
from lxd_agent_harness.qemu.migration import SavedState, is_specification_refusal
from lxd_agent_harness.scenarios.boot import BootVerdict, boot_and_check
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from lxd_agent_harness.vm.instance import Vm

SAVED_ON = LXD_5_19
UPGRADED = LXD_5_20

"""The longest a host that starts reading with an empty ring may wait for STARTED."""

# -- the layout saved with the state ------------------------------------------------------------


@dataclass(frozen=True)
class LayoutRecord:
    """The layout a state was saved with, written next to it: what a restore must rebuild."""

    layout: str
    ports: tuple[str, ...]
    ring_size: int

    @classmethod
    def of(cls, layout: Layout) -> LayoutRecord:
        return cls(layout.name, layout.port_names, layout.ring_size)

    def write(self, path: Path) -> None:
        data = {"layout": self.layout, "ports": list(self.ports), "ring_size": self.ring_size}
        path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> LayoutRecord:
        try:
            data: Any = json.loads(path.read_text())
            return cls(str(data["layout"]), tuple(map(str, data["ports"])), int(data["ring_size"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LayoutError(
                f"could not read the layout recorded with the state, {path} ({e}); "
                "save the state again"
            ) from None

    def pinned(self) -> Layout:
        """The recorded layout, checked port by port against the harness's own of that name."""
        layout = get_layout(self.layout)
        if layout.port_names != self.ports or layout.ring_size != self.ring_size:
            raise LayoutError(
                f"the state was saved with {self.layout} as ports {list(self.ports)} "
                f"(ring {self.ring_size} B); the harness's {self.layout} now has "
                f"{list(layout.port_names)} (ring {layout.ring_size} B): QEMU would refuse it"
            )
        return layout


def upgraded_host_rings(upgraded: Layout, running: Layout) -> tuple[Ring, ...]:
    """What an upgraded host reads in a VM started by the old one: its own status chardev,
    behind whichever port the running VM has on it."""
    ids = {ring.chardev_id for ring in upgraded.rings}
    rings = tuple(ring for ring in running.rings if ring.chardev_id in ids)
    if not rings:
        raise LayoutError(
            f"{upgraded.name}'s host reads chardev(s) {sorted(ids)}, which a VM started with "
            f"{running.name} does not have: it could not read the running VM's status"
        )
    return tuple(Ring(ring.port_name, ring.chardev_id, upgraded.rule) for ring in rings)


# -- the verdict --------------------------------------------------------------------------------


class Step(str, enum.Enum):
    BOOT = f"boot on {SAVED_ON.name}"
    HOST_UPGRADE = "host upgraded while the VM runs"
    SAVE = "save the state"
    RESTORE_UPGRADED = f"restore on {UPGRADED.name}"
    RESTORE_RAW_CONF = f"restore on {UPGRADED.name} with raw.qemu.conf"
    RESTORE_PINNED = "restore with the saved layout pinned"
    RESTART = f"restart on {UPGRADED.name}"


EXPECTED = {
    Step.BOOT: f"the agent reports STARTED on {lxd_ring_port(SAVED_ON)}",
    Step.HOST_UPGRADE: "a new monitor (the old one gone, the ring read empty) reads STARTED "
    f"within one refresh ({ONE_REFRESH:g} s)",
    Step.SAVE: "QMP stop + migrate write the state to a file; the layout is recorded next to it",
    Step.RESTORE_UPGRADED: "QEMU refuses the state (a port more than saved) with the "
    "specification's lines",
    Step.RESTORE_RAW_CONF: f"QEMU loads the state into {UPGRADED.name}'s configuration with "
    "the raw.qemu.conf applied; the guest's agent writes on to the port it saw at boot, and "
    f"the host reads STARTED from {UPGRADED.name}'s ring ({lxd_ring_port(UPGRADED)}) within "
    f"one refresh ({ONE_REFRESH:g} s) of the resume; power-off: STOPPED, off",
    Step.RESTORE_PINNED: f"the guest resumes; STARTED on {lxd_ring_port(SAVED_ON)} within one "
    f"refresh ({ONE_REFRESH:g} s) of the resume; power-off: STOPPED, off",
    Step.RESTART: f"a new QEMU on the same disk; the agent reports on {lxd_ring_port(UPGRADED)}; "
    "power-off: STOPPED, off",
}
"""What each step must show, in words."""


@dataclass
class StepVerdict:
    """One step: what it must show, what it saw, and its timeline (seconds since its QEMU start)."""

    step: Step
    layout: str
    error: HarnessError | None = None
    """Why the step failed, with its fields; None: it behaved as described."""
    port: str | None = None
    """The port the host read STARTED on."""
    started_after: float | None = None
    """Seconds from `since` to STARTED."""
    since: str = ""
    bound: float | None = None
    """The most `started_after` may be, where the step has a bound."""
    stopped_after_power_off: float | None = None
    off_after_power_off: float | None = None
    saved: SavedState | None = None
    record: LayoutRecord | None = None
    exit_status: int | None = None
    """QEMU's exit status where it refused the state."""
    qemu_output: list[str] = field(default_factory=list)
    """QEMU's own lines where it refused the state."""
    timeline: list[str] = field(default_factory=list)
    seconds: float = 0.0
    """How long the step took, wall clock (with any wait for another harness VM's lock)."""

    @property
    def expected(self) -> str:
        return EXPECTED[self.step]

    @property
    def passed(self) -> bool:
        return self.error is None


@dataclass
class SnapshotVerdict:
    steps: list[StepVerdict] = field(default_factory=list)
    planned: tuple[Step, ...] = tuple(Step)
    """The steps this run was to take (an old agent's run ends after the way through)."""
    workdir: Path | None = None
    """The temporary directory of the overlay, the state and the record (gone afterwards)."""

    @property
    def passed(self) -> bool:
        ran = tuple(step.step for step in self.steps)
        return ran == self.planned and all(step.passed for step in self.steps)

    def step(self, step: Step) -> StepVerdict | None:
        return next((s for s in self.steps if s.step is step), None)


# -- the scenario ---------------------------------------------------------------------------------


WAY_THROUGH = '[device "qemu_serial_legacy"]\n'
"""The `raw.qemu.conf` that gives an LXD >= 5.20 VM LXD 5.19's port count (facts §11)."""


@dataclass(frozen=True)
class _Run:
    image: GuestImage
    accel: Accel
    timeout: float
    progress: Progress
    workdir: Path
    raw_qemu_conf: tuple[Override, ...]
    old_agent: bool

    @property
    def overlay(self) -> Path:
        return self.workdir / "overlay.qcow2"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def record(self) -> Path:
        return self.workdir / "state.json"

    def config(self, layout: Layout, incoming: Path | None = None, **more: Any) -> VmConfig:
        return VmConfig(
            layout=layout,
            boot=DirectBoot(self.image),
            accel=self.accel,
            overlay=self.overlay,
            incoming=incoming,
            **more,
        )


async def snapshot_and_restore(
    image: GuestImage,
    accel: Accel,
    timeout: float,
    progress: Progress | None = None,
    raw_qemu_conf: tuple[Override, ...] | None = None,
    old_agent: bool = False,
) -> SnapshotVerdict:
    """Run the steps (module docstring) on `image`; each wait bounded by `timeout`.
    `raw_qemu_conf`: what the restore on the upgraded host applies (default `WAY_THROUGH`).

    `old_agent`: the image carries LXD 5.0's agent (the real case: an old agent in an old
    snapshot). Its unit is started by hand once the guest is up, as it runs in an old VM (at
    boot its start races udev, README's matrix), and the run ends after the way through: on a
    plain LXD 5.20 that agent never reports, it knows only the old name.
    """
    verdict = SnapshotVerdict()
    if old_agent:
        verdict.planned = tuple(Step)[: tuple(Step).index(Step.RESTORE_RAW_CONF) + 1]
    if raw_qemu_conf is None:
        raw_qemu_conf = tuple(parse_raw_qemu_conf(WAY_THROUGH))
    with tempfile.TemporaryDirectory(prefix="lxd-agent-snapshot-") as tmp:
        run = _Run(
            image,
            accel,
            timeout,
            progress or (lambda _m: None),
            Path(tmp),
            raw_qemu_conf,
            old_agent,
        )
        verdict.workdir = run.workdir
        try:
            make_overlay(image.disk, "raw", run.overlay)
        except HarnessError as e:
            verdict.steps.append(StepVerdict(Step.BOOT, SAVED_ON.name, error=e))
            return verdict
        for steps in (
            _boot_upgrade_save,
            _restore_upgraded,
            _restore_raw_conf,
            _restore_pinned,
            _restart,
        ):
            if _STEPS_OF[steps][0] not in verdict.planned:
                break
            run.progress(f"--- {', '.join(s.value for s in _STEPS_OF[steps])} ---")
            await steps(run, verdict)
            if not verdict.steps[-1].passed:
                break
    return verdict


async def _boot_upgrade_save(run: _Run, verdict: SnapshotVerdict) -> None:
    boot = StepVerdict(Step.BOOT, SAVED_ON.name, since="QEMU start")
    verdict.steps.append(boot)
    marks: dict[str, float] = {}
    started = time.monotonic()

    async def upgrade_and_save(vm: Vm) -> None:
        marks["upgrade"] = vm.seconds()
        boot.seconds = vm.seconds()  # from QEMU's start: not the wait for the VM lock
        upgrade = await _host_upgrade(vm, run.timeout)
        verdict.steps.append(upgrade)
        if not upgrade.passed:
            return
        # Logged in before the save, so that a restored guest's console takes commands.
        await vm.login(timeout=run.timeout)
        marks["save"] = vm.seconds()
        save = StepVerdict(Step.SAVE, vm.config.layout.name)
        verdict.steps.append(save)
        begun = time.monotonic()
        try:
            save.saved = await vm.save_state(run.state)
            save.record = LayoutRecord.of(vm.config.layout)
            save.record.write(run.record)
            ports = ", ".join(save.record.ports)
            vm.note(f"layout recorded in {run.record.name}: {save.record.layout} ({ports})")
        except HarnessError as e:
            save.error = e
        save.seconds = time.monotonic() - begun

    async def start_old_agent(vm: Vm) -> None:
        await vm.login(timeout=run.timeout)
        started = await vm.run("systemctl start --no-block lxd-agent")
        vm.note(f"LXD 5.0's unit started by hand (exit status {started.status})")

    config = run.config(SAVED_ON, user_qmp=True)  # the upgraded host's monitor connects there
    result = await boot_and_check(
        config,
        run.timeout,
        run.progress,
        hold=upgrade_and_save,
        prepare=start_old_agent if run.old_agent else None,
    )
    boot.port, boot.started_after = result.port, _seconds(result.started)
    cut = marks.get("upgrade", float("inf"))
    boot.timeline = [e.render() for e in result.entries if e.seconds < cut]
    if "save" in marks:
        verdict.steps[-1].timeline = [
            e.render() for e in result.entries if e.seconds >= marks["save"]
        ]
    if result.error is not None:
        # Before the hold: the boot failed; after it: the step that was running.
        failed = boot if "upgrade" not in marks else verdict.steps[-1]
        failed.error = failed.error or result.error
    if "upgrade" not in marks:
        boot.seconds = time.monotonic() - started


async def _host_upgrade(vm: Vm, timeout: float) -> StepVerdict:
    step = StepVerdict(
        Step.HOST_UPGRADE, vm.config.layout.name, since="the new monitor's start", bound=ONE_REFRESH
    )
    begun = time.monotonic()
    try:
        rings = upgraded_host_rings(UPGRADED, vm.config.layout)
        # The old host's last read empties the ring: the new one needs a fresh line.
        await vm.monitor.read_rings("the old host's last read")
        await vm.monitor.stop()
        vm.note(f"the old host's monitor stopped; {UPGRADED.name}'s host attaches")
        client = await vm.second_qmp("upgraded-host")
        async with RingbufMonitor(client, rings, t0=vm.t0, read_size=vm.ring_read_size) as new:
            attached = new.note(f"{UPGRADED.name}'s monitor attached on its own QMP connection")
            try:
                entry = await new.wait_for(STARTED, port=rings[0].port_name, timeout=timeout)
                step.port = entry.port
                step.started_after = entry.seconds - attached.seconds
                check_bound(step)
            finally:
                step.timeline = new.render_timeline()
    except HarnessError as e:
        step.error = e
    step.seconds = time.monotonic() - begun
    return step


async def _restore_upgraded(run: _Run, verdict: SnapshotVerdict) -> None:
    step = StepVerdict(Step.RESTORE_UPGRADED, UPGRADED.name)
    verdict.steps.append(step)
    begun = time.monotonic()
    try:
        async with Vm(run.config(UPGRADED, incoming=run.state), run.progress) as vm:
            step.timeline = vm.render_timeline()
            step.error = StepMismatch(
                f"QEMU loaded the state saved on {SAVED_ON.name} into {UPGRADED.name}'s "
                "layout; the specification says it refuses it",
                expected=step.expected,
                seen="the guest resumed",
            )
    except RestoreRefused as e:
        step.exit_status, step.qemu_output, step.timeline = e.exit_status, e.qemu_output, e.timeline
        if not is_specification_refusal(e.qemu_output):
            step.error = StepMismatch(
                "QEMU refused the state, but not with the specification's lines: see its output",
                expected=step.expected,
                seen=" / ".join(e.qemu_output[-3:]),
            )
    except HarnessError as e:
        step.error = e
    step.seconds = time.monotonic() - begun


async def _restore_raw_conf(run: _Run, verdict: SnapshotVerdict) -> None:
    step = StepVerdict(Step.RESTORE_RAW_CONF, UPGRADED.name, since="the resume", bound=ONE_REFRESH)
    verdict.steps.append(step)
    begun = time.monotonic()
    overlay = run.workdir / "overlay-raw-conf.qcow2"
    try:
        make_overlay(run.overlay, "qcow2", overlay)
    except HarnessError as e:
        step.error = e
        return
    resumed: list[float] = []

    async def note_resume(vm: Vm) -> None:
        since = vm.since_start(vm.running_at)
        assert since is not None
        resumed.append(since)
        # What the guest itself calls the port it writes to: the name it saw at boot.
        names = await vm.run("cat /sys/class/virtio-ports/vport*p1/name")
        vm.note(f"the guest's first port is named {names.output.strip()!r} in the guest")

    config = dataclasses.replace(
        run.config(UPGRADED, incoming=run.state),
        overlay=overlay,
        raw_qemu_conf=run.raw_qemu_conf,
    )
    result = await boot_and_check(
        config, run.timeout, run.progress, while_up=note_resume, shell_ready=True
    )
    _from_boot(step, result)
    if result.passed and result.started is not None and resumed:
        step.started_after = result.started.seconds - resumed[0]
        check_bound(step)
    step.seconds = time.monotonic() - begun


async def _restore_pinned(run: _Run, verdict: SnapshotVerdict) -> None:
    step = StepVerdict(Step.RESTORE_PINNED, SAVED_ON.name, since="the resume", bound=ONE_REFRESH)
    verdict.steps.append(step)
    begun = time.monotonic()
    try:
        layout = LayoutRecord.read(run.record).pinned()
    except HarnessError as e:
        step.error = e
        return
    step.layout = layout.name
    resumed: list[float] = []

    async def note_resume(vm: Vm) -> None:
        since = vm.since_start(vm.running_at)
        assert since is not None
        resumed.append(since)

    config = run.config(layout, incoming=run.state)
    result = await boot_and_check(config, run.timeout, run.progress, while_up=note_resume)
    _from_boot(step, result)
    if result.passed and result.started is not None and resumed:
        step.started_after = result.started.seconds - resumed[0]
        check_bound(step)
    step.seconds = time.monotonic() - begun


async def _restart(run: _Run, verdict: SnapshotVerdict) -> None:
    step = StepVerdict(Step.RESTART, UPGRADED.name, since="QEMU start")
    verdict.steps.append(step)
    begun = time.monotonic()
    result = await boot_and_check(run.config(UPGRADED), run.timeout, run.progress)
    _from_boot(step, result)
    step.started_after = _seconds(result.started)
    step.seconds = time.monotonic() - begun


_STEPS_OF = {
    _boot_upgrade_save: (Step.BOOT, Step.HOST_UPGRADE, Step.SAVE),
    _restore_upgraded: (Step.RESTORE_UPGRADED,),
    _restore_raw_conf: (Step.RESTORE_RAW_CONF,),
    _restore_pinned: (Step.RESTORE_PINNED,),
    _restart: (Step.RESTART,),
}


def _from_boot(step: StepVerdict, result: BootVerdict) -> None:
    step.error = result.error
    step.port = result.port if result.started is not None else None
    step.stopped_after_power_off = result.stopped_after_power_off
    step.off_after_power_off = result.off_after_power_off
    step.timeline = result.timeline


def check_bound(step: StepVerdict) -> None:
    """Fail `step` with a `StepMismatch` if STARTED came later than its bound."""
    assert step.started_after is not None and step.bound is not None
    if step.started_after > step.bound:
        step.error = StepMismatch(
            f"STARTED came {step.started_after:.2f} s after {step.since}, later than one "
            f"refresh ({step.bound:g} s): the agent's refresh did not reach the host in time",
            expected=step.expected,
            seen=f"STARTED after {step.started_after:.2f} s",
        )


def _seconds(entry: TimelineEntry | None) -> float | None:
    return None if entry is None else entry.seconds
