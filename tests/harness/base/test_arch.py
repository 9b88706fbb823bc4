"""Tests for lxd_agent_harness.base.arch: the guests' architectures by Debian's and the kernel's
names."""

from __future__ import annotations

import pytest

from lxd_agent_harness.base.arch import Arch, ArchError, host_arch


def test_the_host_is_named_as_debian_names_it() -> None:
    assert host_arch("x86_64") is Arch.AMD64
    assert host_arch("aarch64") is Arch.ARM64
    assert [a.kernel_name for a in Arch] == ["x86_64", "aarch64"]
    assert host_arch() in Arch


def test_an_architecture_the_harness_does_not_run_is_an_error_naming_those_it_does() -> None:
    with pytest.raises(ArchError) as raised:
        host_arch("riscv64")
    assert "amd64, arm64" in str(raised.value)
