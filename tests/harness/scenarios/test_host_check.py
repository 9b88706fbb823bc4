"""Tests for lxd_agent_harness.scenarios.host_check: the VM's configuration and the layout a
daemon is judged by, then `check --host lxd` on a real LXD daemon (Debian's 5.0.2 here)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.host import probes
from lxd_agent_harness.host.config import read_sections, serial_differences
from lxd_agent_harness.host.daemon import LocalDaemon, parse_version
from lxd_agent_harness.host.probes import Adaptation
from lxd_agent_harness.host.statedir import processes_naming
from lxd_agent_harness.image.buildsteps import mounts_under
from lxd_agent_harness.image.cloud import (
    DEBIAN_LXD_AGENT,
    CloudImage,
    build_cloud_image,
    cloud_spec,
    with_debian_package,
)
from lxd_agent_harness.image.lxd_image import ImageKind, opened_image
from lxd_agent_harness.image.rootfs import file_sha256
from lxd_agent_harness.lxd.layouts import get_layout
from lxd_agent_harness.lxd.qemu_conf import parse_raw_qemu_conf
from lxd_agent_harness.scenarios.check import LayoutCheck
from lxd_agent_harness.scenarios.host_check import _compare_identity, host_layout, vm_config
from lxd_agent_harness.testing.plugin import artifact_folder
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.kvm_probe import choose_accel
from tests.helpers import harness_command, run_pytest
from tests.vms import Figures

TCG = Adaptation("tcg", "TCG: KVM crashed the probe guest")
NO_VSOCK = Adaptation("no-vsock-device", "/dev/vhost-vsock is missing")


@pytest.mark.parametrize(
    ("kind", "version", "layout"),
    [
        ("lxd", (5, 0, 2), "lxd-5.19"),
        ("lxd", (5, 19), "lxd-5.19"),
        ("lxd", (5, 20), "lxd-5.20"),
        ("lxd", (6, 1), "lxd-5.20"),
        ("incus", (6, 0, 4), "incus-6"),
        ("incus", (7, 3), "incus"),
    ],
)
def test_a_daemon_is_judged_by_the_layout_of_its_version(
    kind: str, version: tuple[int, ...], layout: str
) -> None:
    assert host_layout(kind, version).name == layout


def test_a_machine_with_kvm_and_vsock_changes_nothing_in_the_vm() -> None:
    assert vm_config([]) == {}


def test_tcg_and_no_vsock_become_the_vms_keys_and_raw_qemu_conf() -> None:
    config = vm_config([TCG, NO_VSOCK])
    assert config["limits.cpu"] == "1"
    assert config["raw.qemu"] == "-cpu max"
    assert config["security.secureboot"] == "false"
    sections = parse_raw_qemu_conf(config["raw.qemu.conf"])
    assert [(s.name, s.entries) for s in sections] == [
        ("machine", (("accel", "tcg"),)),
        ('device "qemu_vsock"', ()),
    ]


def test_credentials_become_incus_systemd_credential_keys() -> None:
    config = vm_config([], credentials=[("lxd-agent.state", "on"), ("x", "1")])
    assert config == {"systemd.credential.lxd-agent.state": "on", "systemd.credential.x": "1"}


def test_the_users_raw_qemu_conf_follows_the_adaptations_as_written() -> None:
    users = parse_raw_qemu_conf('[device "qemu_serial_legacy"]\n[chardev "x"][1]\nsize = "8B"\n')
    sections = parse_raw_qemu_conf(vm_config([NO_VSOCK], users)["raw.qemu.conf"])
    assert [(s.name, s.index, s.entries) for s in sections] == [
        ('device "qemu_vsock"', 0, ()),
        ('device "qemu_serial_legacy"', 0, ()),
        ('chardev "x"', 1, (("size", "8B"),)),
    ]


# -- on a real LXD daemon, through the command line ---------------------------------------------

HOST_CHECK_TIMEOUT = 1200


def installed_version(package: str) -> str:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
    )
    assert done.returncode == 0, f"Debian's {package} is not installed: run `make setup`"
    return done.stdout


def vm_adaptations() -> list[str]:
    """What this machine needs in a VM of any daemon, by the probes themselves."""
    tcg = asyncio.run(choose_accel(Accel.AUTO, None)).accel is Accel.TCG
    found = [probes.tcg("TCG") if tcg else None, probes.vsock_device_missing()]
    return [adaptation.name for adaptation in found if adaptation is not None]


def expected_adaptations(kind: str = "lxd") -> list[str]:
    """What this machine needs for a daemon of the harness's own and its VM, by the probes
    themselves: none on a host with KVM and vsock (and Incus installed)."""
    found: list[Adaptation | None] = []
    if kind == "incus":
        installed = shutil.which("incusd") or Path("/usr/libexec/incus/incusd").is_file()
        found.append(None if installed else Adaptation("incus-unpacked", ""))
    found.append(probes.vsock_module_missing())
    if kind == "lxd":
        daemon = parse_version(installed_version("lxd"))
        found.append(probes.qemu_too_new(daemon, probes.qemu_major()))
    found.append(probes.memlock_fixed())
    if kind == "incus":
        found.append(probes.vsock_host_missing())
    return [a.name for a in found if a is not None] + vm_adaptations()


def nothing_left_of_the_daemon() -> list[str]:
    """Daemons, QEMUs and state directories of the harness's daemons still there."""
    left = sorted(
        str(p) for kind in ("lxd", "incus") for p in Path("/tmp").glob(f"lxd-agent-{kind}-*")
    )
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True, check=True)
    left += [
        line
        for line in ps.stdout.splitlines()
        if not line.startswith("Z")  # a zombie is its parent's to reap (here: PID 1, not ours)
        and any(mark in line for mark in ("lxd-agent-lxd-", "lxd-agent-incus-", "lxd-agent-check-"))
    ]
    return left


