"""`lxd-agent-harness` input checks and the QEMU command line, without booting anything."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from lxd_agent_harness.base.errors import (
    GuestStopped,
    HarnessError,
    MonitorTimeout,
    QemuError,
    VmError,
)
from lxd_agent_harness.cli import main as cli
from lxd_agent_harness.cli import report
from lxd_agent_harness.image.deb import DEB_PACKAGE, DEB_VARIABLE, PackageNotFound, find_deb
from lxd_agent_harness.image.seed import make_seed_iso, user_data
from lxd_agent_harness.lxd.layouts import get_layout, lxd_ring_port
from lxd_agent_harness.qemu.migration import incoming_uri
from lxd_agent_harness.scenarios.soak import soak_config
from lxd_agent_harness.vm import instance as vm
from lxd_agent_harness.vm import lock as vmlock
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import (
    DirectBoot,
    FirmwareBoot,
    GuestImage,
    VmConfig,
    VmFiles,
    qemu_args,
)
from lxd_agent_harness.vm.firmware import Firmware

from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME
from tests.host.helpers import minimal_deb


@pytest.fixture
def fake_deb(tmp_path: Path) -> Path:
    return minimal_deb(tmp_path)


@pytest.fixture
def random_image(tmp_path: Path) -> Path:
    """What qemu-img takes for a raw disk, with no partition table: nothing could boot it."""
    path = tmp_path / "random.img"
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x00\x00"  # never the boot signature by chance
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "lxd-6"], "unknown layout 'lxd-6'; choose one of: lxd-5.19"),
        (["--ring-size", "24"], "not a positive power of two"),
        (["--ring-size", "big"], "is not an integer"),
        # 4 B can never hold STARTED\n; QEMU silently shrinks 2^40 B.
        (["--ring-size", "4"], "outside 16..1048576 bytes"),
        (["--ring-size", str(1 << 40)], "outside 16..1048576 bytes"),
        (["--image", "{random}"], "has no partition table (no boot signature 55aa"),
        (["--deb", "{corrupt}"], "is not a Debian format archive"),
        (["--timeout", "0"], "must be more than 0 seconds"),
        (["--timeout", "soon"], "is not a number of seconds"),
        (["--image", "/nonexistent/cloud.qcow2"], "looked for --image"),
        (["--firmware", "bios"], "add --image FILE"),
        (["--secure-boot"], "add --image FILE"),
        (["--image", "{deb}", "--firmware", "bios", "--secure-boot"], "needs UEFI firmware"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    fake_deb: Path,
    random_image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corrupt = tmp_path / "corrupt_all.deb"
    corrupt.write_bytes(os.urandom(4096))
    args = [arg.format(deb=fake_deb, random=random_image, corrupt=corrupt) for arg in args]
    assert cli.main(["boot", "--deb", str(fake_deb), *args]) == cli.EXIT_USAGE
    out = capsys.readouterr().out
    assert message in out
    assert len(out.strip().splitlines()) == 1


def test_a_missing_deb_says_to_run_make_deb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["boot", "--deb", str(tmp_path / "none.deb")]) == cli.EXIT_USAGE
    assert "make deb" in capsys.readouterr().out


def test_no_deb_anywhere_names_deb_the_variable_and_make_deb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEB_VARIABLE, raising=False)
    with pytest.raises(PackageNotFound) as caught:
        find_deb(places=[tmp_path, tmp_path / "a"])
    assert caught.value.looked_in == [tmp_path / "out", tmp_path / "a" / "out"]
    assert caught.value.given is None
    for way in ("--deb PATH", DEB_VARIABLE, "`make deb`"):
        assert way in str(caught.value)


def test_the_default_deb_is_the_newest_of_ours_in_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old, new = out / f"{DEB_PACKAGE}_0.1_all.deb", out / f"{DEB_PACKAGE}_0.2_all.deb"
    # The package's name before the rename: never picked up.
    renamed = out / "lxd-agent_9.0_all.deb"
    for deb in (old, new, renamed):
        deb.write_bytes(deb.name.encode())
    os.utime(old, (1, 1))
    assert find_deb(places=[tmp_path]) == new


def test_a_given_deb_is_used_as_it_is(tmp_path: Path) -> None:
    given = tmp_path / "anything.deb"
    given.write_bytes(b"x")
    assert find_deb(given, places=[tmp_path / "nowhere"]) == given


def test_the_agent_is_expected_on_the_first_lxd_name_with_a_ring() -> None:
    assert lxd_ring_port(get_layout("lxd-5.20")) == PORT_NAME
    assert lxd_ring_port(get_layout("lxd-5.19")) == LEGACY_PORT_NAME
    assert lxd_ring_port(get_layout("bridged")) == PORT_NAME
    assert lxd_ring_port(get_layout("incus")) is None


def _config(tmp_path: Path, accel: Accel) -> tuple[VmConfig, VmFiles]:
    image = GuestImage(tmp_path / "image")
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=accel)
    return config, VmFiles(tmp_path / "run")


def test_qemu_command_line_pauses_on_shutdown_and_writes_only_the_overlay(tmp_path: Path) -> None:
    config, files = _config(tmp_path, Accel.TCG)
    args = qemu_args(config, files)
    joined = " ".join(args)
    assert args[0] == "-S"
    assert "-action shutdown=pause,reboot=shutdown" in joined
    assert "-accel tcg" in joined and "-cpu host" not in joined
    assert f"file={files.overlay},format=qcow2" in joined
    assert "disk.raw" not in joined  # the base image is only the overlay's backing file
    assert "-nodefaults" in args and "-display none" in joined
    assert "-chardev pty,id=console" in joined
    layout_args = get_layout("lxd-5.20").qemu_args(16, spice_socket=files.spice_socket)
    assert " ".join(layout_args) in joined
    # LXD serves SPICE on a unix socket; ours is in the VM's temporary directory.
    assert f"-spice unix=on,addr={files.spice_socket},disable-ticketing=on" in joined
    assert files.spice_socket.parent == files.workdir
    # LXD's RNG: entropy from the host, not gathered by the guest under TCG.
    assert "-device virtio-rng-pci,id=dev-qemu_rng,rng=qemu_rng" in joined
    assert "-object rng-random,id=qemu_rng,filename=/dev/urandom" in joined


def test_a_restore_loads_the_state_onto_the_overlay_the_caller_keeps(tmp_path: Path) -> None:
    config, files = _config(tmp_path, Accel.TCG)
    kept, state = tmp_path / "kept.qcow2", tmp_path / "state"
    args = qemu_args(replace(config, overlay=kept, incoming=state), files)
    joined = " ".join(args)
    assert f"file={kept},format=qcow2" in joined and str(files.overlay) not in joined
    assert args[args.index("-incoming") + 1] == incoming_uri(state)
    assert "-incoming" not in qemu_args(replace(config, overlay=kept), files)


def test_a_firmware_boot_neither_keeps_an_overlay_nor_restores(tmp_path: Path) -> None:
    boot = FirmwareBoot(tmp_path / "cloud.qcow2", "qcow2")
    config = VmConfig(layout=get_layout("lxd-5.19"), boot=boot, accel=Accel.TCG)
    for kept in (replace(config, overlay=tmp_path / "o"), replace(config, incoming=tmp_path / "s")):
        with pytest.raises(VmError, match="needs the direct boot"):
            qemu_args(kept, VmFiles(tmp_path / "run"))


def test_each_layout_gets_its_own_ring_size_unless_the_boot_overrides_it(tmp_path: Path) -> None:
    files = VmFiles(tmp_path / "run")
    image = GuestImage(tmp_path / "image")

    def ring_args(layout: str, ring_size: int | None) -> list[str]:
        config = VmConfig(get_layout(layout), DirectBoot(image), Accel.TCG, ring_size=ring_size)
        return [a for a in qemu_args(config, files) if a.startswith("ringbuf,")]

    assert ring_args("lxd-5.20", None) == ["ringbuf,id=qemu_serial-chardev,size=16"]
    assert ring_args("incus", None) == ["ringbuf,id=qemu_serial-chardev,size=16384"]
    assert ring_args("incus", 64) == ["ringbuf,id=qemu_serial-chardev,size=64"]


def test_kvm_gets_the_host_cpu_and_auto_is_refused_undecided(tmp_path: Path) -> None:
    config, files = _config(tmp_path, Accel.KVM)
    assert "-accel kvm -cpu host" in " ".join(qemu_args(config, files))
    undecided, _ = _config(tmp_path, Accel.AUTO)
    with pytest.raises(VmError, match="choose_accel"):
        qemu_args(undecided, files)


def test_the_seed_carries_the_package_and_installs_it(fake_deb: Path, tmp_path: Path) -> None:
    text = user_data(fake_deb)
    assert text.startswith("#cloud-config\n")
    config = json.loads(text.split("\n", 1)[1])
    (written,) = config["write_files"]
    assert written["encoding"] == "b64" and written["path"].endswith(fake_deb.name)
    assert "dpkg -i" in config["runcmd"][0][2]
    iso = make_seed_iso(fake_deb, tmp_path / "seed.iso")
    head = iso.read_bytes()[32768 : 32768 + 2048]  # the primary volume descriptor
    assert head[1:6] == b"CD001" and head[40:46] == b"cidata"
    assert not (tmp_path / "seed.iso.partial").exists()


def test_a_second_vm_waits_for_the_lock_and_gives_up_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(vmlock, "VM_LOCK_TIMEOUT", 0.6)
    lock_path = vmlock.vm_lock_path()
    lock_path.parent.mkdir(parents=True)
    config, _ = _config(tmp_path, Accel.TCG)
    messages: list[str] = []
    with lock_path.open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)

        async def second() -> None:
            async with vm.Vm(config, progress=messages.append):
                raise AssertionError("started while another VM held the lock")

        with pytest.raises(VmError, match="another harness VM"):
            asyncio.run(second())
    assert any("waiting for another harness VM" in m for m in messages)
    assert not list(tmp_path.glob("lxd-agent-vm-*"))


def test_the_vm_lock_is_free_again_after_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config, _ = _config(tmp_path, Accel.TCG)  # its image does not exist: the start fails

    async def start() -> None:
        async with vm.Vm(config):
            raise AssertionError("started without an image")

    with pytest.raises(VmError, match="overlay"):
        asyncio.run(start())
    with vmlock.vm_lock_path().open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held


def test_a_stopped_guest_is_a_typed_error_and_leaves_the_kvm_verdict_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    verdict = tmp_path / "lxd-agent" / "kvm-verdict.json"
    verdict.parent.mkdir()
    verdict.write_text("{}")
    config, _ = _config(tmp_path, Accel.KVM)
    machine = vm.Vm(config)
    with pytest.raises(GuestStopped, match="hypervisor error under kvm") as caught:
        machine._raise_if_stopped("internal-error")
    assert caught.value.run_state == "internal-error" and caught.value.hypervisor_failed
    assert verdict.exists()  # forgetting it is the accelerator's decision, not the VM's
    machine._raise_if_stopped("shutdown")  # a power-off is no error unless the caller says so
    with pytest.raises(GuestStopped) as caught:
        machine._raise_if_stopped("shutdown", powered_off="the guest powered off")
    assert caught.value.run_state == "shutdown" and not caught.value.hypervisor_failed
    assert not machine.qemu_started


def test_a_failure_prints_its_line_then_what_the_error_carries() -> None:
    error = VmError(
        "no STARTED within 5 s",
        console_tail=["login: root"],
        qemu_output=["qemu: warning"],
        timeline=["    0.000s  note   QEMU started"],
    )
    lines = report.failure_lines(error)
    assert lines[0] == "FAILED: no STARTED within 5 s"
    for section, line in [
        ("--- QEMU's output (last lines) ---", "qemu: warning"),
        ("--- console (last lines) ---", "login: root"),
        ("--- timeline (seconds since QEMU start) ---", "    0.000s  note   QEMU started"),
    ]:
        assert lines[lines.index(section) + 1] == line
    assert report.failure_lines(QemuError("exited", output=["bad option"]))[1:] == [
        "--- QEMU's output ---",
        "bad option",
    ]
    assert report.failure_lines(MonitorTimeout("no STARTED", timeline=["t"]))[-1] == "t"
    assert report.failure_lines(HarnessError("plain")) == ["FAILED: plain"]


def test_an_error_from_a_running_vm_carries_console_qemu_output_and_timeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Seen:
        """Stands in for the console, QEMU and the monitor of a VM that ran for a while."""

        def tail_lines(self, lines: int) -> list[str]:
            return ["login: root"]

        def output_tail(self, lines: int) -> list[str]:
            return ["qemu: warning"]

        def render_timeline(self) -> list[str]:
            return ["    0.000s  note   QEMU started"]

    config, _ = _config(tmp_path, Accel.TCG)
    machine = vm.Vm(config)
    for part in ("_console", "_qemu", "_monitor"):
        monkeypatch.setattr(machine, part, Seen())
    error = machine.error("no STARTED")
    assert str(error) == "no STARTED"
    assert error.console_tail == ["login: root"]
    assert error.qemu_output == ["qemu: warning"]
    assert error.timeline == ["    0.000s  note   QEMU started"]
    # What the raiser already knew is kept.
    own = machine._filled(VmError("console closed", console_tail=["its own"]))
    assert own.console_tail == ["its own"] and own.qemu_output == ["qemu: warning"]


@pytest.mark.parametrize("secure_boot", [False, True], ids=["uefi", "uefi-secure-boot"])
def test_a_firmware_boot_has_no_kernel_and_its_own_vars_in_the_vm_dir(
    tmp_path: Path, secure_boot: bool
) -> None:
    files = VmFiles(tmp_path / "run")
    boot = FirmwareBoot(tmp_path / "user.qcow2", "qcow2", Firmware.UEFI, secure_boot)
    args = qemu_args(VmConfig(get_layout("lxd-5.20"), boot, Accel.TCG), files)
    joined = " ".join(args)
    assert "-kernel" not in args and "-append" not in args
    assert f"if=pflash,format=raw,unit=1,file={files.uefi_vars}" in joined
    assert files.uefi_vars.parent == files.workdir
    assert "user.qcow2" not in joined  # only the overlay's backing file
    assert args[args.index("-machine") + 1] == ("q35,smm=on" if secure_boot else "q35")


def test_a_bios_boot_has_no_pflash(tmp_path: Path) -> None:
    boot = FirmwareBoot(tmp_path / "user.qcow2", "qcow2", Firmware.BIOS)
    args = qemu_args(VmConfig(get_layout("lxd-5.20"), boot, Accel.TCG), VmFiles(tmp_path))
    assert not any("if=pflash" in arg for arg in args) and "-kernel" not in args


def test_a_soak_vm_may_reboot_inside_its_qemu_and_others_may_not(tmp_path: Path) -> None:
    image = GuestImage(tmp_path)
    base = VmConfig(get_layout("lxd-5.20"), DirectBoot(image), Accel.TCG)
    files = VmFiles(tmp_path)
    assert "shutdown=pause,reboot=shutdown" in qemu_args(base, files)
    assert "shutdown=pause,reboot=reset" in qemu_args(soak_config(base), files)
    assert "-qmp" in qemu_args(soak_config(base), files)  # the restarted reader's socket


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cycles", "0"], "--cycles must be 1..1000"),
        (["--cycles", "many"], "is not a whole number"),
        (["--layout", "incus"], "nothing to soak"),
    ],
)
def test_bad_soak_input_is_one_line_and_exit_2(
    args: list[str], message: str, fake_deb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["soak", "--deb", str(fake_deb), *args]) == cli.EXIT_USAGE
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and message in out[0], out
