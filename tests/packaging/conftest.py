"""The built .deb, as the packaging tests see it.

The tests check the artefact that `make deb` (packaging/build-deb) leaves in out/, found as
the harness finds it (`lxd_agent_harness.image.deb`); they never build it themselves. A missing
.deb is a failure that says how to make one, never a skip.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lxd_agent_harness.image.deb import PackageNotFound
from tests.repo import built_deb


@pytest.fixture(scope="session")
def deb() -> Path:
    """The package under test: the newest in out/, or `$LXD_AGENT_DEB`."""
    try:
        return built_deb()
    except PackageNotFound as e:
        pytest.fail(str(e), pytrace=False)


def deb_paths(deb: Path) -> dict[str, str]:
    """Map each path in the .deb (absolute, no trailing slash) to its `dpkg-deb -c` mode."""
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], check=True, capture_output=True, text=True
    ).stdout
    paths: dict[str, str] = {}
    for line in listing.splitlines():
        # "-rw-r--r-- root/root 123 2026-01-01 00:00 ./usr/bin/x" (symlinks add " -> target")
        mode, _owner, _size, _date, _time, name = line.split(maxsplit=5)
        name = name.split(" -> ")[0]
        path = "/" + name.lstrip("./").rstrip("/")
        paths[path] = mode
    return paths


@pytest.fixture(scope="session")
def contents(deb: Path) -> dict[str, str]:
    """Every path the .deb ships, with its mode string."""
    return deb_paths(deb)


def deb_field(deb: Path, field: str) -> str:
    """One field of the binary package's control file ("" when it is absent)."""
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    """A member of the control archive (a maintainer script, md5sums...) as text."""
    return subprocess.run(
        ["dpkg-deb", "--info", str(deb), name], check=True, capture_output=True, text=True
    ).stdout


def relation_names(field: str) -> dict[str, str]:
    """Map each package named in a relation field to its version constraint ("" if none)."""
    relations: dict[str, str] = {}
    for clause in filter(None, (c.strip() for c in field.split(","))):
        match = re.fullmatch(r"([a-z0-9.+-]+)(?::any)?\s*(?:\((.+)\))?", clause)
        assert match, f"unexpected relation {clause!r}"
        relations[match.group(1)] = match.group(2) or ""
    return relations
