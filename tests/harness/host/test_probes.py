"""Tests for lxd_agent_harness.host.probes: each limit found only where it is, and named."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.host import probes


def test_a_loaded_vsock_module_needs_no_stub(tmp_path: Path) -> None:
    assert probes.vsock_module_missing(tmp_path) is None  # the module's /sys directory is there


def test_no_vsock_module_and_no_modprobe_gets_the_stub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no modprobe on it
    found = probes.vsock_module_missing(tmp_path / "vhost_vsock")
    assert found is not None and found.name == "modprobe-stub"
    assert "there is no modprobe" in found.reason


def test_a_missing_vsock_device_removes_the_vms_vsock(tmp_path: Path) -> None:
    assert probes.vsock_device_missing(tmp_path) is None
    found = probes.vsock_device_missing(tmp_path / "vhost-vsock")
    assert found is not None and found.name == "no-vsock-device"


@pytest.mark.parametrize(
    ("daemon", "qemu", "adapted"),
    [
        ((5, 0, 2), 10, True),  # Debian's LXD 5.0.2 on QEMU from backports: facts §13
        ((5, 0, 2), 7, False),  # on Debian 12's own QEMU
        ((5, 0, 2), None, False),  # no QEMU: the daemon says so itself
        ((5, 21, 0), 10, False),  # a series not known to need an older QEMU
    ],
)
def test_an_older_qemu_only_for_a_daemon_that_needs_it(
    daemon: tuple[int, ...], qemu: int | None, adapted: bool
) -> None:
    found = probes.qemu_too_new(daemon, qemu)
    assert (found is not None) == adapted
    if found is not None:
        assert found.name == "qemu-7.2" and "QEMU 10" in found.reason


def test_the_memlock_probe_agrees_with_what_the_kernel_allows() -> None:
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))  # a no-op is always allowed
        can_raise = hard == resource.RLIM_INFINITY
    except OSError:
        can_raise = False
    found = probes.memlock_fixed()
    if can_raise:
        assert found is None
    else:
        # Raising the hard limit needs CAP_SYS_RESOURCE, which this machine's root lacks.
        assert found is not None and found.name == "memlock-noop"


def test_tcg_names_the_probes_reason() -> None:
    found = probes.tcg("TCG: KVM crashed the probe guest")
    assert found.name == "tcg" and found.reason.startswith("TCG: KVM crashed the probe guest")
