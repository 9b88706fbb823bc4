"""`lxd-agent-harness`: build the guest image, boot it with an LXD layout, see STARTED and STOPPED.

`boot` builds or reuses the image, boots it under QEMU with the chosen layout, waits for the
agent's `STARTED` on the ring LXD would read, presses the power button, waits for `STOPPED` and
for the guest to be off, and prints the timeline. It exits 0 only when both lines were seen, in
that order; 1 when the guest did not do it (the reason, the console tail and the timeline are
printed); 2 on bad input, before anything is built or booted. `image` only builds or reuses the
image and prints its directory.

Host side only: this is the one place that prints to the user and turns errors into exit codes;
it holds no QEMU or image logic of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lxd_agent.host.accel import Accel, choose_accel, forget_verdict_after
from lxd_agent.host.aptsources import DEFAULT_RELEASE, RELEASES
from lxd_agent.host.cloudimage import build_cloud_image, cloud_spec
from lxd_agent.host.disk import disk_format
from lxd_agent.host.errors import HarnessError, MonitorError, QemuError, VmError
from lxd_agent.host.firmware import Firmware
from lxd_agent.host.image import (
    BASE_PACKAGES,
    CLOUD_INIT_PACKAGES,
    GuestImage,
    ImageSpec,
    build_image,
)
from lxd_agent.host.layouts import (
    INCUS_RING_SIZE,
    LAYOUTS,
    Layout,
    check_ring_size,
    get_layout,
)
from lxd_agent.host.machine import DirectBoot, FirmwareBoot, VmConfig
from lxd_agent.host.package import find_deb
from lxd_agent.host.scenario import BootVerdict, boot_and_check
from lxd_agent.host.seed import make_seed_iso
from lxd_agent.host.snapshot import SnapshotVerdict, Step, snapshot_and_restore
from lxd_agent.host.vm import Vm
from lxd_agent.protocol import DEFAULT_RING_SIZE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_TIMEOUT = 120.0
# cloud-init runs late in the boot and installs the package first.
DEFAULT_SEED_TIMEOUT = 600.0


class UsageError(HarnessError):
    """Bad input on the command line: reported in one line, exit status 2."""


def say(message: str) -> None:
    print(message, flush=True)


def failure_lines(error: HarnessError) -> list[str]:
    """The error's one line, then what it carries: QEMU's output, the console, the timeline."""
    sections: list[tuple[str, list[str]]] = []
    if isinstance(error, QemuError):
        sections.append(("QEMU's output", error.output))
    if isinstance(error, VmError):
        sections += [
            ("QEMU's output (last lines)", error.qemu_output),
            ("console (last lines)", error.console_tail),
            ("timeline (seconds since QEMU start)", error.timeline),
        ]
    if isinstance(error, MonitorError):
        sections.append(("timeline (seconds since QEMU start)", error.timeline))
    lines = [f"FAILED: {error}"]
    for title, body in sections:
        if body:
            lines += [f"--- {title} ---", *body]
    return lines


# ---------------------------------------------------------------------------------------------
# Parsing and checking the input


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxd-agent-harness",
        description="Boot the lxd-agent in a real guest under QEMU with LXD's ring-buffer "
        "layouts and show, from the host, what it reported and when.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def image_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--deb", type=Path, help="the package (default: newest out/*.deb)")
        p.add_argument(
            "--release",
            default=DEFAULT_RELEASE,
            choices=list(RELEASES),
            help="Debian release of the guest, from the host's own mirror "
            f"(default {DEFAULT_RELEASE})",
        )
        p.add_argument(
            "--seed",
            action="store_true",
            help="build the image with cloud-init and without the package, "
            "and install the package at boot through a NoCloud seed",
        )
        p.add_argument("--rebuild", action="store_true", help="build the image even if cached")

    boot = sub.add_parser(
        "boot", help="boot a guest, wait for STARTED, power off, wait for STOPPED"
    )
    layouts = ", ".join(f"{name} ({layout.description})" for name, layout in LAYOUTS.items())
    boot.add_argument("--layout", default="lxd-5.20", help=f"one of: {layouts}")
    image_options(boot)
    boot.add_argument("--accel", default=Accel.AUTO.value, choices=[a.value for a in Accel])
    boot.add_argument(
        "--ring-size",
        help=f"bytes, power of two (default: the layout's, {DEFAULT_RING_SIZE} for LXD, "
        f"{INCUS_RING_SIZE} for Incus)",
    )
    boot.add_argument(
        "--image",
        type=Path,
        help="boot this qcow2/raw cloud image through its firmware instead "
        "(e.g. the one `image --cloud` prints)",
    )
    boot.add_argument(
        "--firmware",
        choices=[f.value for f in Firmware],
        help="firmware for --image: uefi (OVMF, LXD's; the default) or bios (SeaBIOS)",
    )
    boot.add_argument(
        "--secure-boot",
        action="store_true",
        help="UEFI secure boot with Microsoft's keys, as LXD's default (--image, uefi only)",
    )
    boot.add_argument("--timeout", type=str, help="seconds for each wait (default 120, 600 --seed)")
    boot.add_argument("--keep", action="store_true", help="leave the VM running until Ctrl-C")
    boot.add_argument("-v", "--verbose", action="store_true", help="print the whole timeline")

    snapshot = sub.add_parser(
        "snapshot",
        help="save a guest's state on lxd-5.19 and restore it after the upgrade: refused on "
        "lxd-5.20, resumed with the saved layout, then restarted on lxd-5.20",
    )
    snapshot.add_argument("--deb", type=Path, help="the package (default: newest out/*.deb)")
    snapshot.add_argument("--release", default=DEFAULT_RELEASE, choices=list(RELEASES))
    snapshot.add_argument("--rebuild", action="store_true", help="build the image even if cached")
    snapshot.add_argument("--accel", default=Accel.AUTO.value, choices=[a.value for a in Accel])
    snapshot.add_argument("--timeout", type=str, help="seconds for each wait (default 120)")

    image = sub.add_parser("image", help="build or reuse the guest image and print its directory")
    image_options(image)
    image.add_argument(
        "--cloud",
        action="store_true",
        help="build a GPT cloud disk (BIOS and UEFI GRUB, cloud-init) like Debian's "
        "genericcloud and print its qcow2 file",
    )
    return parser


@dataclass(frozen=True)
class BootPlan:
    layout: Layout
    deb: Path
    release: str
    accel: Accel
    ring_size: int | None
    user_image: Path | None
    firmware: Firmware
    secure_boot: bool
    seed: bool
    timeout: float
    keep: bool
    verbose: bool
    rebuild: bool


def _positive_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number of seconds; give e.g. 120") from None
    if not value > 0:
        raise UsageError(f"{what} must be more than 0 seconds, not {text}")
    return value


def plan_boot(args: argparse.Namespace) -> BootPlan:
    """Check every input before anything is built or booted."""
    layout = get_layout(args.layout)
    ring_size = None
    if args.ring_size is not None:
        try:
            ring_size = int(args.ring_size)
        except ValueError:
            raise UsageError(
                f"--ring-size {args.ring_size!r} is not an integer; give a power of two such as 16"
            ) from None
        check_ring_size(ring_size)
    if args.image is not None and not args.image.is_file():
        raise UsageError(f"looked for --image {args.image} and found nothing; give a cloud image")
    if args.image is None and (args.firmware is not None or args.secure_boot):
        raise UsageError(
            "--firmware and --secure-boot choose how --image boots; the project's own image "
            "boots its kernel directly: add --image FILE (e.g. from `image --cloud`)"
        )
    firmware = Firmware(args.firmware or Firmware.UEFI.value)
    if args.secure_boot and firmware is not Firmware.UEFI:
        raise UsageError("--secure-boot needs UEFI firmware; drop it or use --firmware uefi")
    seed = bool(args.seed or args.image is not None)
    timeout = (
        _positive_number(args.timeout, "--timeout")
        if args.timeout is not None
        else (DEFAULT_SEED_TIMEOUT if seed else DEFAULT_TIMEOUT)
    )
    return BootPlan(
        layout=layout,
        deb=find_deb(args.deb),
        release=args.release,
        accel=Accel(args.accel),
        ring_size=ring_size,
        user_image=args.image,
        firmware=firmware,
        secure_boot=args.secure_boot,
        seed=seed,
        timeout=timeout,
        keep=args.keep,
        verbose=args.verbose,
        rebuild=args.rebuild,
    )


def image_spec(deb: Path, release: str, seed: bool) -> ImageSpec:
    """The project's image: the package built in, or cloud-init and no package (`--seed`)."""
    if seed:
        return ImageSpec(release=release, packages=BASE_PACKAGES + CLOUD_INIT_PACKAGES)
    return ImageSpec(release=release, debs=(deb,))


