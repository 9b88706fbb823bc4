"""Warm starts: guests restored from a state saved once its first boot had reported `STARTED`.

Most VM tests are not about the boot: a kill, a stop and start, a replug, a command in the guest.
For those, `started_vm(config, warm=True)` restores a guest instead of booting one (about a
second instead of 10-45 s under TCG). The first time a boot is asked for, keyed by everything
that makes the guest what it is (the image, the layout and its ring size, the firmware and its
variable store, QEMU's version and machine type, memory, CPUs, the accelerator, the seed), a cold
boot runs to the agent's `STARTED` and a logged-in console, and is saved as LXD saves a stateful
snapshot (QMP `stop`, `migrate` to a file) with its disk overlay (and UEFI variables). Every guest
for that key, the first included, is then restored from it: QEMU started with `-incoming`, on a
fresh overlay of its own whose backing file is the saved one, so guests restored from one state
never share a writable disk.

A restore that QEMU refuses, or a restored guest whose agent does not report within one refresh,
falls back to a cold boot and says why (`WarmStart.how`, `WarmStart.reason`); the bad state is
removed. A guest with no agent to report has nothing to save at: it boots cold, and says so.

The ring's contents are not in a saved state (facts §4): a restored guest's host sees `STARTED`
only when the agent next writes. The save is timed a moment before the agent's next refresh, so
that write comes within about a second of the restore.

Host side only. Saved guests live in `<cache>/warm/<key>/`; the least recently used beyond
`KEEP_STATES` are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from lxd_agent.protocol import DEFAULT_REFRESH_SECONDS, STARTED
from lxd_agent_harness.base.cache import cache_root, least_recently_used
from lxd_agent_harness.base.errors import HarnessError, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.lxd.monitor import ONE_REFRESH
from lxd_agent_harness.qemu.disk import make_overlay
from lxd_agent_harness.qemu.process import qemu_version
from lxd_agent_harness.vm.config import DirectBoot, FirmwareBoot, VmConfig
from lxd_agent_harness.vm.firmware import machine_arg, ovmf_files
from lxd_agent_harness.vm.instance import BOOT_TIMEOUT, Vm

WARM_FORMAT = 1
"""Bumped when what is saved, or how, changes: older states are then never used."""

KEEP_STATES = 6
"""Saved guests kept (each a few hundred MB: the guest's memory, compressed zero pages, and its
disk overlay)."""

SAVE_AHEAD = 1.0
"""Seconds before the agent's next refresh at which the guest is saved."""

STATE_FILE = "state"
DISK_FILE = "disk.qcow2"
VARS_FILE = "uefi-vars.fd"
META_FILE = "warm.json"


class How(str, enum.Enum):
    WARM = "warm"
    """Restored from a saved guest."""
    COLD = "cold"
    """Booted."""


@dataclass(frozen=True)
class WarmStart:
    """How a guest came up, and why that way (for the test's output and the figures)."""

    how: How
    reason: str
    seconds: float = 0.0
    """From asking to a running guest (with `STARTED` seen, when warm)."""


class WarmStartError(HarnessError):
    """A guest could not be saved for warm starts (the reason is in the message); the caller
    boots cold."""


