"""The package against Debian's own archive, with real apt, in Debian 11, 12 and 13 roots.

Debian's archive has a package called `lxd-agent` (LXD's Go agent, from before the port rename)
that ships the same /usr/bin/lxd-agent and lxd-agent.service as ours. Ours is called
lxd-status-agent and declares Conflicts/Replaces: lxd-agent, so that:
- `apt-get upgrade` never swaps ours for Debian's (it did while ours was `lxd-agent 0.1.0`);
- installing Debian's removes ours, and installing ours removes Debian's (or our own 0.1.0),
  with no file clash and no file of ours lost, also on merged-/usr trixie where Debian's unit
  is /usr/lib/systemd/system/lxd-agent.service and ours /lib/systemd/system/lxd-agent.service.

Each release gets one root (mmdebstrap from the machine's own mirror, package lists kept) and one
test that walks the whole story, so a failure names the step. That the agent then runs is shown
in real guests by tests/in_vm/test_releases.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from lxd_agent_harness.image.aptsources import RELEASES
from lxd_agent_harness.image.deb import DEB_PACKAGE
from tests.packaging.rootfs import chroot, debian_root
from tests.repo import REPO

pytestmark = pytest.mark.slow

DEBIAN_PACKAGE = "lxd-agent"
# facts §7: LXD came to Debian with bookworm; bullseye's archive has no lxd-agent. Checked
# against the archive below, so a change there fails the test instead of going unnoticed.
DEBIAN_HAS_LXD_AGENT = {"bullseye": False, "bookworm": True, "trixie": True}

# The last commit of this project whose package was called lxd-agent (version 0.1.0).
LAST_RELEASE_AS_LXD_AGENT = "d7e9f2ca43efda569d7839431a44aba9acf4c3d6"

UNIT = "lxd-agent.service"
UNIT_PATH = "/lib/systemd/system/" + UNIT  # ours, as debhelper 13.11 installs it
UNIT_ALIAS = "/usr/lib/systemd/system/" + UNIT  # Debian 13's lxd-agent
APT_TIMEOUT = 300.0
# A build uses Debian's own tools and python3, never a venv's.
BUILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": os.environ.get("HOME", "/root"),
}


@pytest.fixture(scope="session")
def lxd_agent_0_1_0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our own package as it was before the rename (lxd-agent 0.1.0), built from git history."""
    work = tmp_path_factory.mktemp("lxd-agent-0.1.0")
    source = work / "source"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", LAST_RELEASE_AS_LXD_AGENT],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        pytest.fail(
            f"git archive {LAST_RELEASE_AS_LXD_AGENT} failed ({archive.stderr.decode().strip()}): "
            "this test builds the package's 0.1.0 from history; run it in a full clone"
        )
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    build = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=source,
        env=BUILD_ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (deb,) = work.glob(f"{DEBIAN_PACKAGE}_0.1.0_all.deb")
    return deb