# ---------------------------------------------------------------------------------------------
# Booting


def summary(verdict: BootVerdict) -> list[str]:
    """The timeline in a few lines: what a person wants to see first."""

    def at(seconds: float | None) -> str:
        return f"{seconds:7.2f} s" if seconds is not None else "      -  "

    lines = [f"  QEMU start        {0:7.2f} s", f"  kernel up         {at(verdict.kernel_up)}"]
    if verdict.started is not None:
        lines.append(f"  STARTED           {at(verdict.started.seconds)}   on {verdict.port}")
    if verdict.unit_state:
        lines.append(f"  agent unit        {verdict.unit_state}")
    lines.append(f"  power-off         {at(verdict.powered_down)}   (system_powerdown)")
    if verdict.stopped is not None and verdict.stopped_after_power_off is not None:
        lines.append(
            f"  STOPPED           {at(verdict.stopped.seconds)}   on {verdict.port}, "
            f"{verdict.stopped_after_power_off:.2f} s after power-off"
        )
    if verdict.off_after_power_off is not None:
        lines.append(
            f"  guest off         {at(verdict.guest_off)}   "
            f"{verdict.off_after_power_off:.2f} s after power-off"
        )
    return lines


async def _keep_running(vm: Vm) -> None:
    """`--keep`: hand the console to the person and wait for Ctrl-C (or QEMU to exit)."""
    vm.console.close()
    assert vm.files is not None
    say("the VM keeps running (--keep); press Ctrl-C to stop it and clean up")
    say(f"  console:     pyserial-miniterm {vm.console_device} 115200   (or screen)")
    say(f"  console log: {vm.files.console_log} (up to now)")
    say(f"  QMP:         {vm.files.user_qmp}   (e.g. qmp-shell {vm.files.user_qmp})")
    say(f"  QEMU pid:    {vm.qemu.pid}")
    while vm.qemu.returncode is None:
        await asyncio.sleep(0.5)
    say(f"QEMU exited with status {vm.qemu.returncode}")


