"""The Debian package the harness installs into guests: its name, and where to find the built one.

`make deb` (packaging/build-deb) leaves `out/<name>_<version>_all.deb` in the source tree. The
command line, the packaging tests and the VM tests all find it here, the same way.

Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from lxd_agent.host.errors import HarnessError

DEB_PACKAGE = "lxd-status-agent"
"""The binary package. Not `lxd-agent`: Debian's archive has a package of that name (LXD's Go
agent, from before the port rename) which apt would take for a newer version of ours."""

DEB_GLOB = f"{DEB_PACKAGE}_*_all.deb"

SOURCE_TREE = Path(__file__).resolve().parents[2]

TEST_DEB_VARIABLE = "LXD_AGENT_TEST_DEB"
"""Names a .deb for the tests to use instead of the newest in out/ (e.g. one CI built elsewhere)."""


class PackageNotFound(HarnessError):
    """No built package where one was looked for."""

    def __init__(self, looked_in: Sequence[Path], given: Path | None = None) -> None:
        self.looked_in = list(looked_in)
        self.given = given
        if given is not None:
            message = f"looked for the package {given} and found nothing; run `make deb` first"
        else:
            places = " and ".join(str(p) for p in self.looked_in)
            message = (
                f"looked for out/{DEB_GLOB} in {places} and found none; "
                "run `make deb` first or pass --deb PATH"
            )
        super().__init__(message)


def find_deb(given: Path | None = None, places: Sequence[Path] | None = None) -> Path:
    """`given` if it is a file; else the newest `out/<package>_*_all.deb` in `places`.

    `places` defaults to the current directory and the source tree this module runs from.
    """
    if given is not None:
        if not given.is_file():
            raise PackageNotFound([], given)
        return given
    if places is None:
        places = [Path.cwd(), SOURCE_TREE]
    outs = list(dict.fromkeys(place / "out" for place in places))
    debs = [deb for out in outs for deb in out.glob(DEB_GLOB)]
    if not debs:
        raise PackageNotFound(outs)
    return max(debs, key=lambda deb: deb.stat().st_mtime)


def find_test_deb() -> Path:
    """The package the tests use: `$LXD_AGENT_TEST_DEB` if set, else the newest in out/."""
    chosen = os.environ.get(TEST_DEB_VARIABLE)
    return find_deb(Path(chosen) if chosen else None, places=[SOURCE_TREE])


class BadPackage(HarnessError):
    """A file given as the package is no readable .deb (`dpkg-deb` says why)."""

    def __init__(self, path: Path, check: str, reason: str) -> None:
        self.path = path
        self.check = check
        """The `dpkg-deb` command that refused it (`--info`: its control part; `--fsys-tarfile`:
        its files)."""
        self.reason = reason
        """`dpkg-deb`'s own last error line."""
        super().__init__(
            f"the package {path} is not a usable .deb: dpkg-deb {check} says {reason!r}; "
            "rebuild it with `make deb` or pass another --deb"
        )


# dpkg-deb reads a 25 KB package in milliseconds; a stuck one must not hold the harness.
DEB_CHECK_TIMEOUT = 60.0


def check_deb(path: Path) -> None:
    """A `BadPackage` unless `dpkg-deb` can read both the control part and the files of `path`.

    Run before an image is built: a corrupt .deb otherwise fails deep inside mmdebstrap, where
    the cause is one line among hundreds. No-op where dpkg-deb is missing (not a Debian host).
    """
    if shutil.which("dpkg-deb") is None:
        return
    for check in ("--info", "--fsys-tarfile"):
        try:
            done = subprocess.run(
                ["dpkg-deb", check, str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                timeout=DEB_CHECK_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise BadPackage(path, check, f"no answer in {DEB_CHECK_TIMEOUT:g} s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            # The first error names the cause; later ones are its consequences (tar, pipes).
            reason = lines[0] if lines else f"exit status {done.returncode}"
            raise BadPackage(path, check, reason)