def check_on_host(
    kind: str, image: CloudImage, tmp_path: Path, *options: str
) -> tuple[int, dict[str, Any], str]:
    record = tmp_path / "check.json"
    command = harness_command(
        "check", "--image", str(image.disk), "--host", kind, *options, "--json", str(record)
    )
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=HOST_CHECK_TIMEOUT, check=False
    )
    print(done.stdout, done.stderr)
    return done.returncode, json.loads(record.read_text()), done.stdout


def check_on_lxd(
    image: CloudImage, tmp_path: Path, *options: str
) -> tuple[int, dict[str, Any], str]:
    return check_on_host("lxd", image, tmp_path, *options)


@pytest.mark.vm
@pytest.mark.daemon
def test_real_lxd_reads_started_and_stopped_of_our_agent_and_its_config_is_the_model(
    cloud_images: dict[str, CloudImage], tmp_path: Path, figures: Figures
) -> None:
    status, record, out = check_on_lxd(cloud_images["ours"], tmp_path)
    host = record["host"]
    assert (host["kind"], host["version"], host["layout"]) == (
        "lxd",
        installed_version("lxd").split("-")[0],
        "lxd-5.19",
    )
    assert [a["name"] for a in host["adaptations"]] == expected_adaptations()
    (layout,) = record["layouts"]
    assert (status, layout["finding"], layout["config_differences"]) == (0, "reports", []), out
    assert layout["started"]["port"] == LEGACY_PORT_NAME
    # The daemon's own QEMU says it is LXD, as the layout does (nothing else: no credential).
    assert host["smbios"] == [get_layout("lxd-5.19").identity.smbios]
    assert layout["stopped"]["text"] == f"{STARTED} -> {STOPPED}"
    # The daemon's own log: its monitor read STARTED at boot and again after the restart.
    assert sum('msg="Instance agent started"' in line for line in host["log"]) == 2
    # The model can be wrong: the same real configuration is not the lxd-5.20 layout.
    real = read_sections(host["qemu_conf"], "qemu.conf")
    assert serial_differences(real, get_layout("lxd-5.20")) != []
    assert serial_differences(real, get_layout("lxd-5.19")) == []
    figures["lxd 5.0.2: start -> STARTED (the daemon's flag)"] = (
        f"{layout['started']['seconds']:.1f} s"
    )
    assert nothing_left_of_the_daemon() == []