async def run_boot(plan: BootPlan, image: GuestImage | None, seed_iso: Path | None) -> int:
    accel = await choose_accel(plan.accel, image, say)
    say(f"accel: {accel.reason}")
    if plan.user_image is not None:
        boot: DirectBoot | FirmwareBoot = FirmwareBoot(
            plan.user_image, disk_format(plan.user_image), plan.firmware, plan.secure_boot
        )
    else:
        assert image is not None
        boot = DirectBoot(image)
    config = VmConfig(
        layout=plan.layout,
        boot=boot,
        accel=accel.accel,
        ring_size=plan.ring_size,
        seed=seed_iso,
        # A user's cloud image may need apt to fetch the package's dependencies.
        network=plan.user_image is not None,
        user_qmp=plan.keep,
    )
    say(f"boot: layout {plan.layout.name}: {plan.layout.description}")
    verdict = await boot_and_check(
        config, plan.timeout, progress=say, hold=_keep_running if plan.keep else None
    )
    if verdict.error is not None:
        for line in failure_lines(verdict.error):
            say(line)
        if forget_verdict_after(verdict.error, accel.accel):
            say("accel: KVM failed this boot; its cached verdict is forgotten")
        return EXIT_FAILED
    if verdict.held:
        return EXIT_OK
    say("timeline:")
    for line in summary(verdict):
        say(line)
    if plan.verbose:
        say("ring-buffer timeline (seconds since QEMU start):")
        for line in verdict.timeline:
            say(line)
    if verdict.port is None:
        say(f"OK: {plan.layout.name}: boot and power-off not held up by the agent")
    else:
        say(f"OK: STARTED then STOPPED on {verdict.port}")
    return EXIT_OK


def boot_command(args: argparse.Namespace) -> int:
    try:
        plan = plan_boot(args)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            image = None
            seed_iso = None
            if plan.user_image is None:
                image = build_image(
                    image_spec(plan.deb, plan.release, plan.seed), say, rebuild=plan.rebuild
                )
            if plan.seed:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxd-seed-")))
                seed_iso = make_seed_iso(plan.deb, tmp / "seed.iso")
                say(f"seed: NoCloud seed with {plan.deb.name} ({seed_iso.stat().st_size} bytes)")
            code = asyncio.run(run_boot(plan, image, seed_iso))
    except HarnessError as e:
        for line in failure_lines(e):
            say(line)
        return EXIT_FAILED
    except KeyboardInterrupt:
        say("interrupted; QEMU and temporary files cleaned up")
        return EXIT_INTERRUPTED
    say(f"total {time.monotonic() - started:.1f} s")
    return code


