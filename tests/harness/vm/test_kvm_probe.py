"""Tests for lxd_agent_harness.vm.kvm_probe: choosing KVM or TCG, the probe's verdict and its
cache."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.errors import GuestStopped, HarnessError, QemuError, VmError
from lxd_agent_harness.vm import kvm_probe as accel
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import ARCH_FILE, GuestImage


def test_auto_without_usable_dev_kvm_is_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    choice = asyncio.run(accel.choose_accel(Accel.AUTO, None, print))
    assert choice.accel is Accel.TCG and "/dev/kvm" in choice.reason


@pytest.fixture
def kvm_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the KVM verdict is cached, in a cache of this test's own; /dev/kvm looks usable."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    verdict = tmp_path / "lxd-agent" / "kvm-verdict.json"
    verdict.parent.mkdir()
    return verdict


def test_auto_uses_a_cached_kvm_verdict_for_this_host(
    kvm_verdict: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verdict = kvm_verdict

    async def no_probe(*_: object) -> str | None:
        raise AssertionError("probed although a verdict was cached")

    monkeypatch.setattr(accel, "probe_kvm", no_probe)
    host = accel._host_identity()
    verdict.write_text(json.dumps({"host": host, "error": "KVM internal error"}))
    choice = asyncio.run(accel.choose_accel(Accel.AUTO, None, print))
    assert choice.accel is Accel.TCG and "KVM internal error" in choice.reason
    verdict.write_text(json.dumps({"host": host, "error": None}))
    assert asyncio.run(accel.choose_accel(Accel.AUTO, None, print)).accel is Accel.KVM


def test_a_verdict_from_another_host_is_not_trusted(
    tmp_path: Path, kvm_verdict: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verdict = kvm_verdict
    verdict.write_text(json.dumps({"host": {"kernel": "other"}, "error": None}))
    probed: list[GuestImage] = []

    async def failing_probe(image: GuestImage, progress: object) -> str | None:
        probed.append(image)
        return "emulation failure"

    monkeypatch.setattr(accel, "probe_kvm", failing_probe)
    image = GuestImage(tmp_path / "image")
    choice = asyncio.run(accel.choose_accel(Accel.AUTO, image, print))
    assert probed == [image]
    assert choice.accel is Accel.TCG
    assert json.loads(verdict.read_text())["error"] == "emulation failure"


def test_a_probe_that_could_not_run_its_guest_caches_no_verdict(
    tmp_path: Path, kvm_verdict: Path
) -> None:
    # The real probe, failing before QEMU runs: the image it is given has no disk.
    image = GuestImage(tmp_path / "no-image")
    choice = asyncio.run(accel.choose_accel(Accel.AUTO, image, print))
    assert choice.accel is Accel.TCG and "nothing cached" in choice.reason, choice.reason
    assert not kvm_verdict.exists()


PTY_NOTICE = "char device redirected to /dev/pts/3 (label console)"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            QemuError("exited", output=[PTY_NOTICE, "kvm: -cpu host: no KVM"]),
            "kvm: -cpu host: no KVM",
        ),
        (
            GuestStopped(
                "stopped",
                run_state="internal-error",
                qemu_output=[PTY_NOTICE, "KVM internal error. Suberror: 1", "emulation failure"],
            ),
            "KVM internal error. Suberror: 1 | emulation failure",
        ),
        # Nothing said by QEMU (or only its pty notice): the harness's own line.
        (VmError("waited 60 s for a shell", qemu_output=[PTY_NOTICE]), "waited 60 s for a shell"),
        (HarnessError("the VM lock"), "the VM lock"),
    ],
)
def test_a_failed_probe_caches_what_qemu_said(error: HarnessError, reason: str) -> None:
    assert accel.probe_failure_reason(error) == reason


def test_a_hypervisor_error_under_kvm_forgets_the_cached_verdict(kvm_verdict: Path) -> None:
    kvm_verdict.write_text(json.dumps({"host": {}, "error": None}))
    broken = GuestStopped("hypervisor error", run_state="internal-error")
    assert broken.hypervisor_failed
    # The guest's own failures, and any failure under TCG, say nothing against KVM.
    assert not accel.forget_verdict_after(broken, Accel.TCG)
    assert not accel.forget_verdict_after(
        GuestStopped("panic", run_state="guest-panicked"), Accel.KVM
    )
    assert not accel.forget_verdict_after(VmError("timeout"), Accel.KVM)
    assert kvm_verdict.exists()
    assert accel.forget_verdict_after(broken, Accel.KVM)
    assert not kvm_verdict.exists()


def test_a_guest_of_another_architecture_runs_under_tcg_and_kvm_is_refused_for_it(
    tmp_path: Path,
) -> None:
    other = Arch.ARM64 if host_arch() is Arch.AMD64 else Arch.AMD64
    choice = asyncio.run(accel.choose_accel(Accel.AUTO, None, arch=other))
    assert choice.accel is Accel.TCG and f"an {other.value} guest" in choice.reason
    image = GuestImage(tmp_path)
    (tmp_path / ARCH_FILE).write_text(other.value)
    assert asyncio.run(accel.choose_accel(Accel.AUTO, image)).accel is Accel.TCG
    with pytest.raises(accel.KvmUnusable):
        asyncio.run(accel.choose_accel(Accel.KVM, image))
