"""A throw-away Debian root for installing the .deb, built with mmdebstrap.

The root comes from the machine's own apt configuration (its active sources.list entries), so no
mirror is named anywhere in the project. Everything lives in a temporary directory that is
removed on every exit path, after making sure nothing is still mounted below it: removing a
tree with the host's /dev or /sys bind-mounted inside would delete the host's files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

APT_SOURCES = Path("/etc/apt")
# The release every supported image is built from here (the build machine is Debian 12).
RELEASE = "bookworm"
MMDEBSTRAP_TIMEOUT = 300.0
# What a chroot'ed command sees: dpkg's usual PATH, and no pyenv, venv or locale from the
# test's environment.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
}


class RootfsError(Exception):
    """The throw-away root could not be built or cleaned up."""


def active_apt_sources(etc_apt: Path = APT_SOURCES) -> list[Path]:
    """The sources files apt itself would read, skipping disabled and empty ones.

    apt reads only sources.list, sources.list.d/*.list and sources.list.d/*.sources: a file
    renamed to disable it (``x.list.disabled``) is not read, and neither is it here.
    """
    candidates = [etc_apt / "sources.list"]
    candidates += sorted((etc_apt / "sources.list.d").glob("*.list"))
    candidates += sorted((etc_apt / "sources.list.d").glob("*.sources"))
    active = []
    for path in candidates:
        if not path.is_file():
            continue
        lines = [line.strip() for line in path.read_text().splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        if path.suffix == ".sources":
            enabled = not any(line.lower().replace(" ", "") == "enabled:no" for line in lines)
            has_entry = any(line.lower().startswith("types:") for line in lines)
            if enabled and has_entry:
                active.append(path)
        elif any(line.startswith(("deb ", "deb\t", "deb[")) for line in lines):
            active.append(path)
    return active


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(root: Path) -> None:
    """Unmount whatever mmdebstrap may have left mounted below ``root``, then delete it."""
    for point in mounts_below(root):
        subprocess.run(["umount", "--lazy", point], check=False)
    left = mounts_below(root)
    if left:
        raise RootfsError(f"not removing {root}: still mounted below it: {left}")
    shutil.rmtree(root)


def run_mmdebstrap(args: Sequence[str], log: Path) -> None:
    """Run mmdebstrap; on timeout or interruption stop it with SIGTERM so it unmounts first."""
    with open(log, "wb") as output:
        process = subprocess.Popen(["mmdebstrap", *args], stdout=output, stderr=subprocess.STDOUT)
        try:
            status = process.wait(timeout=MMDEBSTRAP_TIMEOUT)
        except BaseException:
            # SIGKILL would leave its bind mounts (/dev, /sys, /proc) inside the root.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RootfsError(f"mmdebstrap {' '.join(args)} exited with {status}:\n{tail}")


@contextlib.contextmanager
def debian_root(include: Sequence[str]) -> Iterator[Path]:
    """A minimal bookworm root (``--variant=apt``) with ``include`` installed, removed on exit."""
    sources = active_apt_sources()
    if not sources:
        raise RootfsError(
            f"no active apt sources under {APT_SOURCES}: mmdebstrap needs the machine's mirror"
        )
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="lxd-agent-rootfs-"))
        stack.callback(remove_tree, work)
        root = work / "root"
        args = ["--variant=apt", "--include=" + ",".join(include), RELEASE, str(root)]
        run_mmdebstrap([*args, *map(str, sources)], work / "mmdebstrap.log")
        yield root


def chroot(root: Path, *command: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``command`` inside ``root`` with a clean environment; output is captured as text."""
    return subprocess.run(
        ["chroot", str(root), *command],
        env=CHROOT_ENV,
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def tree(root: Path) -> set[str]:
    """Every path below ``root`` (files, directories, links), as absolute paths in the root."""
    paths = set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.add("/" + str(Path(directory, name).relative_to(root)))
    return paths
