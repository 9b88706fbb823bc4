"""The QEMU a daemon was built for, when the host's own is too new for it.

Debian's LXD 5.0.2 drives QEMU the way QEMU 7.2 (Debian 12's) takes it: `-runas` (gone from
QEMU 10), `add-fd` with flags QEMU 10 refuses ("Failed to find file descriptor with matching
flags"), CPU hotplug without an integer `core-id` (facts §13). A host with QEMU from backports
then cannot start an LXD 5.0.2 VM. This module fetches Debian 12's own QEMU packages (the
version the host's `bookworm` apt sources have, resolved by apt at run time), unpacks them into
the cache (`~/.cache/lxd-agent/qemu/<version>/`, never installed into the system) and writes a
wrapper that runs that QEMU with its module and data directories, to go first on the daemon's
PATH. Nothing here runs unless `host.probes` found the host's QEMU too new. Host side only.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.buildsteps import build_directory, run_build_step
from lxd_agent_harness.image.rootfs import reuse_or_build

SUITE = "bookworm"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
"""What QEMU 7.2's x86 emulator needs beside the libraries the host's QEMU already pulled in."""

MACHINE_ARCH = "x86_64"

WRAPPER_VERSION = 2
"""Part of the cache entry's name: a wrapper written differently is a new entry."""


def candidate_version(package: str = PACKAGES[0], suite: str = SUITE) -> str:
    """The version of `package` that the host's apt sources offer in `suite`."""
    done = subprocess.run(
        ["apt-cache", "madison", package], capture_output=True, text=True, check=False
    )
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and re.search(rf"\s{re.escape(suite)}/", f" {fields[2]}"):
            return fields[1]
    raise DaemonError(
        f"the host's apt sources offer no {package} in {suite} (apt-cache madison {package}); "
        f"add Debian's {suite} to them and run apt-get update",
        daemon="lxd",
    )


def _safe(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def compat_qemu(progress: Progress, cache: Path | None = None) -> Path:
    """A directory holding `qemu-system-x86_64`, a wrapper for Debian 12's QEMU, for PATH."""
    version = candidate_version()
    entry = (cache or cache_root()) / "qemu" / f"{_safe(version)}-{WRAPPER_VERSION}"
    wrapper = entry / "bin" / f"qemu-system-{MACHINE_ARCH}"

    def build() -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with build_directory(entry.parent, _safe(version), progress) as work:
            debs = work / "debs"
            debs.mkdir()
            wanted = [f"{package}/{SUITE}" for package in PACKAGES]
            # apt-get download runs as _apt where it can; a directory of root's is fine.
            run_build_step(
                [
                    "sh",
                    "-c",
                    'cd "$1" && shift && apt-get download -q "$@"',
                    "-",
                    str(debs),
                    *wanted,
                ],
                progress,
                f"apt-get download of {SUITE}'s QEMU {version}",
            )
            staged = work / "entry"
            root = staged / "root"
            root.mkdir(parents=True)
            for deb in sorted(debs.glob("*.deb")):
                run_build_step(
                    ["dpkg-deb", "-x", str(deb), str(root)], progress, f"unpack {deb.name}"
                )
            bin_dir = staged / "bin"
            bin_dir.mkdir()
            real = entry / "root" / "usr" / "bin" / f"qemu-system-{MACHINE_ARCH}"
            (bin_dir / wrapper.name).write_text(
                "#!/bin/sh\n"
                f"# Written by lxd-agent-harness: Debian {SUITE}'s QEMU {version}, unpacked here.\n"
                f"export QEMU_MODULE_DIR={entry}/root/usr/lib/{MACHINE_ARCH}-linux-gnu/qemu\n"
                # Its own data first, then the host's firmware (seabios ships the VGA ROMs).
                f"exec {real} -L {entry}/root/usr/share/qemu -L /usr/share/qemu "
                '-L /usr/share/seabios "$@"\n'
            )
            (bin_dir / wrapper.name).chmod(0o755)
            if entry.exists():
                subprocess.run(["rm", "-rf", str(entry)], check=True)
            os.rename(staged, entry)

    reuse_or_build(
        f"QEMU {version}", _safe(version), entry, wrapper.is_file, build, progress, cache
    )
    return wrapper.parent