@pytest.mark.vm
@pytest.mark.daemon
def test_a_users_lxd_finds_no_agent_and_keeps_nothing_of_ours(
    cloud_images: dict[str, CloudImage], tmp_path: Path
) -> None:
    """A daemon the harness did not start (`--host-socket`), set up as a user's is: it is left
    running, with its pool, and without the VM or the image the check made in it."""
    with LocalDaemon(print) as users:
        users.client.request("POST", "/1.0/storage-pools", {"name": "default", "driver": "dir"})
        socket = str(users.client.socket)
        status, record, out = check_on_lxd(cloud_images["none"], tmp_path, "--host-socket", socket)
        (layout,) = record["layouts"]
        assert (status, layout["finding"]) == (1, "no-agent"), out
        assert layout["started"] is None and layout["login_prompt"] is not None
        assert [a["name"] for a in record["host"]["adaptations"]] == vm_adaptations()
        assert users.process is not None and users.process.poll() is None
        assert users.client.request("GET", "/1.0/instances") == []
        assert users.client.request("GET", "/1.0/images") == []
        assert users.client.request("GET", "/1.0/storage-pools") == ["/1.0/storage-pools/default"]
    assert nothing_left_of_the_daemon() == []


@pytest.mark.vm
@pytest.mark.daemon
def test_what_a_run_killed_outright_left_goes_when_the_next_daemon_starts() -> None:
    """SIGKILL gives the harness no chance to clean up: its daemon (in a session of its own)
    lives on, with LXD's mounts in the state directory. The next daemon's start ends it."""
    code = (
        "import time\n"
        "from lxd_agent_harness.host.daemon import LocalDaemon\n"
        "with LocalDaemon(lambda line: None) as daemon:\n"
        "    print(daemon.work, flush=True)\n"
        "    time.sleep(600)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert killed.stdout is not None
        left = Path(killed.stdout.readline().decode().strip())
        assert left.is_dir(), "the daemon did not start"
    finally:
        killed.kill()
        killed.wait()
    orphans, mounts = processes_naming(left), mounts_under(left)
    assert orphans and len(mounts) >= 2, (orphans, mounts)  # the daemon; shmounts and devlxd
    said: list[str] = []
    with LocalDaemon(said.append) as fresh:
        assert fresh.client.request("GET", "/1.0")["environment"]["server"] == "lxd"
    assert [line for line in said if str(left) in line] == [
        f"lxd: reclaimed {left}, left by a run that was killed "
        f"(processes ended: {len(orphans)}, mounts detached: {len(mounts)})"
    ], said
    assert not left.exists() and processes_naming(left) == []
    assert nothing_left_of_the_daemon() == []


@pytest.mark.vm
@pytest.mark.daemon
def test_an_image_real_lxd_imports_and_exports_is_the_split_image_check_reads(
    deb: Path, cloud_images: dict[str, CloudImage], tmp_path: Path
) -> None:
    """`lxc image import` of the harness's split image, then `lxc image export` (LXD's own
    names: `meta-FINGERPRINT.tar.xz`, `FINGERPRINT.qcow2`): `check --image` reads the export
    as a split image with the same metadata and the same disk, byte for byte, that
    test_check.py's split and unified checks boot."""
    command = harness_command(
        "image", "--cloud", "--agent", "ours", "--deb", str(deb), "--format", "split"
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    split = Path(done.stdout.splitlines()[-1])  # after its progress lines
    exported = tmp_path / "exported"
    exported.mkdir()
    with LocalDaemon(print) as daemon:
        # The private daemon's socket, and a client configuration of the test's own.
        env = {
            **os.environ,
            "LXD_DIR": str(daemon.client.socket.parent),
            "LXD_CONF": str(tmp_path / "conf"),
        }

        def lxc(*args: str) -> str:
            run = subprocess.run(
                ["lxc", *args], env=env, capture_output=True, text=True, timeout=600, check=False
            )
            assert run.returncode == 0, (args, run.stdout, run.stderr)
            return run.stdout

        lxc(
            "image",
            "import",
            str(split / "lxd.tar.xz"),
            str(split / "disk.qcow2"),
            "--alias",
            "ours",
        )
        (image,) = json.loads(lxc("image", "list", "--format", "json"))
        assert image["type"] == "virtual-machine"
        lxc("image", "export", "ours", str(exported))
        lxc("image", "delete", "ours")
    fingerprint = image["fingerprint"]
    assert sorted(p.name for p in exported.iterdir()) == [
        f"{fingerprint}.qcow2",
        f"meta-{fingerprint}.tar.xz",
    ]
    with opened_image([exported], print) as theirs, opened_image([split], print) as ours:
        assert (theirs.kind, theirs.disk_format) == (ImageKind.SPLIT, "qcow2")
        assert theirs.metadata == ours.metadata
        assert file_sha256(theirs.disk) == file_sha256(ours.disk)
    assert nothing_left_of_the_daemon() == []


@pytest.fixture(scope="module")
def debians_agent_image() -> CloudImage:
    """The cloud image with Debian's own `lxd-agent` 5.0.2 package (the real Go agent)."""
    return build_cloud_image(with_debian_package(cloud_spec(), DEBIAN_LXD_AGENT), progress=print)


# -- on a real Incus daemon ---------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.daemon
def test_real_incus_boots_our_package_and_reads_started_and_stopped(
    cloud_images: dict[str, CloudImage], figures: Figures
) -> None:
    """`boot --host incus`: Debian's Incus 6.0.4 (bookworm-backports) runs the project's cloud
    image with the package (the one `image --cloud --agent ours` makes, reused), its monitor
    reads our agent on `org.linuxcontainers.incus`, and the guest's console (to stop and start
    the agent's unit) comes through its API's websocket."""
    command = harness_command("boot", "--host", "incus", "-v")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=HOST_CHECK_TIMEOUT, check=False
    )
    out = done.stdout
    print(out, done.stderr)
    assert done.returncode == 0, out
    # The verdict names the disk: the one `image --cloud --agent ours` made, not another.
    assert f"OK: the agent in {cloud_images['ours'].disk} " in out
    lines = [line.split("]")[0].split("s  ", 1)[-1] for line in out.splitlines()]
    assert f"{INCUS_PORT_NAME}: unknown -> STARTED [the daemon's agent flag went up" in lines
    assert f"{INCUS_PORT_NAME}: STARTED -> STOPPED [the daemon's agent flag went down" in lines
    assert "the daemon's qemu.conf against incus-6: 0 differences" in lines, out
    assert nothing_left_of_the_daemon() == []


@pytest.mark.vm
@pytest.mark.daemon
def test_real_incus_leaves_an_image_without_an_agent_alone_and_its_config_is_the_model(
    cloud_images: dict[str, CloudImage], tmp_path: Path
) -> None:
    """Incus does not ask an LXD agent to report: no agent is `stands-aside` (exit 0), as in
    the `incus-6` layout; its `qemu.conf` is that layout's and not LXD's."""
    status, record, out = check_on_host("incus", cloud_images["none"], tmp_path)
    host = record["host"]
    assert (host["kind"], host["layout"]) == ("incus", "incus-6")
    assert host["version"].startswith("6.0."), host["version"]
    assert [a["name"] for a in host["adaptations"]] == expected_adaptations("incus")
    (layout,) = record["layouts"]
    assert (status, layout["finding"], layout["config_differences"]) == (0, "stands-aside", [])
    assert host["smbios"] == ["type=2,manufacturer=LinuxContainers,product=Incus"]
    assert layout["started"] is None and layout["login_prompt"] is not None, out
    assert layout["guest_off"] is not None and not layout["power_off_held"], out
    real = read_sections(host["qemu_conf"], "qemu.conf")
    assert serial_differences(real, get_layout("incus-6")) == []
    assert serial_differences(real, get_layout("lxd-5.19")) != []
    assert nothing_left_of_the_daemon() == []


@pytest.mark.vm
@pytest.mark.daemon
def test_a_credential_is_incus_own_key_and_an_incus_without_it_says_so(
    cloud_images: dict[str, CloudImage], tmp_path: Path
) -> None:
    """`--credential` becomes `systemd.credential.NAME`, which Incus has only since 6.18: 6.0.4
    refuses the VM, and the check is `not-checked` with the daemon's own error."""
    status, record, out = check_on_host(
        "incus", cloud_images["none"], tmp_path, "--credential", "lxd-agent.state=on"
    )
    (layout,) = record["layouts"]
    assert (status, layout["finding"]) == (1, "not-checked"), out
    error = layout["error"]
    assert error["type"] == "DaemonError", error
    fields = error["fields"]
    assert (fields["daemon"], fields["request"]) == ("incus", "POST /1.0/instances"), error
    assert "systemd.credential.lxd-agent.state" in fields["error"], error
    assert nothing_left_of_the_daemon() == []


@pytest.fixture(scope="module")
def incus_agent_image(tmp_path_factory: pytest.TempPathFactory) -> CloudImage:
    """The cloud image with Debian's own `incus-agent` 6.0.4 package (bookworm-backports; it
    has no dependencies), downloaded at the version the host's apt sources offer."""
    debs = tmp_path_factory.mktemp("incus-agent")
    subprocess.run(
        ["apt-get", "download", "-q", "incus-agent/bookworm-backports"],
        cwd=debs,
        check=True,
        capture_output=True,
    )
    (deb,) = debs.glob("incus-agent_*.deb")
    return build_cloud_image(cloud_spec(debs=(deb,)), progress=print)


@pytest.mark.vm
@pytest.mark.daemon
def test_real_incus_with_debians_own_incus_agent_says_why_it_never_reported(
    incus_agent_image: CloudImage, tmp_path: Path
) -> None:
    """Incus's own agent gets its binary from the host's `config` share before it listens on
    vsock and writes `STARTED`. Here it cannot: this machine has no virtiofsd, so Incus 6.0.4
    exports the share over 9p, which Debian 12's cloud kernel does not have (no CONFIG_NET_9P).
    That is this machine's doing, so the check is `not-checked` with the agent's own words,
    never `no-agent` or `stands-aside`."""
    status, record, out = check_on_host("incus", incus_agent_image, tmp_path)
    (layout,) = record["layouts"]
    assert layout["error"] is None, out
    if layout["started"] is not None:  # only where the VM has a share it can mount, and vsock
        assert probes.vsock_device_missing() is None, out
        return
    assert (status, layout["finding"]) == (1, "not-checked"), out
    assert layout["agent_unit"].startswith("incus-agent.service: "), out
    assert "incus-agent.service is " in layout["agent_unstartable"], out
    assert '[device "dev-qemu_config-drive-9p"]' in record["host"]["qemu_conf"]
    assert nothing_left_of_the_daemon() == []


# -- the plugin on a real daemon -----------------------------------------------------------------

HOST_TESTS = """
import pytest


def test_the_daemon_reads_our_agent(lxd_vm):
    assert lxd_vm.layout.name == "lxd-5.19" and not lxd_vm.warm
    assert lxd_vm.wait_for("STARTED", timeout=300).port == "org.linuxcontainers.lxd"
    assert lxd_vm.run("systemctl stop lxd-agent").status == 0
    assert lxd_vm.wait_for("STOPPED", timeout=60).text == "STARTED -> STOPPED"
    assert lxd_vm.state() == "STOPPED"
    assert lxd_vm.power_off().guest_off


@pytest.mark.lxd_layout("incus")
def test_for_another_layout(lxd_vm):
    pass


def test_fails_on_the_daemon(lxd_vm):
    lxd_vm.wait_for("STARTED", timeout=300)
    assert lxd_vm.run("echo $((6 * 7))").output == "41"
"""


@pytest.mark.vm
@pytest.mark.daemon
def test_a_users_tests_run_on_a_real_lxd_and_a_failure_leaves_its_files(
    tmp_path: Path, deb: Path
) -> None:
    """The plugin's `--lxd-host lxd` (here, with the other daemon tests: one module runs on one
    worker, so no two daemons run at once): every `lxd_vm` is a VM of one LXD daemon (Debian's
    5.0.2 here), judged from its side; a test marked for another layout is skipped, saying
    why."""
    (tmp_path / "test_host.py").write_text(HOST_TESTS)
    artifacts = tmp_path / "kept"
    done = run_pytest(
        tmp_path,
        "--lxd-host=lxd",
        "-rs",
        f"--lxd-artifacts={artifacts}",
        f"--junit-xml={tmp_path / 'junit.xml'}",
        deb=deb,
    )
    outcomes = {
        case.get("name"): next(
            (tag for tag in ("failure", "skipped", "error") if case.find(tag) is not None),
            "passed",
        )
        for case in ET.parse(tmp_path / "junit.xml").iter("testcase")
    }
    assert outcomes == {
        "test_the_daemon_reads_our_agent": "passed",
        "test_for_another_layout": "skipped",
        "test_fails_on_the_daemon": "failure",
    }, done.stdout
    assert "marked for the layout incus; --lxd-host lxd 5.0.2 is lxd-5.19" in done.stdout
    folder = artifact_folder(artifacts, "test_host.py::test_fails_on_the_daemon")
    assert sorted(p.name for p in folder.iterdir()) == [
        "console.log",
        "daemon-log.txt",
        "qemu.conf",
        "start.txt",
        "timeline.txt",
    ]
    assert (
        "unknown -> STARTED [the daemon's agent flag went up]"
        in (folder / "timeline.txt").read_text()
    )
    assert '[device "qemu_serial"]' in (folder / "qemu.conf").read_text()
    assert "42" in (folder / "console.log").read_text(errors="replace").splitlines()
    assert not list(Path("/tmp").glob("lxd-agent-lxd-*")), "the daemon's state was left"


# -- the specification replayed: LXD 5.0.2 upgraded to the rename under a running VM -------------


@pytest.mark.vm
@pytest.mark.daemon
def test_the_specification_replayed_on_lxd_5_0_2_and_its_rename_build(
    cloud_images: dict[str, CloudImage],
    debians_agent_image: CloudImage,
    tmp_path: Path,
    figures: Figures,
) -> None:
    """`rename-replay --debian-agent`: Debian's LXD 5.0.2, then our rename build of it started
    on the same state directory while the VM runs (host.lxd_rename, scenarios.rename_replay);
    each step's verdict and the daemon's own lines for it, a stateful snapshot's restore and
    the way through included. The debian-agent step's control is Debian's own
    `lxd-agent` on LXD 5.0.2, as `check --host lxd` runs it: where it never reports, the step
    says why in the unit's own terms and is not-checked (and the command fails: not a pass)."""
    record_path = tmp_path / "replay.json"
    command = harness_command(
        "rename-replay", "--image", str(cloud_images["ours"].disk), "--debian-agent",
        "--json", str(record_path),
    )  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=HOST_CHECK_TIMEOUT * 2, check=False
    )
    print(done.stdout, done.stderr)
    record = json.loads(record_path.read_text())
    assert record["error"] is None, done.stdout
    steps = [(s["name"], s["verdict"]) for s in record["steps"]]
    assert steps[:5] == [
        ("on-5.0.2", "pass"),
        ("upgraded-while-running", "pass"),
        ("stateful-restore", "pass"),
        ("way-through", "pass"),
        ("restarted", "pass"),
    ], done.stdout
    # The specification's "Limitations", in QEMU's own words on the real daemon.
    seen = record["steps"][2]["seen"]
    restored = "control: restored statefully on LXD 5.0.2, the restored agent's STARTED read"
    assert any(restored in line for line in seen), seen
    for words in ("Failed to load virtio-console", "load of migration failed"):
        assert any("qemu.log: " in line and words in line for line in seen), seen
    seen = record["steps"][3]["seen"]
    loaded = "restored statefully: loaded, the restored agent's STARTED read"
    assert any(loaded in line for line in seen), seen
    debian = record["steps"][5]
    control = [line for line in debian["seen"] if "control on LXD 5.0.2" in line]
    if probes.vsock_device_missing() is None and any("STARTED read" in s for s in control):
        assert (done.returncode, steps[5]) == (0, ("debian-agent", "pass")), done.stdout
        assert any("on the rename build: never STARTED" in line for line in debian["seen"])
    else:
        # LXD's agent listens on vsock before it writes STARTED (this VM has no vsock device),
        # or Debian's unit skipped itself: its ConditionPathExists is checked before udev
        # makes the port's link. Either way the daemon never read it: nothing to compare.
        assert (done.returncode, steps[5]) == (1, ("debian-agent", "not-checked")), done.stdout
        (why,) = [line for line in debian["seen"] if "not checked" in line]
        assert "LXD 5.0.2 never read Debian's agent either" in why, why
        assert (
            "skipped: a condition of its unit was not met" in why or "without a vsock device" in why
        ), why
    upgraded = record["steps"][1]
    assert any('msg="Instance agent started"' in line for line in upgraded["daemon_lines"])
    build = record["build"]
    assert build["version"].endswith("+rename1")
    assert build["go_tests"] == {"patched": "ok", "patched_ours": "ok", "unpatched_ours": "FAIL"}
    figures["lxd rename build (build, tests)"] = (
        f"{build['seconds']['build']} s, {build['seconds']['tests']} s"
    )
    assert nothing_left_of_the_daemon() == []


