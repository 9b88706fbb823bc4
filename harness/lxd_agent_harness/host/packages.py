"""Debian packages a daemon needs, unpacked into the cache instead of installed.

Two cases, each only where `host.daemon` needs it:
  - the QEMU a daemon was built for, when the host's own is too new for it. Debian's LXD 5.0.2
    drives QEMU the way QEMU 7.2 (Debian 12's) takes it: `-runas` (gone from QEMU 10), `add-fd`
    with flags QEMU 10 refuses, CPU hotplug without an integer `core-id` (facts §13). A host with
    QEMU from backports then cannot start an LXD 5.0.2 VM;
  - Incus on a Debian 12 host that does not have it: bookworm-backports has Incus 6.0.4, but
    installing it would also install `qemu-user-binfmt`, which registers interpreters in the
    host's binfmt_misc (the harness leaves that alone: image/foreign.py).
The version is what the host's own apt sources offer in the suite (resolved by apt at run time,
`apt-get download`), unpacked with `dpkg-deb -x` into `~/.cache/lxd-agent/packages/`, never into
the system. Host side only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.buildsteps import build_directory, run_build_step
from lxd_agent_harness.image.rootfs import reuse_or_build

ENTRY_FORMAT = 1
"""Part of each cache entry's name: an entry laid out differently is a new entry."""

MACHINE_ARCH = "x86_64"
LIB_DIR = f"usr/lib/{MACHINE_ARCH}-linux-gnu"

QEMU_SUITE = "bookworm"
QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
"""What QEMU 7.2's x86 emulator needs beside the libraries the host's QEMU already pulled in."""

INCUS_SUITE = "bookworm-backports"
INCUS_PACKAGES = ("incus-base", "libcowsql0", "libraft0")
"""The daemon, and the two libraries of its that Debian 12 does not have (LXD's are others)."""


def candidate_version(package: str, suite: str) -> str:
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
        f"add Debian's {suite} to them and run apt-get update (in a clone: `make setup`)",
    )


def safe_name(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def unpacked(
    name: str,
    packages: tuple[str, ...],
    suite: str,
    progress: Progress,
    cache: Path | None = None,
    finish: Callable[[Path], None] = lambda root: None,
) -> Path:
    """The root into which `packages` of `suite` (at the host's candidate versions) are
    unpacked, from the cache; `finish(root)` adds what the caller needs (once, at the build)."""
    version = candidate_version(packages[0], suite)
    key = f"{name}-{safe_name(version)}-{ENTRY_FORMAT}"
    entry = (cache or cache_root()) / "packages" / key
    root = entry / "root"
    done_mark = entry / "complete"

    def build() -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with build_directory(entry.parent, key, progress) as work:
            debs = work / "debs"
            debs.mkdir()
            wanted = [f"{package}/{suite}" for package in packages]
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
                f"apt-get download of {suite}'s {name} {version}",
            )
            staged = work / "entry"
            (staged / "root").mkdir(parents=True)
            for deb in sorted(debs.glob("*.deb")):
                run_build_step(
                    ["dpkg-deb", "-x", str(deb), str(staged / "root")],
                    progress,
                    f"unpack {deb.name}",
                )
            finish(staged / "root")
            (staged / "complete").write_text(version + "\n")
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(staged, entry)

    reuse_or_build(f"{name} {version}", key, entry, done_mark.is_file, build, progress, cache)
    return root


def compat_qemu(progress: Progress, cache: Path | None = None) -> Path:
    """A directory holding `qemu-system-x86_64`, a wrapper for Debian 12's QEMU, for PATH."""
    wrapper_name = f"qemu-system-{MACHINE_ARCH}"

    def wrapper(staged_root: Path) -> None:
        (staged_root / "wrapper").mkdir()
        # Paths relative to the script's own place: the entry is renamed into the cache after.
        (staged_root / "wrapper" / wrapper_name).write_text(
            "#!/bin/sh\n"
            f"# Written by lxd-agent-harness: Debian {QEMU_SUITE}'s QEMU, unpacked beside.\n"
            'root=$(dirname "$(dirname "$(readlink -f "$0")")")\n'
            f'export QEMU_MODULE_DIR="$root/{LIB_DIR}/qemu"\n'
            # Its own data first, then the host's firmware (seabios ships the VGA ROMs).
            f'exec "$root/usr/bin/{wrapper_name}" -L "$root/usr/share/qemu" -L /usr/share/qemu '
            '-L /usr/share/seabios "$@"\n'
        )
        (staged_root / "wrapper" / wrapper_name).chmod(0o755)

    root = unpacked("qemu", QEMU_PACKAGES, QEMU_SUITE, progress, cache, wrapper)
    return root / "wrapper"


@dataclass(frozen=True)
class UnpackedIncus:
    incusd: Path
    library_path: Path
    """For LD_LIBRARY_PATH: the libraries Debian 12 lacks."""


def incus_from_backports(progress: Progress, cache: Path | None = None) -> UnpackedIncus:
    root = unpacked("incus", INCUS_PACKAGES, INCUS_SUITE, progress, cache)
    return UnpackedIncus(root / "usr/libexec/incus/incusd", root / LIB_DIR)
