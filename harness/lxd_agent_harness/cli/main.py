"""`lxd-agent-harness`: build the guest image, boot it with an LXD layout, see STARTED and STOPPED.

`boot` builds or reuses the image, boots it under QEMU with the chosen layout, waits for the
agent's `STARTED` on the ring LXD would read, presses the power button, waits for `STOPPED` and
for the guest to be off, and prints the timeline. It exits 0 only when both lines were seen, in
that order; 1 when the guest did not do it (the reason, the console tail and the timeline are
printed); 2 on bad input, before anything is built or booted (a corrupt --deb, a ring size out
of bounds, an --image without a partition table); 128+signum when interrupted (130 for Ctrl-C,
143 for SIGTERM, 129 for SIGHUP), after QEMU, mounts, build and temporary directories are gone
(`cli.interrupt`). `image` only builds or reuses the image and prints its directory; `soak`,
`snapshot` and `matrix` run their scenarios and print their tables.

Host side only: this is the one place that prints to the user and turns errors into exit codes;
it holds no QEMU or image logic of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.base.textfile import read_text, write_whole
from lxd_agent_harness.cli.interrupt import Interrupted, run_interruptible, signals_interrupt
from lxd_agent_harness.cli.junit import check_junit, matrix_junit
from lxd_agent_harness.cli.options import build_parser
from lxd_agent_harness.cli.records import check_json, matrix_from_json, matrix_json, replay_json
from lxd_agent_harness.cli.report import (
    check_lines,
    failure_lines,
    interrupted_line,
    matrix_lines,
    matrix_markdown,
    snapshot_lines,
    soak_lines,
    summary,
    with_matrix,
)
from lxd_agent_harness.image.agents import AGENTS, agent_images, emulation_deb
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE
from lxd_agent_harness.image.cloud import (
    DEBIAN_LXD_AGENT,
    build_cloud_image,
    cloud_image_as,
    cloud_spec,
    with_debian_package,
)
from lxd_agent_harness.image.deb import check_deb, find_deb
from lxd_agent_harness.image.lxd_image import ImageKind, opened_image
from lxd_agent_harness.image.rootfs import (
    BASE_PACKAGES,
    CLOUD_INIT_PACKAGES,
    ImageSpec,
    build_image,
)
from lxd_agent_harness.image.seed import make_seed_iso
from lxd_agent_harness.lxd.layouts import (
    LAYOUTS,
    Layout,
    check_ring_size,
    get_layout,
    lxd_ring_port,
)
from lxd_agent_harness.lxd.qemu_conf import (
    Override,
    apply_overrides,
    layout_sections,
    read_raw_qemu_conf,
)
from lxd_agent_harness.qemu.disk import check_boot_sector, disk_format
from lxd_agent_harness.scenarios.boot import boot_and_check
from lxd_agent_harness.scenarios.check import (
    CHECK_LAYOUTS,
    DEFAULT_CHECK_BOUND,
    DEFAULT_CHECK_TIMEOUT,
    CheckVerdict,
    check_image,
    default_bound,
)
from lxd_agent_harness.scenarios.host_check import check_image_on_hosts
from lxd_agent_harness.scenarios.matrix import (
    DEFAULT_BOUND,
    MatrixVerdict,
    Shard,
    merge_shards,
    run_matrix,
)
from lxd_agent_harness.scenarios.rename_replay import replay_rename
from lxd_agent_harness.scenarios.snapshot import SnapshotVerdict, snapshot_and_restore
from lxd_agent_harness.scenarios.soak import SoakVerdict, soak
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import (
    DirectBoot,
    FirmwareBoot,
    GuestImage,
    Network,
    VmConfig,
    parse_credential,
)
from lxd_agent_harness.vm.firmware import Firmware, machine_arg
from lxd_agent_harness.vm.instance import Vm
from lxd_agent_harness.vm.kvm_probe import choose_accel, forget_verdict_after

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# An interrupted command exits 128 + the signal's number (`Interrupted.exit_status`).

DEFAULT_TIMEOUT = 120.0
DEFAULT_BOOT_LAYOUT = "lxd-5.20"
DEFAULT_REPLAY_TIMEOUT = 300.0
# cloud-init runs late in the boot and installs the package first.
DEFAULT_SEED_TIMEOUT = 600.0


class UsageError(HarnessError):
    """Bad input on the command line: reported in one line, exit status 2."""


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Parsing and checking the input


@dataclass(frozen=True)
class BootPlan:
    arch: Arch
    layout: Layout
    deb: Path
    release: str
    accel: Accel
    ring_size: int | None
    user_image: Path | None
    user_image_format: str | None
    firmware: Firmware
    secure_boot: bool
    seed: bool
    timeout: float
    keep: bool
    verbose: bool
    rebuild: bool
    network: Network | None = None
    """None: the default (open for a user's image, which may need apt; else none)."""
    credentials: tuple[tuple[str, str], ...] = ()
    raw_qemu_conf: tuple[Override, ...] = ()


def _failed(error: HarnessError) -> int:
    """Print the error and what it carries; the exit status of a run that failed."""
    for line in failure_lines(error):
        say(line)
    return EXIT_FAILED


def _timeout(args: argparse.Namespace, default: float = DEFAULT_TIMEOUT) -> float:
    """`--timeout` as seconds, or `default` when it was not given."""
    return default if args.timeout is None else _positive_number(args.timeout, "--timeout")


def _positive_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number of seconds; give e.g. 120") from None
    if not value > 0:
        raise UsageError(f"{what} must be more than 0 seconds, not {text}")
    return value


# Guests at a time for `check` and `matrix`: each holds its cores (vm.lock) whatever is asked.
MAX_JOBS = 16


def _jobs(args: argparse.Namespace) -> int:
    """`--jobs` as a count of guests at a time."""
    try:
        jobs = int(args.jobs)
    except ValueError:
        raise UsageError(f"--jobs {args.jobs!r} is not a whole number; give e.g. 2") from None
    if not 1 <= jobs <= MAX_JOBS:
        raise UsageError(f"--jobs must be 1..{MAX_JOBS}, not {jobs}")
    return jobs


def parse_credentials(given: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """`--credential NAME=VALUE` options as (name, value) pairs, each checked as QEMU gets it."""
    try:
        return tuple(parse_credential(text) for text in given or ())
    except HarnessError as e:
        raise UsageError(f"--credential: {e}") from None


def checked_raw_qemu_conf(path: Path | None, *layouts: Layout) -> tuple[Override, ...]:
    """`--raw-qemu-conf FILE`, parsed and tried on each layout's sections: every error it can
    give comes here, before anything is built or booted."""
    if path is None:
        return ()
    overrides = read_raw_qemu_conf(path)
    for layout in layouts:
        apply_overrides(layout_sections(layout), list(overrides), source=str(path))
    return overrides


def plan_boot(args: argparse.Namespace) -> BootPlan:
    """Check every input before anything is built or booted."""
    layout = get_layout(args.layout or DEFAULT_BOOT_LAYOUT)
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
    user_image_format = None
    if args.image is not None:
        # Before anything boots: a file no firmware can boot would fail only at the timeout.
        user_image_format = disk_format(args.image)
        check_boot_sector(args.image, user_image_format)
    seed = bool(args.seed or args.image is not None)
    timeout = _timeout(args, DEFAULT_SEED_TIMEOUT if seed else DEFAULT_TIMEOUT)
    deb = find_deb(args.deb)
    check_deb(deb)
    arch = Arch(args.arch)
    machine_arg(firmware, args.secure_boot, arch)  # an arm64 BIOS boot is refused here
    return BootPlan(
        arch=arch,
        layout=layout,
        deb=deb,
        release=args.release,
        accel=Accel(args.accel),
        ring_size=ring_size,
        user_image=args.image,
        user_image_format=user_image_format,
        firmware=firmware,
        secure_boot=args.secure_boot,
        seed=seed,
        timeout=timeout,
        keep=args.keep,
        verbose=args.verbose,
        rebuild=args.rebuild,
        network=Network(args.nic) if args.nic is not None else None,
        credentials=parse_credentials(args.credential),
        raw_qemu_conf=checked_raw_qemu_conf(args.raw_qemu_conf, layout),
    )


def image_spec(deb: Path, release: str, seed: bool, arch: Arch = Arch.AMD64) -> ImageSpec:
    """The project's image: the package built in, or cloud-init and no package (`--seed`)."""
    if seed:
        return ImageSpec(release=release, packages=BASE_PACKAGES + CLOUD_INIT_PACKAGES, arch=arch)
    return ImageSpec(release=release, debs=(deb,), arch=arch)


# ---------------------------------------------------------------------------------------------
# Booting


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
    accel = await choose_accel(plan.accel, image, say, arch=plan.arch)
    say(f"accel: {accel.reason}")
    if plan.user_image is not None:
        assert plan.user_image_format is not None
        boot: DirectBoot | FirmwareBoot = FirmwareBoot(
            plan.user_image, plan.user_image_format, plan.firmware, plan.secure_boot
        )
    else:
        assert image is not None
        boot = DirectBoot(image)
    config = VmConfig(
        layout=plan.layout,
        boot=boot,
        accel=accel.accel,
        arch=plan.arch,
        ring_size=plan.ring_size,
        seed=seed_iso,
        # A user's cloud image may need apt to fetch the package's dependencies.
        network=plan.network
        if plan.network is not None
        else Network.OPEN
        if plan.user_image is not None
        else Network.NONE,
        credentials=plan.credentials,
        raw_qemu_conf=plan.raw_qemu_conf,
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


def boot_on_hosts(args: argparse.Namespace, hosts: list[str]) -> int:
    """`boot --host`: the image (by default the project's cloud image with the package) on real
    daemons, one at a time, judged as `check --host` judges it."""
    try:
        if args.image is not None:
            image_format = disk_format(args.image)
            check_boot_sector(args.image, image_format)
        else:
            deb = find_deb(args.deb)
            check_deb(deb)
        timeout = _timeout(args, DEFAULT_CHECK_TIMEOUT)
        credentials = parse_credentials(args.credential)
        # The daemon's version, and so its layout, is known once it runs: checked as `check`
        # checks it, against the layouts of every host.
        raw_qemu_conf = checked_raw_qemu_conf(
            args.raw_qemu_conf, *(get_layout(name) for name in CHECK_LAYOUTS)
        )
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    started = time.monotonic()
    try:
        if args.image is None:
            spec = cloud_spec(args.release, (deb,), Arch.AMD64)
            disk, image_format = build_cloud_image(spec, say, rebuild=args.rebuild).disk, "qcow2"
        else:
            disk = args.image
        verdict = run_interruptible(
            check_image_on_hosts(
                disk,
                image_format,
                hosts,
                timeout=timeout,
                bound=DEFAULT_CHECK_BOUND,
                raw_qemu_conf=raw_qemu_conf,
                credentials=credentials,
                host_socket=args.host_socket,
                progress=say,
            )
        )
    except HarnessError as e:
        return _failed(e)
    for line in check_lines(verdict, verbose=args.verbose):
        say(line)
    say(f"total {time.monotonic() - started:.1f} s")
    return EXIT_OK if verdict.passed else EXIT_FAILED


def boot_command(args: argparse.Namespace) -> int:
    try:
        hosts = _host_options(
            args,
            [
                (args.seed, "--seed (the image is booted as it is)"),
                (args.keep, "--keep (use the daemon's own console)"),
                (args.ring_size, "--ring-size (the daemon's own)"),
                (args.accel != Accel.AUTO.value, "--accel (probed for the daemon's VM)"),
            ],
        )
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    if hosts:
        return boot_on_hosts(args, hosts)
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
                    image_spec(plan.deb, plan.release, plan.seed, plan.arch),
                    say,
                    rebuild=plan.rebuild,
                )
            if plan.seed:
                tmp = Path(
                    stack.enter_context(tempfile.TemporaryDirectory(prefix="lxd-agent-seed-"))
                )
                seed_iso = make_seed_iso(plan.deb, tmp / "seed.iso")
                say(f"seed: NoCloud seed with {plan.deb.name} ({seed_iso.stat().st_size} bytes)")
            code = run_interruptible(run_boot(plan, image, seed_iso))
    except HarnessError as e:
        return _failed(e)
    say(f"total {time.monotonic() - started:.1f} s")
    return code


def snapshot_command(args: argparse.Namespace) -> int:
    try:
        deb = find_deb(args.deb)
        timeout = _positive_number(args.timeout, "--timeout") if args.timeout else DEFAULT_TIMEOUT
        raw_qemu_conf = (
            checked_raw_qemu_conf(args.raw_qemu_conf, get_layout("lxd-5.20"))
            if args.raw_qemu_conf is not None
            else None
        )
        old_agent = args.agent != "ours"
        if old_agent:
            deb = emulation_deb(AGENTS[args.agent], say)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    started = time.monotonic()

    async def run(image: GuestImage) -> SnapshotVerdict:
        accel = await choose_accel(Accel(args.accel), image, say)
        say(f"accel: {accel.reason}")
        return await snapshot_and_restore(
            image,
            accel.accel,
            timeout,
            progress=say,
            raw_qemu_conf=raw_qemu_conf,
            old_agent=old_agent,
        )

    try:
        image = build_image(
            image_spec(deb, args.release, False, Arch(args.arch)), say, rebuild=args.rebuild
        )
        verdict = run_interruptible(run(image))
    except HarnessError as e:
        return _failed(e)
    for line in snapshot_lines(verdict):
        say(line)
    say(f"total {time.monotonic() - started:.1f} s")
    return EXIT_OK if verdict.passed else EXIT_FAILED


def image_command(args: argparse.Namespace) -> int:
    if args.cloud:
        # Without --agent the cloud image carries no agent: `boot --image` installs ours
        # from a NoCloud seed, and `check` shows what an image without one does.
        try:
            debs: tuple[Path, ...] = ()
            if args.agent == "ours":
                debs = (find_deb(args.deb),)
                check_deb(debs[0])
        except HarnessError as e:
            say(f"lxd-agent-harness: {e}")
            return EXIT_USAGE
        try:
            if args.agent not in ("none", "ours"):
                debs = (emulation_deb(AGENTS[args.agent], say),)
            spec = cloud_spec(args.release, debs, Arch(args.arch))
            cloud = build_cloud_image(spec, say, rebuild=args.rebuild)
            made = cloud_image_as(cloud, ImageKind(args.format), spec, args.agent, say)
        except HarnessError as e:
            say(f"FAILED: {e}")
            return EXIT_FAILED
        print(made)
        return EXIT_OK
    for given, what in ((args.agent != "none", "--agent"), (args.format != "disk", "--format")):
        if given:
            say(f"lxd-agent-harness: {what} is for a --cloud disk; add --cloud")
            return EXIT_USAGE
    try:
        deb = find_deb(args.deb)
        check_deb(deb)
        spec = image_spec(deb, args.release, args.seed, Arch(args.arch))
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    try:
        image = build_image(spec, say, rebuild=args.rebuild)
    except HarnessError as e:
        say(f"FAILED: {e}")
        return EXIT_FAILED
    print(image.directory)
    return EXIT_OK


def _writable(path: Path | None, what: str) -> None:
    """Refuse, before anything runs, an output file that could not be written afterwards."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write into {path.parent}; give another path")


def _write_results(
    json_path: Path | None, junit_path: Path | None, record: object, junit: str
) -> None:
    """The --json and --junit files, each whole or not at all."""
    if json_path is not None:
        write_whole(json_path, json.dumps(record, indent=2) + "\n")
        say(f"wrote {json_path}")
    if junit_path is not None:
        write_whole(junit_path, junit)
        say(f"wrote {junit_path}")


def _host_options(args: argparse.Namespace, more: Sequence[tuple[object, str]] = ()) -> list[str]:
    """`--host`s, checked against what a daemon can honour (and the command's `more` refusals:
    (value, what)); [] for the QEMU model."""
    if args.host_socket is not None and not args.host:
        raise UsageError("--host-socket needs --host (which daemon listens on it)")
    if not args.host:
        return []
    refused = [
        *more,
        (args.layout, "--layout (a daemon's layout follows its version)"),
        (args.firmware == Firmware.BIOS.value, "--firmware bios (LXD and Incus boot UEFI)"),
        (args.secure_boot, "--secure-boot (the daemon's security.secureboot decides)"),
        (args.nic, "--nic (the VM gets no NIC)"),
        (
            args.credential and "lxd" in args.host,
            "--credential on --host lxd (LXD has no systemd.credential keys; Incus has)",
        ),
        (args.arch not in (None, Arch.AMD64.value), "--arch other than amd64"),
    ]
    given = [what for value, what in refused if value]
    if given:
        raise UsageError(f"--host cannot be given with {', '.join(given)}; drop it")
    if args.host_socket is not None and len(set(args.host)) > 1:
        raise UsageError("--host-socket is one daemon's: give one --host with it")
    return list(dict.fromkeys(args.host))


def check_command(args: argparse.Namespace) -> int:
    try:
        hosts = _host_options(args)
        names = args.layout or list(CHECK_LAYOUTS)
        layouts = [get_layout(name) for name in dict.fromkeys(names)]
        timeout = _timeout(args, DEFAULT_CHECK_TIMEOUT)
        bound = None if args.bound is None else _positive_number(args.bound, "--bound")
        if bound is not None and bound > MAX_BOUND:
            raise UsageError(f"--bound must be at most {MAX_BOUND:g} s, not {args.bound}")
        jobs = _jobs(args)
        firmware = Firmware(args.firmware or Firmware.UEFI.value)
        if args.secure_boot and firmware is not Firmware.UEFI:
            raise UsageError("--secure-boot needs UEFI firmware; drop it or use --firmware uefi")
        _writable(args.json, "--json")
        _writable(args.junit, "--junit")
        credentials = parse_credentials(args.credential)
        raw_qemu_conf = checked_raw_qemu_conf(args.raw_qemu_conf, *layouts)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    with contextlib.ExitStack() as stack:
        try:
            # A unified tarball's disk is extracted here and removed when the check ends.
            asked = Arch(args.arch) if args.arch is not None else None
            image = stack.enter_context(opened_image(args.image, say, asked))
            arch = image.guest_arch(asked, host_arch())
            if hosts and arch is not Arch.AMD64:
                raise UsageError(f"--host runs amd64 images; this image is {arch.value}")
            machine_arg(firmware, args.secure_boot, arch)  # an arm64 BIOS boot is refused here
            check_boot_sector(image.disk, image.disk_format)
        except HarnessError as e:
            say(f"lxd-agent-harness: {e}")
            return EXIT_USAGE
        say(image.describe())
        if bound is None:
            bound, why = default_bound(arch, host_arch())
            if why:
                say(why)
        started = time.monotonic()

        async def run() -> CheckVerdict:
            if hosts:
                return await check_image_on_hosts(
                    image.disk,
                    image.disk_format,
                    hosts,
                    timeout=timeout,
                    bound=bound,
                    raw_qemu_conf=raw_qemu_conf,
                    credentials=credentials,
                    host_socket=args.host_socket,
                    progress=say,
                )
            accel = await choose_accel(Accel(args.accel), None, say, arch=arch)
            say(f"accel: {accel.reason}")
            return await check_image(
                image.disk,
                image.disk_format,
                layouts,
                arch=arch,
                firmware=firmware,
                secure_boot=args.secure_boot,
                accel=accel.accel,
                timeout=timeout,
                bound=bound,
                network=Network(args.nic or Network.NONE.value),
                credentials=credentials,
                raw_qemu_conf=raw_qemu_conf,
                progress=say,
                jobs=jobs,
            )

        # The verdict names the image as it was given, not the disk a tarball's was extracted to.
        verdict = dataclasses.replace(run_interruptible(run()), image=args.image[0], source=image)
        for line in check_lines(verdict, verbose=args.verbose):
            say(line)
        try:
            _write_results(args.json, args.junit, check_json(verdict), check_junit(verdict))
        except (OSError, HarnessError) as e:
            say(f"FAILED: {e}")
            return EXIT_FAILED
        say(f"total {time.monotonic() - started:.1f} s")
        return EXIT_OK if verdict.passed else EXIT_FAILED


def rename_replay_command(args: argparse.Namespace) -> int:
    try:
        if args.image is not None:
            image_format = disk_format(args.image)
            check_boot_sector(args.image, image_format)
            if image_format != "qcow2":
                raise UsageError(f"--image {args.image} is {image_format}; give a qcow2 disk")
        else:
            deb = find_deb(args.deb)
            check_deb(deb)
        timeout = _timeout(args, DEFAULT_REPLAY_TIMEOUT)
        _writable(args.json, "--json")
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    started = time.monotonic()
    try:
        disk = args.image
        if disk is None:
            disk = build_cloud_image(cloud_spec(DEFAULT_RELEASE, (deb,)), say).disk
        debian_disk = None
        if args.debian_agent:
            spec = with_debian_package(cloud_spec(DEFAULT_RELEASE), DEBIAN_LXD_AGENT)
            debian_disk = build_cloud_image(spec, say).disk
        verdict = run_interruptible(replay_rename(disk, timeout, say, debian_disk))
    except HarnessError as e:
        return _failed(e)
    for step in verdict.steps:
        say(f"{step.name}: {step.verdict.upper()}")
        for line in step.seen:
            say(f"  {line}")
    if verdict.error is not None:
        for line in failure_lines(verdict.error):
            say(line)
    build = verdict.build
    if build:
        say(
            f"LXD {build['version']}: built in {build['seconds']['build']:g} s, Go tests "
            f"{build['go_tests']}"
        )
    if args.json is not None:
        try:
            write_whole(args.json, json.dumps(replay_json(verdict), indent=2) + "\n")
        except (OSError, HarnessError) as e:
            say(f"FAILED: {e}")
            return EXIT_FAILED
        say(f"wrote {args.json}")
    say(f"total {time.monotonic() - started:.1f} s")
    return EXIT_OK if verdict.passed else EXIT_FAILED


# More would hold the machine for a day: 50 cycles take about an hour here.
MAX_SOAK_CYCLES = 1000


def soak_command(args: argparse.Namespace) -> int:
    try:
        layout = get_layout(args.layout)
        if lxd_ring_port(layout) is None:
            raise UsageError(
                f"layout {layout.name} has no ring on an LXD port: nothing to soak; "
                "choose lxd-5.19 or lxd-5.20"
            )
        try:
            cycles = int(args.cycles)
        except ValueError:
            raise UsageError(f"--cycles {args.cycles!r} is not a whole number") from None
        if not 1 <= cycles <= MAX_SOAK_CYCLES:
            raise UsageError(f"--cycles must be 1..{MAX_SOAK_CYCLES}, not {cycles}")
        timeout = _timeout(args)
        deb = find_deb(args.deb)
        check_deb(deb)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    try:
        image = build_image(
            image_spec(deb, args.release, args.seed, Arch(args.arch)), say, rebuild=args.rebuild
        )
    except HarnessError as e:
        return _failed(e)

    async def run() -> SoakVerdict:
        accel = await choose_accel(Accel(args.accel), image, say)
        say(f"accel: {accel.reason}")
        config = VmConfig(layout=layout, boot=DirectBoot(image), accel=accel.accel)
        return await soak(config, cycles, timeout, progress=say, warm=args.warm)

    verdict = run_interruptible(run())
    for line in soak_lines(verdict):
        say(line)
    return EXIT_OK if verdict.passed else EXIT_FAILED


# A held cell costs this much; more than ten minutes is no longer a bound.
MAX_BOUND = 600.0


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise UsageError(f"--{what} {text!r}: choose from {', '.join(valid)}, comma-separated")
    return list(dict.fromkeys(names))


def _check_table_outputs(args: argparse.Namespace) -> None:
    """The matrix's output files, checked before any boot (or merge)."""
    for path, what in (
        (args.readme, "--readme"),
        (args.markdown, "--markdown"),
        (args.json, "--json"),
        (args.junit, "--junit"),
    ):
        _writable(path, what)
    if args.readme is not None:
        with_matrix(read_text(args.readme), [], str(args.readme))  # its markers: checked first


def _table_results(args: argparse.Namespace, verdict: MatrixVerdict) -> int:
    """Print the table, write the files asked for; the matrix's exit status."""
    for line in matrix_lines(verdict):
        say(line)
    table = matrix_markdown(verdict)
    try:
        if args.markdown is not None:
            write_whole(args.markdown, "\n".join(table) + "\n")
            say(f"wrote {args.markdown}")
        if args.readme is not None and verdict.harness_failures():
            say(f"{args.readme} left as it was: a cell has no result (see above)")
        elif args.readme is not None and verdict.shard.count > 1:
            say(f"{args.readme} left as it was: this is shard {verdict.shard}; merge the shards")
        elif args.readme is not None:
            # Read again: the run took minutes, and the file may have been edited meanwhile.
            text = read_text(args.readme)
            write_whole(args.readme, with_matrix(text, table, str(args.readme)))
            say(f"wrote {args.readme}")
        _write_results(args.json, args.junit, matrix_json(verdict), matrix_junit(verdict))
    except (OSError, HarnessError) as e:
        say(f"FAILED: {e}")
        return EXIT_FAILED
    return EXIT_OK if verdict.passed else EXIT_FAILED


def matrix_command(args: argparse.Namespace) -> int:
    try:
        agents = [AGENTS[name] for name in _names(args.agents, list(AGENTS), "agents")]
        layouts = [get_layout(n) for n in _names(args.layouts, list(LAYOUTS), "layouts")]
        timeout = _timeout(args)
        bound = DEFAULT_BOUND if args.bound is None else _positive_number(args.bound, "--bound")
        if bound > MAX_BOUND:
            raise UsageError(f"--bound must be at most {MAX_BOUND:g} s, not {args.bound}")
        shard = Shard.parse(args.shard)
        jobs = _jobs(args)
        _check_table_outputs(args)
        deb = find_deb(args.deb)
        check_deb(deb)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    try:
        images = agent_images(
            agents, deb, args.release, say, rebuild=args.rebuild, arch=Arch(args.arch)
        )
    except HarnessError as e:
        return _failed(e)

    async def run() -> MatrixVerdict:
        accel = await choose_accel(Accel(args.accel), next(iter(images.values())), say)
        say(f"accel: {accel.reason}")
        return await run_matrix(
            agents, layouts, images, accel.accel, timeout, bound, say, shard=shard, jobs=jobs
        )

    return _table_results(args, run_interruptible(run()))


def matrix_merge_command(args: argparse.Namespace) -> int:
    try:
        _check_table_outputs(args)
        shards = []
        for path in args.shards:
            try:
                data = json.loads(read_text(path))
            except ValueError as e:
                raise UsageError(f"{path} is not JSON ({e}); give a `matrix --json` file") from None
            shards.append(matrix_from_json(data, str(path)))
        verdict = merge_shards(shards)
    except HarnessError as e:
        say(f"lxd-agent-harness: {e}")
        return EXIT_USAGE
    say(f"merged {len(shards)} shards: {len(verdict.cells)} cells")
    return _table_results(args, verdict)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # From here on a signal unwinds everything the command made, then ends it with 128+signum.
    with signals_interrupt():
        try:
            if args.command == "image":
                return image_command(args)
            if args.command == "soak":
                return soak_command(args)
            if args.command == "snapshot":
                return snapshot_command(args)
            if args.command == "matrix":
                return matrix_command(args)
            if args.command == "matrix-merge":
                return matrix_merge_command(args)
            if args.command == "check":
                return check_command(args)
            if args.command == "rename-replay":
                return rename_replay_command(args)
            return boot_command(args)
        except Interrupted as interrupt:
            say(interrupted_line(interrupt))
            return interrupt.exit_status


if __name__ == "__main__":
    sys.exit(main())