def test_a_daemon_that_says_it_is_another_host_is_a_difference_of_the_model() -> None:
    class Said:
        def __init__(self, smbios: list[str] | None) -> None:
            self.smbios = smbios

        async def qemu_smbios(self) -> list[str] | None:
            return self.smbios

    def compared(smbios: list[str] | None) -> tuple[list[str], list[str], list[str]]:
        check = LayoutCheck(layout="lxd-5.20", status_port=PORT_NAME, must_report=True)
        notes: list[str] = []
        kept = asyncio.run(
            _compare_identity(Said(smbios), get_layout("lxd-5.20"), check, notes.append)  # type: ignore[arg-type]
        )
        return kept, check.config_differences, notes

    lxd = "type=2,manufacturer=Canonical Ltd.,product=LXD"
    assert compared([lxd, "type=11,value=x"]) == (
        [lxd, "type=11,value=x"],
        [],
        [f"the daemon's QEMU identity: {lxd}"],
    )
    incus = "type=2,manufacturer=LinuxContainers,product=Incus"
    assert compared([incus])[1] == [f"-smbios type=2: the daemon passes {[incus]}, lxd-5.20 {lxd}"]
    assert compared([])[1] == [f"-smbios type=2: the daemon passes none, lxd-5.20 {lxd}"]
    assert compared(None) == (
        [],
        [],
        ["the daemon's QEMU command line could not be read: its identity not compared"],
    )
