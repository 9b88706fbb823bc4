"""Tests for lxd_agent_harness.host.packages: Debian's packages from the host's own apt sources,
unpacked into a cache and run from there (real apt-get download, real dpkg-deb)."""

from __future__ import annotations

import os
import subprocess

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.host.packages import (
    QEMU_PACKAGES,
    QEMU_SUITE,
    candidate_version,
    compat_qemu,
    incus_from_backports,
)


def test_the_bookworm_version_comes_from_the_hosts_apt_sources() -> None:
    version = candidate_version(QEMU_PACKAGES[0], QEMU_SUITE)
    assert version.startswith("1:7.2+dfsg"), version  # Debian 12's QEMU


def test_the_wrapper_runs_qemu_7_2_from_the_cache() -> None:
    # The shared cache: the real-daemon tests use the same entry.
    directory = compat_qemu(print, cache_root())
    done = subprocess.run(
        [str(directory / "qemu-system-x86_64"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "QEMU emulator version 7.2." in done.stdout


def test_incus_from_backports_runs_with_its_own_libraries() -> None:
    incus = incus_from_backports(print, cache_root())
    env = dict(os.environ, LD_LIBRARY_PATH=str(incus.library_path))
    done = subprocess.run(
        [str(incus.incusd), "--version"], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.startswith("6.0."), done.stdout