def snapshot_lines(verdict: SnapshotVerdict) -> list[str]:
    """Each step: what it must show, whether it did, its figures, QEMU's lines, its timeline."""
    lines: list[str] = []
    for number, step in enumerate(Step, 1):
        seen = verdict.step(step)
        if seen is None:
            lines.append(f"step {number}: {step.value}: not run")
            continue
        outcome = "OK" if seen.passed else "FAILED"
        lines += [
            f"step {number}: {step.value} ({seen.layout}): {outcome} in {seen.seconds:.1f} s",
            f"  must:     {seen.expected}",
        ]
        if seen.port is not None and seen.started_after is not None:
            bound = f" (bound {seen.bound:g} s)" if seen.bound is not None else ""
            lines.append(
                f"  STARTED   on {seen.port}, {seen.started_after:.2f} s after {seen.since}{bound}"
            )
        if seen.saved is not None:
            lines.append(
                f"  state     {seen.saved.size / 1e6:.1f} MB written in {seen.saved.seconds:.2f} s"
            )
        if seen.record is not None:
            lines.append(f"  recorded  {seen.record.layout}: ports {', '.join(seen.record.ports)}")
        if seen.qemu_output:
            lines.append(f"  QEMU exited with status {seen.exit_status}; its own lines:")
            lines += [f"    {line}" for line in seen.qemu_output]
        if seen.stopped_after_power_off is not None and seen.off_after_power_off is not None:
            lines.append(
                f"  power-off STOPPED {seen.stopped_after_power_off:.2f} s after, "
                f"guest off {seen.off_after_power_off:.2f} s after"
            )
        if seen.error is not None:
            lines += [f"  {line}" for line in failure_lines(seen.error)]
        if seen.timeline:
            lines.append("  timeline (seconds since this step's QEMU start):")
            lines += [f"  {line}" for line in seen.timeline]
    if verdict.passed:
        lines.append("OK: every step behaved as the specification describes")
    else:
        lines.append("FAILED: a step did not behave as described (see above)")
    return lines


def snapshot_command(args: argparse.Namespace) -> int:
    try:
        deb = find_deb(args.deb)
        timeout = _positive_number(args.timeout, "--timeout") if args.timeout else DEFAULT_TIMEOUT
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    started = time.monotonic()

    async def run(image: GuestImage) -> SnapshotVerdict:
        accel = await choose_accel(Accel(args.accel), image, say)
        say(f"accel: {accel.reason}")
        return await snapshot_and_restore(image, accel.accel, timeout, progress=say)

    try:
        image = build_image(image_spec(deb, args.release, False), say, rebuild=args.rebuild)
        verdict = asyncio.run(run(image))
    except HarnessError as e:
        for line in failure_lines(e):
            say(line)
        return EXIT_FAILED
    except KeyboardInterrupt:
        say("interrupted; QEMU and temporary files cleaned up")
        return EXIT_INTERRUPTED
    for line in snapshot_lines(verdict):
        say(line)
    say(f"total {time.monotonic() - started:.1f} s")
    return EXIT_OK if verdict.passed else EXIT_FAILED


def image_command(args: argparse.Namespace) -> int:
    if args.cloud:
        # The cloud image never carries the package: a NoCloud seed installs it at boot.
        try:
            cloud = build_cloud_image(cloud_spec(args.release), say, rebuild=args.rebuild)
        except HarnessError as e:
            say(f"FAILED: {e}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            say("interrupted; the partial build was removed")
            return EXIT_INTERRUPTED
        print(cloud.disk)
        return EXIT_OK
    try:
        spec = image_spec(find_deb(args.deb), args.release, args.seed)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    try:
        image = build_image(spec, say, rebuild=args.rebuild)
    except HarnessError as e:
        say(f"FAILED: {e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        say("interrupted; the partial build was removed")
        return EXIT_INTERRUPTED
    print(image.directory)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "image":
        return image_command(args)
    if args.command == "snapshot":
        return snapshot_command(args)
    return boot_command(args)


if __name__ == "__main__":
    sys.exit(main())
