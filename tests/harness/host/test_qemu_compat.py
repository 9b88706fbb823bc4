"""Tests for lxd_agent_harness.host.qemu_compat: Debian 12's QEMU from the host's own apt
sources, unpacked into a cache and run through its wrapper (real apt-get download, real dpkg)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lxd_agent_harness.base.cache import cache_root
from lxd_agent_harness.host.qemu_compat import candidate_version, compat_qemu


def test_the_bookworm_version_comes_from_the_hosts_apt_sources() -> None:
    version = candidate_version()
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
    assert Path(directory / "qemu-system-x86_64").read_text().startswith("#!/bin/sh\n")
