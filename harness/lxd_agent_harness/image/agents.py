"""The agents the compatibility matrix boots: ours, and two emulations of LXD's own agent.

LXD's agent cannot run outside LXD: its unit's `ExecStartPre` mounts LXD's config drive and
fails without it, and the agent itself exits before its first status line without vsock and
the host's certificate (README, "The compatibility matrix"). So the project wrote a small
emulation of its status behaviour (`emulated/emulated_lxd_agent.py`, package data) and runs it
under LXD's own unit and udev rule, for the generation before the port rename (LXD 5.0) and
after it (LXD 5.21). Each is packaged here as a .deb with `dpkg-deb`, so it goes into an
image the way every package does; the build is reproducible (fixed times, root-owned files), so
an unchanged emulation keeps its cached image.

Host side only: nothing here runs in a guest; the files it packages do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME
from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.base.progress import Progress
from lxd_agent_harness.image.deb import DEB_PACKAGE, check_deb
from lxd_agent_harness.image.rootfs import ImageSpec, build_image
from lxd_agent_harness.vm.config import GuestImage

EMULATIONS_DIR = Path(__file__).resolve().parent / "emulated"
"""The emulations' program, units and udev rules: package data, shipped in the wheel."""
AGENT_SCRIPT = "emulated_lxd_agent.py"
INSTALLED_AGENT = "usr/libexec/lxd-agent-emulation/lxd-agent"
# Every file in the package gets this time, and dpkg-deb uses it for the archive's members:
# the same inputs give the same .deb, byte for byte.
SOURCE_DATE_EPOCH = 1700000000
DEB_BUILD_TIMEOUT = 60.0

OURS = "ours"


@dataclass(frozen=True)
class MatrixAgent:
    """One column of agents in the matrix: ours, or an emulation of one of LXD's."""

    name: str
    title: str
    """How the matrix's table names it."""
    follows: str
    """What it is, or for an emulation the upstream sources it copies."""
    package: str = DEB_PACKAGE
    files: str = ""
    """For an emulation: its directory under `EMULATIONS_DIR` (unit, udev rule)."""
    enable: bool = False
    """The package enables its unit (`WantedBy=`), as LXD 5.0's install.sh does."""

    @property
    def is_emulation(self) -> bool:
        return bool(self.files)


AGENTS: dict[str, MatrixAgent] = {
    agent.name: agent
    for agent in (
        MatrixAgent(
            name=OURS,
            title=f"{DEB_PACKAGE} (ours)",
            follows="this project's agent: new name first, legacy fallback, never blocks",
        ),
        MatrixAgent(
            name="lxd-5.0",
            title="LXD 5.0 agent (emulation)",
            follows=(
                f"LXD 5.0.2 lxd-agent/main_agent.go (writes only {LEGACY_PORT_NAME}, blocking); "
                "unit and udev rule of LXD 5.0.2's config drive, enabled as its install.sh does"
            ),
            package="lxd-agent-emulation-5.0",
            files="lxd-5.0",
            enable=True,
        ),
        MatrixAgent(
            name="lxd-5.21",
            title="LXD 5.21 agent (emulation)",
            follows=(
                f"LXD 5.21.0 lxd-agent/main_agent.go (writes only {PORT_NAME}, blocking); "
                "unit and udev rule of LXD 5.21.0's config drive"
            ),
            package="lxd-agent-emulation-5.21",
            files="lxd-5.21",
        ),
    )
}


class EmulationError(HarnessError):
    """An emulation's package could not be made."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output
        """dpkg-deb's own output, when it refused."""


def _control(agent: MatrixAgent) -> str:
    others = [a.package for a in AGENTS.values() if a.package != agent.package]
    return (
        f"Package: {agent.package}\n"
        "Version: 0.2.0\n"
        "Architecture: all\n"
        "Maintainer: lxd-agent developers <lxd-agent@localhost>\n"
        "Depends: python3, systemd\n"
        f"Conflicts: lxd-agent, {', '.join(others)}\n"
        "Section: admin\n"
        "Priority: optional\n"
        f"Description: {agent.title}, for lxd-agent-harness matrix\n"
        f" Test fixture, not for use: {agent.follows}.\n"
    )


