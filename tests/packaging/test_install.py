"""Install, remove and purge the .deb in a throw-away Debian root, as an image build would.

The root (mmdebstrap, ``--variant=apt``) has only what the package depends on; the .deb goes
in with ``dpkg -i`` through chroot, with no systemd running, the way it is installed into a
guest image. The maintainer scripts' guarded paths for a running VM are exercised by running
them directly with stand-ins for udevadm, ischroot and deb-systemd-invoke.

The tests share one root and run in file order: removal and purge come last.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from lxd_agent import __version__
from lxd_agent_harness.image.deb import DEB_PACKAGE
from tests.packaging.conftest import deb_field, deb_paths, relation_names
from tests.packaging.rootfs import chroot, debian_root, tree

pytestmark = pytest.mark.slow

DPKG_INFO = "/var/lib/dpkg/info"
# Paths dpkg and the test itself change during an install; not the package's files.
BOOKKEEPING = ("/var/lib/dpkg/", "/var/log/", "/var/cache/debconf/", "/tmp/")
# dpkg's own note on merged-/usr: /lib/udev/rules.d is /usr/lib/udev/rules.d, which holds
# other packages' rules. It is not a maintainer script speaking.
MERGED_USR_NOTE = f"dpkg: warning: while removing {DEB_PACKAGE}, directory '/lib/"


@dataclass
class InstalledRoot:
    root: Path
    deb_paths: dict[str, str]
    before: set[str]
    """Every path in the root before the .deb was installed."""
    install: CompletedProcess[str]


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[InstalledRoot]:
    depends = sorted(relation_names(deb_field(deb, "Depends")))
    with debian_root(depends) as root:
        before = tree(root)
        shutil.copy(deb, root / "tmp" / deb.name)
        install = chroot(root, "dpkg", "--install", f"/tmp/{deb.name}")
        (root / "tmp" / deb.name).unlink()
        yield InstalledRoot(root, deb_paths(deb), before, install)


def dpkg_status(root: Path) -> str:
    return chroot(root, "dpkg-query", "--show", "--showformat=${Status}", DEB_PACKAGE).stdout


def complaints(result: CompletedProcess[str]) -> list[str]:
    """Lines on stderr: dpkg prints maintainer scripts' errors and warnings there."""
    return [line for line in result.stderr.splitlines() if not line.startswith(MERGED_USR_NOTE)]


@contextlib.contextmanager
def stand_ins(root: Path, **scripts: str) -> Iterator[Path]:
    """Shell scripts in the root's /usr/local/bin, ahead of the real commands on the PATH.

    Each one appends its name and arguments to the returned log (a path inside the root).
    """
    bindir = root / "usr/local/bin"
    log = root / "tmp/stand-ins.log"
    made = []
    try:
        for name, body in scripts.items():
            path = bindir / name.replace("_", "-")
            record = 'echo "$(basename "$0") $*" >> /tmp/stand-ins.log'
            path.write_text(f"#!/bin/sh\n{record}\n{body}\n")
            path.chmod(0o755)
            made.append(path)
        yield log
    finally:
        for path in made:
            path.unlink()
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def running_systemd_and_udev(root: Path) -> Iterator[None]:
    """Make the root look like a booted system: /run/systemd/system and udev's control socket."""
    (root / "run/systemd/system").mkdir(parents=True)
    (root / "run/udev").mkdir()
    control = socket.socket(socket.AF_UNIX)
    try:
        control.bind(str(root / "run/udev/control"))
        yield
    finally:
        control.close()
        shutil.rmtree(root / "run/systemd")
        shutil.rmtree(root / "run/udev")


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_dpkg_install_runs_the_maintainer_scripts_without_error(installed: InstalledRoot) -> None:
    result = installed.install
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints(result) == []
    assert dpkg_status(installed.root) == "install ok installed"
    # postinst byte-compiled the modules (dh_python3's snippet ran).
    assert list((installed.root / "usr/lib/python3/dist-packages/lxd_agent").glob("__pycache__"))


def test_install_into_an_image_enables_and_configures_nothing(installed: InstalledRoot) -> None:
    new_in_etc = sorted(p for p in tree(installed.root) - installed.before if p.startswith("/etc/"))
    assert new_in_etc == []


