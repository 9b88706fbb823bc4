"""`lxd-agent-harness`'s command line: its commands and options, and nothing that runs them.

Host side only; `cli.main` checks the values and runs the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lxd_agent.protocol import DEFAULT_RING_SIZE
from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.image.agents import AGENTS
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE, RELEASES
from lxd_agent_harness.image.deb import DEB_GLOB, DEB_VARIABLE
from lxd_agent_harness.image.lxd_image import SPLIT_DISK, SPLIT_METADATA, ImageKind
from lxd_agent_harness.lxd.layouts import INCUS_RING_SIZE, LAYOUTS
from lxd_agent_harness.scenarios.check import (
    AGENT_GRACE,
    CHECK_LAYOUTS,
    DEFAULT_CHECK_BOUND,
    DEFAULT_CHECK_TIMEOUT,
    FOREIGN_ARCH_FACTOR,
)
from lxd_agent_harness.scenarios.host_check import HOST_KINDS
from lxd_agent_harness.scenarios.matrix import DEFAULT_BOUND, MATRIX_LAYOUTS
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import Network
from lxd_agent_harness.vm.firmware import Firmware

HOST_ARCH = host_arch().value

DEB_HELP = (
    f"the agent's .deb (default: ${DEB_VARIABLE}, else the newest out/{DEB_GLOB} in the current "
    "directory or in the clone the harness runs from)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxd-agent-harness",
        description="Boot the lxd-agent in a real guest under QEMU with LXD's ring-buffer "
        "layouts and show, from the host, what it reported and when.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def arch_option(p: argparse.ArgumentParser, default: str | None = HOST_ARCH) -> None:
        p.add_argument(
            "--arch",
            choices=[a.value for a in Arch],
            default=default,
            help=f"the guest's architecture (default: this host's, {HOST_ARCH}); another one "
            "is built through qemu-user and runs under TCG"
            if default is not None
            else "the guest's architecture (default: the image's metadata.yaml says it, else "
            f"this host's, {HOST_ARCH}); another one runs under TCG",
        )

    def image_options(p: argparse.ArgumentParser) -> None:
        arch_option(p)
        p.add_argument("--deb", type=Path, help=DEB_HELP)
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

    def scenario_options(p: argparse.ArgumentParser, timeout_help: str) -> None:
        """What a scenario on the project's own image takes (no --seed: it needs the package)."""
        arch_option(p)
        p.add_argument("--deb", type=Path, help=DEB_HELP)
        p.add_argument("--release", default=DEFAULT_RELEASE, choices=list(RELEASES))
        p.add_argument("--rebuild", action="store_true", help="build the images even if cached")
        p.add_argument("--accel", default=Accel.AUTO.value, choices=[a.value for a in Accel])
        p.add_argument("--timeout", type=str, help=timeout_help)

    def jobs_option(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--jobs",
            default="1",
            help=f"how many {what} to boot at a time (default 1); each guest waits for as many "
            "of this machine's cores as it has vCPUs and gives them up once its boot is done "
            "(then it only waits: a grace, a held power-off), so more jobs than cores keep the "
            "cores busy; jobs help too where guests have fewer vCPUs than there are cores",
        )

    boot = sub.add_parser(
        "boot", help="boot a guest, wait for STARTED, power off, wait for STOPPED"
    )
    layouts = ", ".join(f"{name} ({layout.description})" for name, layout in LAYOUTS.items())
    boot.add_argument("--layout", help=f"default lxd-5.20; one of: {layouts}")
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

    def host_options(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--host",
            action="append",
            choices=list(HOST_KINDS),
            help="boot the image on a real daemon instead of the QEMU model, judged by what the "
            "daemon saw (its agent flag, its log, its qemu.conf against the harness's layout of "
            f"its version); {what}; in place of --layout. The daemon is started from its "
            "installed binaries in a state directory of the harness's own, unless --host-socket",
        )
        p.add_argument(
            "--host-socket",
            type=Path,
            help="with --host: use the daemon already listening on this unix socket (e.g. "
            "/var/lib/lxd/unix.socket); the harness deletes what it made in it",
        )

    def raw_qemu_conf_option(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--raw-qemu-conf",
            type=Path,
            metavar="FILE",
            help="LXD's raw.qemu.conf, applied to the layout's QEMU configuration sections as "
            f"LXD applies it ({what}); a line it does not allow stops the run before QEMU starts",
        )

    def guest_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--credential",
            action="append",
            metavar="NAME=VALUE",
            help="a systemd credential for the guest, as an SMBIOS type 11 string: what Incus "
            "passes for `incus config set VM systemd.credential.NAME=VALUE` (e.g. "
            "lxd-agent.state=on turns on the agent's state line); repeat for more",
        )
        p.add_argument(
            "--nic",
            choices=[n.value for n in Network],
            help="a NIC on QEMU's user network: isolated (restrict=on: DHCP, no way out), open "
            "(NAT to the outside) or none (default: none; open for boot --image)",
        )

    guest_options(boot)
    raw_qemu_conf_option(boot, "at the start")
    host_options(boot, "without --image, the project's cloud image with the package")

    def results_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", type=Path, help="also write every field of the result to FILE")
        p.add_argument("--junit", type=Path, help="also write the result as JUnit XML to FILE")

    check = sub.add_parser(
        "check",
        help="boot an image as it is (no seed, nothing added) once per layout and say what "
        "LXD's or Incus's host sees of the agent in it",
    )
    check.add_argument(
        "--image",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="the image to check: a qcow2 or raw disk, LXD's unified tarball (metadata.yaml, "
        "rootfs.img), a split image's metadata tarball and its qcow2 disk (two paths, as "
        "`lxc image import` takes them), or a directory holding one of these",
    )
    arch_option(check, default=None)
    check.add_argument(
        "--layout",
        action="append",
        help=f"a layout to boot in; repeat for more (default: {', '.join(CHECK_LAYOUTS)}); "
        f"one of: {', '.join(LAYOUTS)}",
    )
    host_options(check, "repeat for more")
    check.add_argument(
        "--firmware",
        choices=[f.value for f in Firmware],
        default=None,
        help="uefi (OVMF, LXD's; the default) or bios (SeaBIOS)",
    )
    check.add_argument(
        "--secure-boot", action="store_true", help="UEFI secure boot with Microsoft's keys"
    )
    check.add_argument("--accel", default=Accel.AUTO.value, choices=[a.value for a in Accel])
    check.add_argument(
        "--timeout",
        type=str,
        help=f"seconds from QEMU's start to the login prompt (default {DEFAULT_CHECK_TIMEOUT:g}); "
        f"the agent then has {AGENT_GRACE:g} s more to report",
    )
    check.add_argument(
        "--bound",
        type=str,
        help="seconds the power button may take to power the guest off before the layout "
        "counts as held, and a start job may hold the boot before the button is pressed "
        f"(default {DEFAULT_CHECK_BOUND:g}; {FOREIGN_ARCH_FACTOR:g} times that for a guest "
        "of another architecture than the host's, which runs under TCG)",
    )
    guest_options(check)
    raw_qemu_conf_option(check, "at every layout's start")
    jobs_option(check, "layouts")
    results_options(check)
    check.add_argument("-v", "--verbose", action="store_true", help="print each timeline")

    soak = sub.add_parser(
        "soak",
        help="boot N times; each boot: reboot, port replug, host reader restart, agent kill, "
        "power-off; print a table of each fault x cycle",
    )
    soak.add_argument("--cycles", default="3", help="how many boots (default 3)")
    soak.add_argument("--layout", default="lxd-5.20", help="lxd-5.19 or lxd-5.20")
    image_options(soak)
    soak.add_argument("--accel", default=Accel.AUTO.value, choices=[a.value for a in Accel])
    soak.add_argument("--timeout", type=str, help="seconds for each wait (default 120)")
    soak.add_argument(
        "--warm",
        action="store_true",
        help="start each cycle from a guest restored from one saved after its first boot "
        "reported STARTED, instead of booting (the reboot fault still boots)",
    )

    snapshot = sub.add_parser(
        "snapshot",
        help="save a guest's state on lxd-5.19 and restore it after the upgrade: refused on "
        "lxd-5.20, resumed with the saved layout, then restarted on lxd-5.20",
    )
    scenario_options(snapshot, timeout_help="seconds for each wait (default 120)")
    raw_qemu_conf_option(
        snapshot,
        'to the restore on lxd-5.20; default: [device "qemu_serial_legacy"], the way through',
    )
    snapshot.add_argument(
        "--agent",
        choices=["ours", "lxd-5.0"],
        default="ours",
        help="the agent in the guest: ours (every step), or the emulation of LXD 5.0's (the "
        "steps up to the way through: an old agent in an old snapshot)",
    )

    replay = sub.add_parser(
        "rename-replay",
        help="the specification on real LXD: Debian's LXD 5.0.2 runs the image and takes a "
        "stateful snapshot of it (restored there as the control), is upgraded to our build of "
        "it with the status port's rename while the VM runs, restores the snapshot statefully "
        "(it must fail to load), then the way through (raw.qemu.conf on the VM's profile), then "
        "restarts it cold (builds that LXD from Debian's source the first time: about 10 "
        "minutes)",
    )
    replay.add_argument(
        "--image",
        type=Path,
        help="a cloud disk with an agent to replay on (default: the harness's cloud image "
        "with the package, as `boot --host`)",
    )
    replay.add_argument("--deb", type=Path, help=DEB_HELP)
    replay.add_argument(
        "--timeout",
        type=str,
        help="seconds for the daemon's agent flag to go up after each start (default 300)",
    )
    replay.add_argument(
        "--debian-agent",
        action="store_true",
        help="also step 6: the cloud image with Debian's own lxd-agent 5.0.2 package, on LXD "
        "5.0.2 first (the control: it must read STARTED), then on the rename build (it must "
        "not); not-checked when the control never reads it",
    )
    replay.add_argument("--json", type=Path, help="also write every step's verdict to FILE")

    matrix = sub.add_parser(
        "matrix",
        help="boot each agent (ours, emulations of LXD 5.0's and 5.21's) in each layout and "
        "print a Markdown table of what the host and systemd saw",
    )
    matrix.add_argument(
        "--agents", default=",".join(AGENTS), help=f"comma-separated (default {','.join(AGENTS)})"
    )
    matrix.add_argument(
        "--layouts",
        default=",".join(MATRIX_LAYOUTS),
        help=f"comma-separated (default {','.join(MATRIX_LAYOUTS)})",
    )
    scenario_options(matrix, timeout_help="seconds for the boot (default 120)")
    matrix.add_argument(
        "--bound",
        type=str,
        help=f"seconds a boot or a power-off may take before its cell says held "
        f"(default {DEFAULT_BOUND:g})",
    )
    matrix.add_argument(
        "--shard",
        default="1/1",
        help="run only part K of N of the cells (e.g. 1/2), for CI runners in parallel; "
        "`matrix-merge` joins the parts' --json files (default 1/1: every cell)",
    )
    jobs_option(matrix, "cells")

    def table_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--markdown", type=Path, help="also write the table to this file")
        p.add_argument(
            "--readme",
            type=Path,
            help="put the table into this file, between its matrix markers (e.g. README.md)",
        )
        results_options(p)

    table_options(matrix)

    merge = sub.add_parser(
        "matrix-merge",
        help="join the --json files of every shard of a matrix into the table a whole run "
        "writes (and its --json, --junit)",
    )
    merge.add_argument("shards", type=Path, nargs="+", help="each shard's --json file")
    table_options(merge)

    image = sub.add_parser("image", help="build or reuse the guest image and print its directory")
    image_options(image)
    image.add_argument(
        "--cloud",
        action="store_true",
        help="build a GPT cloud disk (BIOS and UEFI GRUB, cloud-init) like Debian's "
        "genericcloud and print its qcow2 file",
    )
    image.add_argument(
        "--agent",
        choices=["none", *AGENTS],
        default="none",
        help="with --cloud: the agent built into the disk (ours: the --deb; lxd-5.0, lxd-5.21: "
        "the emulations of LXD's); default none, and `boot --image` installs ours from a seed",
    )
    image.add_argument(
        "--format",
        choices=[k.value for k in ImageKind],
        default=ImageKind.DISK.value,
        help="with --cloud: disk (the qcow2 file; the default), split (a directory with LXD's "
        f"metadata tarball {SPLIT_METADATA} and {SPLIT_DISK}) or unified (one tarball with "
        "metadata.yaml and rootfs.img); `check --image` and `lxc image import` take each",
    )
    return parser
