"""Choose between KVM and TCG, and say why: KVM only after a probe boot proved it runs a guest here.

`/dev/kvm` exists on machines where KVM does not hold up (facts §6), so `auto` boots a probe guest
under KVM, keeps it busy, and caches the verdict per host (kernel, QEMU build, CPU) in the harness's
cache directory. Host side only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import GuestStopped, HarnessError, QemuError, VmError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.qemu.process import DEFAULT_QEMU_BINARY, qemu_version
from lxd_agent_harness.vm.accel import Accel, AccelChoice
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig
from lxd_agent_harness.vm.console import SHELL_PROMPT
from lxd_agent_harness.vm.instance import Vm

KVM_PROBE_BOOT_TIMEOUT = 60.0
# Broken KVM here kills stock Debian kernels 60-150 s into a boot (facts §6): a probe that only
# boots would pass and the real run would die later, so the probe keeps the guest busy this long.
KVM_PROBE_SOAK_SECONDS = 180.0


def _kvm_verdict_path() -> Path:
    return cache_root() / "kvm-verdict.json"


def _host_identity() -> dict[str, str]:
    """What the KVM verdict depends on: host kernel, QEMU build, CPU model."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = ""
    with contextlib.suppress(VmError):
        qemu = qemu_version(DEFAULT_QEMU_BINARY)
    return {"kernel": os.uname().release, "qemu": qemu, "cpu": cpu}


def forget_kvm_verdict() -> None:
    with contextlib.suppress(OSError):
        _kvm_verdict_path().unlink()


async def probe_kvm(image: GuestImage, progress: Progress) -> str | None:
    """Boot `image` under KVM and keep it busy; None if KVM held up, else what went wrong."""
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=Accel.KVM)
    vm = Vm(config)
    try:
        async with vm:
            await vm.console.wait_for(SHELL_PROMPT, KVM_PROBE_BOOT_TIMEOUT, what="a shell")
            progress(f"accel: KVM booted the probe guest; soaking {KVM_PROBE_SOAK_SECONDS:.0f} s")
            deadline = time.monotonic() + KVM_PROBE_SOAK_SECONDS
            while time.monotonic() < deadline:
                try:
                    await vm.run("sha256sum /usr/bin/* >/dev/null 2>&1; uptime", timeout=60)
                except VmError:
                    await vm.check_running()  # the hypervisor's error says more than a timeout
                    raise
                await vm.check_running()
            return None
    except HarnessError as e:
        if not vm.qemu_started and not isinstance(e, QemuError):
            # Failed before QEMU ran (the VM lock, the overlay): says nothing about KVM.
            raise KvmProbeInconclusive(str(e)) from e
        return probe_failure_reason(e)


def probe_failure_reason(error: HarnessError) -> str:
    """The verdict to cache for a failed probe: QEMU's own words when it said something.

    QEMU's output names the failure (`KVM internal error. Suberror: 1`); the launcher's message
    only frames it. The pty notice QEMU prints at every start is left out.
    """
    if isinstance(error, QemuError):
        output = error.output
    elif isinstance(error, VmError):
        output = error.qemu_output
    else:
        output = []
    said = [line for line in output if line.strip() and "redirected to" not in line]
    return (" | ".join(said) if said else str(error))[:300]


def forget_verdict_after(error: BaseException, accel: Accel) -> bool:
    """After a failed boot: if KVM itself broke, forget the cached verdict; whether it did.

    A verdict said KVM holds up here; a hypervisor error under KVM proves it wrong, so the
    next `auto` run probes again instead of trusting it.
    """
    if accel is Accel.KVM and isinstance(error, GuestStopped) and error.hypervisor_failed:
        forget_kvm_verdict()
        return True
    return False


class KvmUnusable(HarnessError):
    """KVM was asked for where it cannot run the guest."""


class KvmProbeInconclusive(HarnessError):
    """The KVM probe could not run its guest; no verdict on KVM, so none is cached."""


async def choose_accel(
    requested: Accel,
    image: GuestImage | None,
    progress: Progress = print,
    arch: Arch | None = None,
) -> AccelChoice:
    """The accelerator to use and why. `auto` picks KVM only if a probe boot held up here.

    A guest of another architecture than the host's (`arch`, else the image's) runs under TCG:
    KVM runs only the host's own.
    """
    guest = arch or (image.arch if image is not None else None)
    if guest is not None and guest is not host_arch():
        if requested is Accel.KVM:
            raise KvmUnusable(
                f"KVM cannot run an {guest.value} guest on this {host_arch().value} host; "
                "use --accel tcg (or auto)"
            )
        return AccelChoice(Accel.TCG, f"TCG: an {guest.value} guest on an {host_arch().value} host")
    if requested is Accel.TCG:
        return AccelChoice(Accel.TCG, "TCG requested")
    if requested is Accel.KVM:
        return AccelChoice(Accel.KVM, "KVM requested (not probed)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice(Accel.TCG, "TCG: /dev/kvm is missing or not usable by this user")
    identity = _host_identity()
    path = _kvm_verdict_path()
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
        if cached.get("host") == identity:
            return _choice_from(cached.get("error"), f"cached probe verdict in {path}")
    if image is None:
        return AccelChoice(Accel.TCG, "TCG: no guest image to probe KVM with")
    progress("accel: /dev/kvm exists; probing whether KVM really runs a guest here")
    try:
        error = await probe_kvm(image, progress)
    except KvmProbeInconclusive as e:
        return AccelChoice(Accel.TCG, f"TCG: the KVM probe could not run ({e}); nothing cached")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"host": identity, "error": error}, indent=2) + "\n")
    os.replace(partial, path)
    return _choice_from(error, "probe boot just now")


def _choice_from(error: object, source: str) -> AccelChoice:
    if error is None:
        return AccelChoice(Accel.KVM, f"KVM: a probe guest booted and held up ({source})")
    return AccelChoice(Accel.TCG, f"TCG: KVM failed a probe boot here ({source}): {error}")