# LXD 5.0's install.sh runs `systemctl enable lxd-agent.service`; in a package that is
# deb-systemd-helper's job (what Debian's lxd-agent postinst runs, from debhelper).
_ENABLE = """\
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  deb-systemd-helper enable lxd-agent.service >/dev/null || true
fi
"""


def _tree(agent: MatrixAgent, root: Path) -> None:
    """The package's files under `root`, times fixed."""
    source = EMULATIONS_DIR / agent.files
    files = {
        INSTALLED_AGENT: (EMULATIONS_DIR / AGENT_SCRIPT).read_text(),
        "lib/systemd/system/lxd-agent.service": (source / "lxd-agent.service").read_text(),
        "DEBIAN/control": _control(agent),
    }
    rules = source / "99-lxd-agent.rules"
    if rules.is_file():
        files["lib/udev/rules.d/99-lxd-agent.rules"] = rules.read_text()
    if agent.enable:
        files["DEBIAN/postinst"] = _ENABLE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        executable = name == INSTALLED_AGENT or name == "DEBIAN/postinst"
        path.chmod(0o755 if executable else 0o644)
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_dir():
            path.chmod(0o755)
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    os.utime(root, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))


def _inputs_key(agent: MatrixAgent) -> str:
    digest = hashlib.sha256(_control(agent).encode())
    digest.update(f"{INSTALLED_AGENT}\0{_ENABLE if agent.enable else ''}".encode())
    for path in sorted((EMULATIONS_DIR / agent.files).iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update((EMULATIONS_DIR / AGENT_SCRIPT).read_bytes())
    return digest.hexdigest()[:16]


def emulation_deb(agent: MatrixAgent, progress: Progress) -> Path:
    """The emulation's .deb, built with `dpkg-deb` into the cache on first use."""
    if not agent.is_emulation:
        raise EmulationError(
            f"{agent.name} is no emulation; its package is the agent's .deb (--deb)"
        )
    if not (EMULATIONS_DIR / AGENT_SCRIPT).is_file():
        raise EmulationError(
            f"looked for the emulations in {EMULATIONS_DIR} and found nothing; "
            "reinstall lxd-agent-harness (its package data is missing)"
        )
    if shutil.which("dpkg-deb") is None:
        raise EmulationError(
            "dpkg-deb is not on PATH; install Debian's dpkg (`apt-get install dpkg`)"
        )
    directory = cache_root() / "emulations" / _inputs_key(agent)
    deb = directory / f"{agent.package}_0.2.0_all.deb"
    if deb.is_file():
        return deb
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as work:
        root = Path(work) / "root"
        _tree(agent, root)
        built = Path(work) / deb.name
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
        try:
            done = subprocess.run(
                ["dpkg-deb", "--root-owner-group", "--build", str(root), str(built)],
                capture_output=True,
                text=True,
                errors="replace",
                env=env,
                timeout=DEB_BUILD_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise EmulationError(
                f"dpkg-deb did not build {deb.name} within {DEB_BUILD_TIMEOUT:g} s"
            ) from None
        if done.returncode != 0:
            raise EmulationError(
                f"dpkg-deb could not build {deb.name} (exit status {done.returncode}); "
                "see its output",
                output=done.stdout + done.stderr,
            )
        check_deb(built)
        os.replace(built, deb)  # whole or not at all
    progress(f"emulation: built {deb.name}")
    return deb


def agent_images(
    agents: Sequence[MatrixAgent],
    ours: Path,
    release: str,
    progress: Progress,
    rebuild: bool,
    arch: Arch = Arch.AMD64,
) -> dict[str, GuestImage]:
    """Each agent's image by name: the base image with its package (ours is `ours`), cached."""
    images = {}
    for agent in agents:
        deb = emulation_deb(agent, progress) if agent.is_emulation else ours
        spec = ImageSpec(release=release, debs=(deb,), arch=arch)
        images[agent.name] = build_image(spec, progress, rebuild=rebuild)
    return images
