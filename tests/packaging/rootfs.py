"""A throw-away Debian root for installing the .deb, built with mmdebstrap.

The root's apt sources are the harness's (`image.aptsources.filter_apt_sources`): the
machine's own mirror, with the suites of the release asked for, so no mirror is named anywhere
in the project and the root can run apt against the archive (its package lists are kept).
Everything lives in a temporary directory that is removed on every exit path, after making sure
nothing is still mounted below it: removing a tree with the host's /dev or /sys bind-mounted
inside would delete the host's files.
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

from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE, filter_apt_sources
from lxd_agent_harness.image.buildsteps import detach_mounts_under, mounts_under

MMDEBSTRAP_TIMEOUT = 300.0
# What a chroot'ed command sees: dpkg's usual PATH, and no pyenv, venv or locale from the
# test's environment.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


class RootfsError(Exception):
    """The throw-away root could not be built or cleaned up."""


def remove_tree(root: Path) -> None:
    """Detach whatever mmdebstrap may have left mounted below `root`, then delete it."""
    detach_mounts_under(root)
    left = mounts_under(root)
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
def debian_root(include: Sequence[str], release: str = DEFAULT_RELEASE) -> Iterator[Path]:
    """A minimal root (`--variant=apt`) of `release` with `include` installed, removed on exit.

    apt's package lists stay in the root, so `apt-get` in it sees the archive as it is now.
    """
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="lxd-agent-rootfs-"))
        stack.callback(remove_tree, work)
        sources = work / "host.sources"
        sources.write_text(filter_apt_sources(release), encoding="utf-8")
        root = work / "root"
        args = [
            "--variant=apt",
            "--skip=cleanup/apt/lists",
            "--include=" + ",".join(include),
            release,
            str(root),
            str(sources),
        ]
        run_mmdebstrap(args, work / "mmdebstrap.log")
        yield root


def chroot(
    root: Path, *command: str, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `command` inside `root` with a clean environment; output is captured as text."""
    return subprocess.run(
        ["chroot", str(root), *command],
        env=CHROOT_ENV,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def tree(root: Path) -> set[str]:
    """Every path below `root` (files, directories, links), as absolute paths in the root."""
    paths = set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.add("/" + str(Path(directory, name).relative_to(root)))
    return paths
