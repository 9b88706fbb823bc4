"""The agent's Debian package that the harness installs into guests: its name, and which file.

The harness boots guests with the agent's `.deb` in them, and it does not build that package
(the agent's source tree does, `make deb`). It is taken, first to last, from the `--deb` option,
from `$LXD_AGENT_DEB`, or as the newest `out/<name>_*_all.deb` in the current directory or, when
the harness runs from a clone of the project, in that clone. Finding none is one error that
names all three ways.

Host side only: the guest agent never imports this module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from lxd_agent_harness.base.errors import HarnessError

DEB_PACKAGE = "lxd-status-agent"
"""The binary package. Not `lxd-agent`: Debian's archive has a package of that name (LXD's Go
agent, from before the port rename) which apt would take for a newer version of ours."""

DEB_GLOB = f"{DEB_PACKAGE}_*_all.deb"

DEB_VARIABLE = "LXD_AGENT_DEB"
"""Names the agent's .deb when no `--deb` is given (a CI job that built it elsewhere, the tests)."""


def source_tree() -> Path | None:
    """The clone of the project this harness runs from (an editable install), or None.

    A clone is recognised by the agent's Debian source next to the harness's folder, so an
    installed wheel (in site-packages) never looks around the directories above it.
    """
    top = Path(__file__).resolve().parents[3]
    return top if (top / "debian" / "control").is_file() and (top / "harness").is_dir() else None


class PackageNotFound(HarnessError):
    """No agent package where one was looked for."""

    def __init__(
        self, looked_in: Sequence[Path], given: Path | None = None, given_by: str = ""
    ) -> None:
        self.looked_in = list(looked_in)
        """The `out/` directories searched for `DEB_GLOB`; empty when a path was given."""
        self.given = given
        """The path given by `--deb` or `$LXD_AGENT_DEB` that is no file; None if none was."""
        self.given_by = given_by
        """Who gave `given`: `--deb` or `LXD_AGENT_DEB`; empty when nothing was given."""
        if given is not None and given_by == DEB_VARIABLE:
            message = (
                f"{DEB_VARIABLE} names the agent's package {given}, and there is no such file; "
                f"point it at an existing .deb or pass --deb"
            )
        elif given is not None:
            message = (
                f"looked for the agent's package {given} and found nothing; pass an existing "
                "--deb (in a clone of the project, `make deb` makes one)"
            )
        else:
            places = " and ".join(str(p) for p in self.looked_in)
            message = (
                f"no agent package: pass --deb PATH or set {DEB_VARIABLE}=PATH "
                f"(no {DEB_GLOB} in {places}; in a clone of the project, `make deb` makes one)"
            )
        super().__init__(message)


def find_deb(given: Path | None = None, places: Sequence[Path] | None = None) -> Path:
    """The agent's .deb: `given`, else `$LXD_AGENT_DEB`, else the newest in `places`' `out/`.

    `places` defaults to the current directory and the clone the harness runs from, if any.
    """
    given_by = "--deb"
    if given is None and os.environ.get(DEB_VARIABLE):
        given, given_by = Path(os.environ[DEB_VARIABLE]), DEB_VARIABLE
    if given is not None:
        if not given.is_file():
            raise PackageNotFound([], given, given_by)
        return given
    if places is None:
        tree = source_tree()
        places = [Path.cwd()] if tree is None else [Path.cwd(), tree]
    outs = list(dict.fromkeys(place / "out" for place in places))
    debs = [deb for out in outs for deb in out.glob(DEB_GLOB)]
    if not debs:
        raise PackageNotFound(outs)
    return max(debs, key=lambda deb: deb.stat().st_mtime)


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
