"""Tests for lxd_agent_harness.image.foreign: a foreign tree's binaries run through qemu-user,
registered in a user namespace's own binfmt_misc, and the host's binfmt_misc is left alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.image.foreign import (
    ForeignArchError,
    foreign_command,
    launcher,
    registration,
)

OTHER = Arch.ARM64 if host_arch() is Arch.AMD64 else Arch.AMD64


def host_binfmt() -> tuple[bool, list[str]]:
    """Whether the host has binfmt_misc mounted, and its entries."""
    mounted = "binfmt_misc" in Path("/proc/self/mounts").read_text()
    entries = sorted(p.name for p in Path("/proc/sys/fs/binfmt_misc").iterdir()) if mounted else []
    return mounted, entries


def test_the_rule_is_debians_magic_with_qemu_user_static_opened_at_registration() -> None:
    rule = registration(OTHER)
    name, kind, _offset, magic, mask, interpreter, flags = rule.split(":")[1:]
    assert (name, kind, flags) == (f"qemu-{OTHER.kernel_name}", "M", "F")
    assert interpreter == f"/usr/bin/qemu-{OTHER.kernel_name}-static"
    assert magic.startswith("\\x7fELF") or magic.startswith("\\x7f\\x45\\x4c\\x46"), magic
    assert len(mask) == len(magic)


def test_without_qemu_user_static_the_error_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ForeignArchError) as raised:
        registration(OTHER, binfmt_dir=tmp_path)
    assert raised.value.arch == OTHER.value
    assert "install Debian's qemu-user-static" in str(raised.value)


def test_the_hosts_own_architecture_runs_as_it_is() -> None:
    command, how = foreign_command(host_arch(), ["mmdebstrap", "x"])
    assert command == ["mmdebstrap", "x"] and "this host's own" in how


def test_another_architecture_runs_in_a_namespace_and_the_host_is_left_alone() -> None:
    before = host_binfmt()
    command, how = foreign_command(OTHER, ["arch-test", OTHER.value])
    assert command[: len(launcher(OTHER))] == launcher(OTHER), how
    assert "the host's is left alone" in how
    ran = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and f"{OTHER.value}: ok" in ran.stdout, ran.stdout + ran.stderr
    assert host_binfmt() == before