def test_installed_agent_runs_on_the_roots_python(installed: InstalledRoot) -> None:
    version = chroot(installed.root, "lxd-agent", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"lxd-agent {__version__}"
    imports = chroot(installed.root, "python3", "-c", "import systemd.daemon, lxd_agent.guest.cli")
    assert imports.returncode == 0, imports.stderr


def test_postinst_replays_port_events_only_on_a_running_system_outside_a_chroot(
    installed: InstalledRoot,
) -> None:
    root = installed.root
    postinst = f"{DPKG_INFO}/{DEB_PACKAGE}.postinst"
    with stand_ins(root, udevadm="exit 0", deb_systemd_invoke="exit 0") as log:
        # An image build: no systemd running.
        assert chroot(root, postinst, "configure", "").returncode == 0
        assert logged(log) == []
        with running_systemd_and_udev(root):
            # A chroot on a booted build host: the host's devices must not be touched.
            assert chroot(root, postinst, "configure", "").returncode == 0
            assert logged(log) == []
            with stand_ins(root, ischroot="exit 1"):
                result = chroot(root, "env", "DPKG_ROOT=/", postinst, "configure", "")
                assert result.returncode == 0
                assert logged(log) == []
                # A running VM: reload the rules, replay "add" for the virtio ports and start
                # the agent (a replaced package's rule already made the ports want it).
                result = chroot(root, postinst, "configure", "")
                assert result.returncode == 0, result.stderr
                assert logged(log) == [
                    "ischroot -t",
                    "udevadm control --reload-rules",
                    "udevadm trigger --action=add --subsystem-match=virtio-ports",
                    "deb-systemd-invoke start lxd-agent.service",
                ]


def test_prerm_stops_the_agent_only_on_removal_from_a_running_system(
    installed: InstalledRoot,
) -> None:
    root = installed.root
    prerm = f"{DPKG_INFO}/{DEB_PACKAGE}.prerm"
    with stand_ins(root, deb_systemd_invoke="exit 0") as log:
        assert chroot(root, prerm, "remove").returncode == 0
        assert logged(log) == []
        with running_systemd_and_udev(root):
            assert chroot(root, prerm, "upgrade", __version__).returncode == 0
            assert logged(log) == []
            assert chroot(root, prerm, "remove").returncode == 0
            assert logged(log) == ["deb-systemd-invoke stop lxd-agent.service"]


def test_postrm_makes_the_ports_forget_the_agent_only_on_removal_from_a_running_vm(
    installed: InstalledRoot,
) -> None:
    root = installed.root
    postrm = f"{DPKG_INFO}/{DEB_PACKAGE}.postrm"
    with stand_ins(root, udevadm="exit 0") as log:
        assert chroot(root, postrm, "remove").returncode == 0
        assert logged(log) == []
        with running_systemd_and_udev(root):
            # A chroot on a booted build host: the host's devices must not be touched.
            assert chroot(root, postrm, "remove").returncode == 0
            assert logged(log) == []
            with stand_ins(root, ischroot="exit 1"):
                assert chroot(root, postrm, "upgrade", __version__).returncode == 0
                assert logged(log) == []
                result = chroot(root, postrm, "remove")
                assert result.returncode == 0, result.stderr
                assert logged(log) == [
                    "ischroot -t",
                    "udevadm control --reload-rules",
                    "udevadm trigger --action=change --subsystem-match=virtio-ports",
                ]


def test_remove_then_purge_leaves_none_of_its_files(installed: InstalledRoot) -> None:
    root = installed.root
    remove = chroot(root, "dpkg", "--remove", DEB_PACKAGE)
    assert remove.returncode == 0, remove.stdout + remove.stderr
    assert complaints(remove) == []
    left = [p for p, mode in installed.deb_paths.items() if not mode.startswith("d")]
    assert [p for p in left if (root / p.lstrip("/")).exists()] == []

    purge = chroot(root, "dpkg", "--purge", DEB_PACKAGE)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert complaints(purge) == []
    assert dpkg_status(root) == ""
    # Nothing new anywhere: not its files, not its byte-code, not its directories.
    new = sorted(p for p in tree(root) - installed.before if not p.startswith(BOOKKEEPING))
    assert new == []
    assert list((root / DPKG_INFO.lstrip("/")).glob(f"{DEB_PACKAGE}.*")) == []