def _file_identity(path: Path) -> dict[str, object]:
    """A file as its path, size and time: images are never written in place (they are rebuilt
    into a new directory, or replaced), so these change whenever the contents do."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def warm_key(config: VmConfig, qemu: str) -> str:
    """A short hash of everything that makes a saved guest fit `config`; `qemu` is its version."""
    boot = config.boot
    if isinstance(boot, DirectBoot):
        booted: dict[str, object] = {
            "direct": [_file_identity(p) for p in (boot.image.disk, boot.image.kernel)],
            "initrd": _file_identity(boot.image.initrd),
            "append": boot.append,
        }
        machine = config.machine.machine
    else:
        booted = {
            "disk": _file_identity(boot.disk),
            "format": boot.disk_format,
            "firmware": boot.firmware.value,
            "secure_boot": boot.secure_boot,
        }
        machine = machine_arg(boot.firmware, boot.secure_boot, config.guest_arch)
    layout = config.layout
    inputs = {
        "format": WARM_FORMAT,
        "qemu": qemu,
        "arch": config.guest_arch.value,
        "machine": machine,
        "cpu": config.machine.tcg_cpu,
        "boot": booted,
        "layout": [layout.name, [repr(port) for port in layout.ports], layout.rule.value],
        "identity": layout.identity.smbios,
        "ring_size": config.ring_size or layout.ring_size,
        "memory_mib": config.memory_mib,
        "cpus": config.cpus,
        "accel": config.accel.value,
        "network": config.network.value,
        "credentials": [list(c) for c in config.credentials],
        "raw_qemu_conf": [repr(o) for o in config.raw_qemu_conf],
        "user_qmp": config.user_qmp,
        "allow_reboot": config.allow_reboot,
        "seed": _file_identity(config.seed) if config.seed is not None else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SavedGuest:
    """A guest saved for warm starts: its state, its disk and (UEFI) its variables."""

    directory: Path

    @property
    def state(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def disk(self) -> Path:
        return self.directory / DISK_FILE

    @property
    def uefi_vars(self) -> Path:
        return self.directory / VARS_FILE

    @property
    def meta(self) -> Path:
        return self.directory / META_FILE

    def is_complete(self) -> bool:
        return self.meta.is_file() and self.state.is_file() and self.disk.is_file()


def warm_root() -> Path:
    return cache_root() / "warm"


def status_port(config: VmConfig) -> str:
    """The port whose `STARTED` marks the guest as up: the one its host reads."""
    return config.layout.rings[0].port_name


@contextlib.asynccontextmanager
async def started_vm(
    config: VmConfig,
    *,
    warm: bool,
    timeout: float = BOOT_TIMEOUT,
    progress: Progress | None = None,
    store: Path | None = None,
) -> AsyncIterator[tuple[Vm, WarmStart]]:
    """A running guest for `config` and how it started.

    Cold (`warm=False`): booted, and handed over at once (the guest still booting). Warm: restored
    from the saved guest for `config` (saved first if there is none), handed over once its host
    has seen `STARTED`; any failure on the way falls back to a cold boot, said in `WarmStart`.
    """
    async with contextlib.AsyncExitStack() as stack:
        yield await _start(stack, config, warm, timeout, progress, store or warm_root())


async def _start(
    stack: contextlib.AsyncExitStack,
    config: VmConfig,
    warm: bool,
    timeout: float,
    progress: Progress | None,
    root: Path,
) -> tuple[Vm, WarmStart]:
    say = progress or (lambda _message: None)
    began = time.monotonic()
    if not warm:
        vm = await stack.enter_async_context(Vm(config, progress=progress))
        return vm, WarmStart(How.COLD, "cold boot (warm starts off)", time.monotonic() - began)
    if config.overlay is not None or config.incoming is not None or config.uefi_vars is not None:
        raise VmError("a warm start makes its own overlay and state; give a config without them")
    try:
        key = warm_key(config, qemu_version(config.machine.qemu_binary))
        saved = SavedGuest(root / key)
        if not saved.is_complete():
            say(f"warm: no saved guest for this boot yet ({key}); booting one to save")
            await save_guest(config, saved, timeout, progress)
        # Its own stack: a failed restore is closed (QEMU gone) before the cold boot starts.
        restoring = contextlib.AsyncExitStack()
        try:
            vm = await _restore(restoring, config, saved, progress)
        except HarnessError as e:
            await restoring.aclose()
            shutil.rmtree(saved.directory, ignore_errors=True)
            raise WarmStartError(
                f"the restore of {key} failed ({e}); the saved guest is removed"
            ) from e
        except BaseException:
            await restoring.aclose()
            raise
        stack.push_async_exit(restoring)
        with contextlib.suppress(OSError):
            saved.directory.touch()  # most recently used
        start = WarmStart(How.WARM, f"restored from {key}", time.monotonic() - began)
        say(f"warm: {start.reason} in {start.seconds:.1f} s")
        return vm, start
    except WarmStartError as e:
        say(f"warm: falling back to a cold boot: {e}")
        vm = await stack.enter_async_context(Vm(config, progress=progress))
        return vm, WarmStart(How.COLD, f"cold boot: {e}", time.monotonic() - began)


async def _restore(
    stack: contextlib.AsyncExitStack, config: VmConfig, saved: SavedGuest, progress: Progress | None
) -> Vm:
    """A guest restored from `saved` on a fresh overlay of its own, its `STARTED` seen."""
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxd-agent-warm-")))
    overlay = work / "overlay.qcow2"
    make_overlay(saved.disk, "qcow2", overlay)
    uefi_vars = None
    if config.uses_uefi:
        uefi_vars = work / VARS_FILE
        shutil.copyfile(saved.uefi_vars, uefi_vars)
    restored = _with(config, overlay=overlay, uefi_vars=uefi_vars, incoming=saved.state)
    vm = await stack.enter_async_context(Vm(restored, progress=progress, shell_ready=True))
    # The ring's contents were not saved: the agent's next refresh must come, as after any
    # restore (the save was timed so that it comes within about a second).
    await vm.wait_for_state(STARTED, status_port(config), timeout=ONE_REFRESH)
    return vm


def _with(
    config: VmConfig, *, overlay: Path, uefi_vars: Path | None, incoming: Path | None
) -> VmConfig:
    return VmConfig(
        layout=config.layout,
        boot=config.boot,
        accel=config.accel,
        arch=config.arch,
        ring_size=config.ring_size,
        memory_mib=config.memory_mib,
        cpus=config.cpus,
        seed=config.seed,
        network=config.network,
        credentials=config.credentials,
        raw_qemu_conf=config.raw_qemu_conf,
        user_qmp=config.user_qmp,
        allow_reboot=config.allow_reboot,
        overlay=overlay,
        uefi_vars=uefi_vars,
        incoming=incoming,
    )


async def save_guest(
    config: VmConfig, saved: SavedGuest, timeout: float, progress: Progress | None = None
) -> None:
    """Boot `config` cold to `STARTED` and a logged-in console, and save it as `saved`.

    Built in a directory beside it and renamed into place: a failure leaves nothing, and a
    concurrent save of the same key keeps one of the two. A `WarmStartError` says why not.
    """
    root = saved.directory.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{saved.directory.name}-", dir=root))
    try:
        staged = SavedGuest(staging)
        make_overlay(*_base_disk(config), staged.disk)
        uefi_vars = None
        if config.uses_uefi:
            assert isinstance(config.boot, FirmwareBoot)
            uefi_vars = staged.uefi_vars
            # Vm makes a fresh store only when none is given: make it here, to keep it.
            template = ovmf_files(config.secure_boot, arch=config.guest_arch).vars_template
            shutil.copyfile(template, uefi_vars)
        booting = _with(config, overlay=staged.disk, uefi_vars=uefi_vars, incoming=None)
        started = time.monotonic()
        async with Vm(booting, progress=progress) as vm:
            port = status_port(config)
            try:
                await vm.wait_for_state(STARTED, port, timeout=timeout)
                await vm.login(timeout=timeout)
                await _wait_until_before_refresh(vm, port)
            except VmError as e:
                raise WarmStartError(
                    f"the boot to save never got to {STARTED} on {port} and a console shell ({e})"
                ) from e
            saved_state = await vm.save_state(staged.state)
        staged.meta.write_text(
            json.dumps(
                {
                    "format": WARM_FORMAT,
                    "layout": config.layout.name,
                    "port": port,
                    "boot_seconds": round(time.monotonic() - started, 1),
                    "state_bytes": saved_state.size,
                },
                indent=2,
            )
            + "\n"
        )
        try:
            staging.rename(saved.directory)
        except OSError:
            if not saved.is_complete():  # not another session's save of the same key
                raise
    except OSError as e:
        raise WarmStartError(f"could not keep the saved guest in {root}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in least_recently_used(root, KEEP_STATES, lambda d: SavedGuest(d).is_complete()):
        shutil.rmtree(old, ignore_errors=True)


def _base_disk(config: VmConfig) -> tuple[Path, str]:
    boot = config.boot
    if isinstance(boot, DirectBoot):
        return boot.image.disk, "raw"
    return boot.disk, boot.disk_format


async def _wait_until_before_refresh(vm: Vm, port: str) -> None:
    """Wait for the agent's next refresh write, then until `SAVE_AHEAD` s before the one after.

    QEMU reports each open of the port at once; the guest's clock stands still while it is
    saved, so the restored agent writes about `SAVE_AHEAD` s after the restore.
    """
    device = next(p.device_id for p in vm.config.layout.ports if p.name == port)
    monitor = vm.monitor
    seen = monitor.last_opened.get(device)
    deadline = time.monotonic() + ONE_REFRESH
    while monitor.last_opened.get(device) == seen:
        if time.monotonic() > deadline:
            return  # no refresh seen: save now, the restore just waits longer
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(DEFAULT_REFRESH_SECONDS - SAVE_AHEAD, 0.0))