@pytest.fixture(scope="module", params=list(RELEASES))
def release_root(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """A root of the release with our dependencies (and nothing of ours) installed."""
    release: str = request.param
    with debian_root(["python3-systemd"], release=release) as root:
        yield release, root


def apt_get(root: Path, *args: str) -> CompletedProcess[str]:
    return chroot(root, "apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0", *args, timeout=APT_TIMEOUT)


def simulate(root: Path, *args: str) -> tuple[list[str], str]:
    """The actions `apt-get -s ARGS` would take (Inst/Remv lines) and its summary line."""
    result = apt_get(root, "-s", *args)
    lines = result.stdout.splitlines()
    actions = [line for line in lines if line.startswith(("Inst ", "Remv "))]
    summary = next((line for line in lines if " upgraded, " in line), "")
    return actions, summary


def installed(root: Path, package: str) -> bool:
    """dpkg has `package` installed (not removed with its configuration left, not unknown)."""
    result = chroot(root, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}", package)
    return result.returncode == 0 and result.stdout[1:2] == "i"


def candidate(root: Path, package: str) -> str:
    """apt's candidate version of `package` in the root's archive, "" when there is none."""
    result = chroot(root, "apt-cache", "policy", package)
    for line in result.stdout.splitlines():
        if line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            return "" if value == "(none)" else value
    return ""


def assert_clean(root: Path, result: CompletedProcess[str], package: str) -> None:
    """The install went through, and every file of `package` is there as shipped."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "trying to overwrite" not in output, output
    assert installed(root, package)
    verify = chroot(root, "dpkg", "--verify", package)
    assert verify.returncode == 0 and verify.stdout == "", verify.stdout + verify.stderr


def assert_ours_in_place(root: Path) -> None:
    """Our unit, under both of its names, and no diversion of ours left behind."""
    shipped = (REPO / "systemd" / UNIT).read_bytes()
    assert (root / UNIT_PATH.lstrip("/")).read_bytes() == shipped
    # The same file as the one above on merged /usr; never another package's left behind.
    alias = root / UNIT_ALIAS.lstrip("/")
    if alias.exists():
        assert alias.read_bytes() == shipped
    diversions = chroot(root, "dpkg-divert", "--list").stdout
    assert DEB_PACKAGE not in diversions, diversions


def test_apt_keeps_our_package_and_swaps_with_debians_lxd_agent_cleanly(
    release_root: tuple[str, Path], deb: Path, lxd_agent_0_1_0: Path
) -> None:
    release, root = release_root
    ours = f"/tmp/{deb.name}"
    old = f"/tmp/{lxd_agent_0_1_0.name}"
    (root / ours.lstrip("/")).write_bytes(deb.read_bytes())
    (root / old.lstrip("/")).write_bytes(lxd_agent_0_1_0.read_bytes())
    debian_version = candidate(root, DEBIAN_PACKAGE)
    assert bool(debian_version) == DEBIAN_HAS_LXD_AGENT[release], (
        f"{release}'s archive has lxd-agent {debian_version or '(none)'}: update facts §7 and "
        "DEBIAN_HAS_LXD_AGENT"
    )

    # 1. Our 0.1.0, called lxd-agent: apt takes Debian's lxd-agent for its upgrade.
    assert_clean(root, chroot(root, "dpkg", "-i", old), DEBIAN_PACKAGE)
    actions, _ = simulate(root, "upgrade")
    if debian_version:
        upgrade = f"Inst {DEBIAN_PACKAGE} [0.1.0] ({debian_version}"
        assert any(a.startswith(upgrade) for a in actions), actions

    # 2. Ours installed over it, as the one-liner in the README: 0.1.0 is removed, nothing lost.
    result = apt_get(root, "install", ours)
    assert_clean(root, result, DEB_PACKAGE)
    assert not installed(root, DEBIAN_PACKAGE)
    assert_ours_in_place(root)

    # 3. apt upgrade proposes nothing for it.
    actions, summary = simulate(root, "upgrade")
    print(f"{release}: apt-get -s upgrade with {DEB_PACKAGE} installed: {summary}")
    assert [a for a in actions if DEBIAN_PACKAGE in a or DEB_PACKAGE in a] == []

    if not debian_version:
        actions, _ = simulate(root, "install", DEBIAN_PACKAGE)
        assert actions == []
        return

    # 4. Installing Debian's lxd-agent removes ours, by the declared conflict.
    actions, _ = simulate(root, "install", DEBIAN_PACKAGE)
    assert f"Remv {DEB_PACKAGE} [{deb_version(deb)}]" in actions, actions
    assert any(a.startswith(f"Inst {DEBIAN_PACKAGE} ({debian_version}") for a in actions), actions
    result = apt_get(root, "install", DEBIAN_PACKAGE)
    assert_clean(root, result, DEBIAN_PACKAGE)
    assert not installed(root, DEB_PACKAGE)

    # 5. ...and installing ours removes Debian's, with apt and with plain dpkg.
    result = apt_get(root, "install", ours)
    assert_clean(root, result, DEB_PACKAGE)
    assert not installed(root, DEBIAN_PACKAGE)
    assert_ours_in_place(root)
    assert not (root / "usr/lib/systemd/lxd-agent-setup").exists()

    assert_clean(root, apt_get(root, "install", DEBIAN_PACKAGE), DEBIAN_PACKAGE)
    result = chroot(root, "dpkg", "-i", ours)
    assert_clean(root, result, DEB_PACKAGE)
    assert not installed(root, DEBIAN_PACKAGE)
    assert_ours_in_place(root)

    actions, summary = simulate(root, "upgrade")
    assert [a for a in actions if DEBIAN_PACKAGE in a or DEB_PACKAGE in a] == []


def deb_version(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
