"""The pytest plugin: a guest booted with LXD's (or Incus's) layout for each test that asks.

pytest loads it through the `pytest11` entry point of the lxd-agent-harness distribution, so a
test directory of anyone's needs nothing of this project's: install the harness and write::

    def test_my_image_reports(lxd_vm):
        lxd_vm.wait_for("STARTED", timeout=120)
        assert lxd_vm.run("systemctl is-active lxd-agent").status == 0
        assert lxd_vm.power_off().stopped

Options (`pytest --help`, group "lxd-agent-harness"): the image (`--lxd-image DISK` through
firmware, else the harness's own image of `--lxd-release` with the agent's `--lxd-deb`), the
layout, the firmware, warm starts (`--lxd-warm`), what is kept of a failed test
(`--lxd-artifacts DIR`) and whether its guest is kept running (`--lxd-keep-on-failure`).
Markers: `lxd_layout(name)`, `lxd_release(name)`, `lxd_cold` (this test's guest boots even
with `--lxd-warm`: for tests of the boot itself).

With `--lxd-host lxd|incus` every `lxd_vm` is instead a VM of a real daemon (`HostGuest`: one
daemon for the session, of the harness's own in a private state directory, or the one on
`--lxd-host-socket`), made from `--lxd-image` or the harness's cloud image with the package; the
layout is the daemon's, and a test marked `lxd_layout` for another one is skipped, saying both.

A failed test's guest leaves its console log, its QMP events, the host's ring timeline and the
agent's status in the guest in `<artifacts>/<test id>/`. Host side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator

import pytest

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.host.daemon import DaemonInfo, local_daemon, running_daemon
from lxd_agent_harness.host.probes import Adaptation
from lxd_agent_harness.host.rest import Daemon
from lxd_agent_harness.image.aptsources import DEFAULT_RELEASE, RELEASES
from lxd_agent_harness.image.cloud import build_cloud_image, cloud_spec
from lxd_agent_harness.image.deb import check_deb, find_deb
from lxd_agent_harness.image.rootfs import ImageSpec, build_image
from lxd_agent_harness.image.seed import make_seed_iso
from lxd_agent_harness.lxd.layouts import LAYOUTS, get_layout
from lxd_agent_harness.lxd.qemu_conf import (
    Override,
    apply_overrides,
    layout_sections,
    read_raw_qemu_conf,
)
from lxd_agent_harness.qemu.disk import check_boot_sector, disk_format
from lxd_agent_harness.scenarios.host_check import HOST_KINDS, host_layout, vm_config, vm_probes
from lxd_agent_harness.testing.guest import LxdVm
from lxd_agent_harness.testing.host_guest import HostGuest
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import (
    Boot,
    DirectBoot,
    FirmwareBoot,
    GuestImage,
    Network,
    VmConfig,
    parse_credential,
)
from lxd_agent_harness.vm.firmware import Firmware
from lxd_agent_harness.vm.instance import BOOT_TIMEOUT
from lxd_agent_harness.vm.kvm_probe import choose_accel
from lxd_agent_harness.vm.units import agent_diagnostics

DEFAULT_LAYOUT = "lxd-5.20"
DEFAULT_ARTIFACTS = "lxd-artifacts"

_REPORTS = pytest.StashKey[Dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lxd-agent-harness", "guests under QEMU with LXD's layouts")
    group.addoption(
        "--lxd-image",
        metavar="DISK",
        help="boot this qcow2 or raw disk through its firmware, as it is (default: the "
        "harness's own image of --lxd-release with --lxd-deb installed)",
    )
    group.addoption(
        "--lxd-deb",
        metavar="DEB",
        help="the agent's .deb: built into the harness's image; with --lxd-image, installed "
        "at boot from a NoCloud seed (default: $LXD_AGENT_DEB, else out/ of a clone)",
    )
    group.addoption(
        "--lxd-layout",
        default=DEFAULT_LAYOUT,
        choices=list(LAYOUTS),
        help=f"the layout of a test without an lxd_layout mark (default {DEFAULT_LAYOUT})",
    )
    group.addoption(
        "--lxd-firmware",
        default=Firmware.UEFI.value,
        choices=[f.value for f in Firmware],
        help="how --lxd-image boots (default uefi, as LXD)",
    )
    group.addoption(
        "--lxd-release",
        default=DEFAULT_RELEASE,
        choices=list(RELEASES),
        help=f"Debian release of the harness's image (default {DEFAULT_RELEASE})",
    )
    group.addoption(
        "--lxd-arch",
        default=host_arch().value,
        choices=[a.value for a in Arch],
        help="the guest's architecture (default: this host's); another one runs under TCG",
    )
    group.addoption(
        "--lxd-warm",
        action="store_true",
        help="restore guests from one saved after its first boot reported STARTED, instead "
        "of booting each (tests marked lxd_cold still boot)",
    )
    group.addoption(
        "--lxd-accel",
        default=Accel.AUTO.value,
        choices=[a.value for a in Accel],
        help="auto: KVM only where a probe boot works, else TCG",
    )
    group.addoption(
        "--lxd-timeout",
        type=float,
        default=BOOT_TIMEOUT,
        help=f"seconds a boot may take to STARTED (default {BOOT_TIMEOUT:g})",
    )
    group.addoption(
        "--lxd-artifacts",
        metavar="DIR",
        default=DEFAULT_ARTIFACTS,
        help="a failed test's console log, QMP events, ring timeline and agent status go to "
        f"DIR/<test id>/ (default ./{DEFAULT_ARTIFACTS})",
    )
    group.addoption(
        "--lxd-credential",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a systemd credential for every guest (SMBIOS type 11, as Incus passes "
        "systemd.credential.NAME=VALUE), e.g. lxd-agent.state=on; repeat for more",
    )
    group.addoption(
        "--lxd-nic",
        default=Network.NONE.value,
        choices=[n.value for n in Network],
        help="a NIC on QEMU's user network: isolated (restrict=on), open, or none (default)",
    )
    group.addoption(
        "--lxd-raw-qemu-conf",
        metavar="FILE",
        help="LXD's raw.qemu.conf for every guest, applied to the layout's QEMU configuration "
        "sections as LXD applies it",
    )
    group.addoption(
        "--lxd-host",
        choices=list(HOST_KINDS),
        help="run every lxd_vm on a real daemon (lxd or incus) instead of the QEMU model, "
        "judged from the daemon's side: started from its installed binaries in a state "
        "directory of the harness's own, unless --lxd-host-socket",
    )
    group.addoption(
        "--lxd-host-socket",
        metavar="SOCKET",
        help="with --lxd-host: the daemon already listening on this unix socket (the harness "
        "deletes what it made in it)",
    )
    group.addoption(
        "--lxd-keep-on-failure",
        action="store_true",
        help="keep a failed test's guest running until Enter is pressed (prints its console "
        "and QMP socket); at once when stdin is not a terminal",
    )


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "lxd_layout(name): the layout the lxd_vm guest boots in (default: --lxd-layout)",
        "lxd_release(name): the Debian release of the harness's image (default: --lxd-release)",
        "lxd_cold: the lxd_vm guest boots, even with --lxd-warm (tests of the boot itself)",
        "lxd_credential(name, value): a systemd credential for the lxd_vm guest, added to "
        "--lxd-credential's",
    ):
        config.addinivalue_line("markers", line)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so that `lxd_vm` knows whether its test failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    item.stash.setdefault(_REPORTS, {})[report.when] = report


@dataclass(frozen=True)
class LxdOptions:
    """The plugin's options, checked: what every `lxd_vm` of the session is made from."""

    image: Path | None
    image_format: str | None
    deb: Path | None
    layout: str
    firmware: Firmware
    release: str
    arch: Arch
    warm: bool
    accel: Accel
    timeout: float
    artifacts: Path
    keep_on_failure: bool
    credentials: tuple[tuple[str, str], ...] = ()
    network: Network = Network.NONE
    raw_qemu_conf: tuple[Override, ...] = ()
    host: str | None = None
    host_socket: Path | None = None


def _options(config: pytest.Config) -> LxdOptions:
    image_option = config.getoption("lxd_image")
    image = Path(image_option) if image_option else None
    image_format = None
    deb_option = config.getoption("lxd_deb")
    try:
        if image is not None:
            image_format = disk_format(image)
            check_boot_sector(image, image_format)
        credentials = tuple(parse_credential(c) for c in config.getoption("lxd_credential"))
        raw_option = config.getoption("lxd_raw_qemu_conf")
        raw_qemu_conf = read_raw_qemu_conf(Path(raw_option)) if raw_option else ()
        deb = None
        if image is None or deb_option:
            deb = find_deb(Path(deb_option) if deb_option else None)
            check_deb(deb)
    except HarnessError as e:
        raise pytest.UsageError(f"lxd-agent-harness: {e}") from None
    timeout = float(config.getoption("lxd_timeout"))
    if not timeout > 0:
        raise pytest.UsageError(f"--lxd-timeout must be more than 0 seconds, not {timeout:g}")
    host = config.getoption("lxd_host")
    socket_option = config.getoption("lxd_host_socket")
    _check_host_options(config, host, socket_option, image is not None and bool(deb_option))
    return LxdOptions(
        image=image,
        image_format=image_format,
        deb=deb,
        layout=config.getoption("lxd_layout"),
        firmware=Firmware(config.getoption("lxd_firmware")),
        release=config.getoption("lxd_release"),
        arch=Arch(config.getoption("lxd_arch")),
        warm=bool(config.getoption("lxd_warm")),
        accel=Accel(config.getoption("lxd_accel")),
        timeout=timeout,
        artifacts=Path(config.getoption("lxd_artifacts")),
        keep_on_failure=bool(config.getoption("lxd_keep_on_failure")),
        credentials=credentials,
        network=Network(config.getoption("lxd_nic")),
        raw_qemu_conf=raw_qemu_conf,
        host=host,
        host_socket=Path(socket_option) if socket_option else None,
    )


def _check_host_options(
    config: pytest.Config, host: str | None, socket: str | None, seeded: bool
) -> None:
    """What a real daemon cannot honour, refused in one line (as `check --host` refuses it)."""
    if socket and not host:
        raise pytest.UsageError("--lxd-host-socket needs --lxd-host (which daemon listens on it)")
    if not host:
        return
    refused = [
        (config.getoption("lxd_warm"), "--lxd-warm (the daemon boots every VM)"),
        (config.getoption("lxd_firmware") != Firmware.UEFI.value, "--lxd-firmware bios"),
        (config.getoption("lxd_arch") != Arch.AMD64.value, "--lxd-arch other than amd64"),
        (config.getoption("lxd_nic") != Network.NONE.value, "--lxd-nic (the VM gets no NIC)"),
        (config.getoption("lxd_raw_qemu_conf"), "--lxd-raw-qemu-conf"),
        (seeded, "--lxd-deb with --lxd-image (the daemon boots the image as it is)"),
        (
            host == "lxd" and config.getoption("lxd_credential"),
            "--lxd-credential on --lxd-host lxd (LXD has no systemd.credential keys)",
        ),
    ]
    given = [what for value, what in refused if value]
    if given:
        raise pytest.UsageError(
            f"lxd-agent-harness: --lxd-host cannot be given with {', '.join(given)}; drop it"
        )


@pytest.fixture(scope="session")
def lxd_options(pytestconfig: pytest.Config) -> LxdOptions:
    """The checked `--lxd-*` options (an unusable image or .deb fails the session's first
    guest with one line saying what to give)."""
    try:
        return _options(pytestconfig)
    except pytest.UsageError as e:
        pytest.fail(str(e), pytrace=False)


class _Images:
    """The harness's own images, built (or reused) once per session and release."""

    def __init__(self, deb: Path, arch: Arch) -> None:
        self.deb = deb
        self.arch = arch
        self._built: dict[str, GuestImage] = {}

    def get(self, release: str) -> GuestImage:
        if release not in self._built:
            spec = ImageSpec(release=release, debs=(self.deb,), arch=self.arch)
            self._built[release] = build_image(spec)
        return self._built[release]


@pytest.fixture(scope="session")
def _lxd_session(
    lxd_options: LxdOptions, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[_Images | None, Path | None, Accel]]:
    images = None
    seed = None
    if lxd_options.host is not None:  # the daemon's VMs: `_lxd_host`
        yield None, None, Accel.AUTO
        return
    try:
        if lxd_options.image is None:
            assert lxd_options.deb is not None
            images = _Images(lxd_options.deb, lxd_options.arch)
        elif lxd_options.deb is not None:
            seed = make_seed_iso(lxd_options.deb, tmp_path_factory.mktemp("lxd-seed") / "seed.iso")
        accel = _accel(lxd_options, images)
    except HarnessError as e:
        pytest.fail(f"lxd-agent-harness: {e}", pytrace=False)
    yield images, seed, accel


@dataclass(frozen=True)
class _HostSession:
    """The session's daemon and the disk every `lxd_vm` on it is made from."""

    client: Daemon
    info: DaemonInfo
    adaptations: tuple[Adaptation, ...]
    disk: Path
    disk_format: str


@pytest.fixture(scope="session")
def _lxd_host(lxd_options: LxdOptions) -> Iterator[_HostSession]:
    """`--lxd-host`'s daemon, started once for the session (or the one on its socket)."""
    assert lxd_options.host is not None
    with contextlib.ExitStack() as stack:
        try:
            if lxd_options.image is not None:
                assert lxd_options.image_format is not None
                disk, disk_format = lxd_options.image, lxd_options.image_format
            else:
                assert lxd_options.deb is not None
                spec = cloud_spec(lxd_options.release, (lxd_options.deb,), Arch.AMD64)
                disk, disk_format = build_cloud_image(spec, print).disk, "qcow2"
            if lxd_options.host_socket is not None:
                client, info = running_daemon(lxd_options.host, lxd_options.host_socket)
            else:
                daemon = stack.enter_context(local_daemon(lxd_options.host, print))
                client, info = daemon.client, daemon.started
            adaptations = (*info.adaptations, *asyncio.run(vm_probes(print)))
        except HarnessError as e:
            pytest.fail(f"lxd-agent-harness: {e}", pytrace=False)
        for adaptation in adaptations:
            print(f"lxd_vm: {info.kind}: adapted: {adaptation.name}: {adaptation.reason}")
        yield _HostSession(client, info, adaptations, disk, disk_format)


def _accel(options: LxdOptions, images: _Images | None) -> Accel:
    probe_image = images.get(options.release) if images is not None else None
    choice = asyncio.run(
        choose_accel(options.accel, probe_image, lambda _line: None, arch=options.arch)
    )
    return choice.accel


def _marked(item: pytest.Item, name: str, default: str) -> str:
    marker = item.get_closest_marker(name)
    if marker is None:
        return default
    if len(marker.args) != 1 or not isinstance(marker.args[0], str):
        pytest.fail(f"{item.nodeid}: @pytest.mark.{name} takes one name", pytrace=False)
    return marker.args[0]


@pytest.fixture
def lxd_layout(request: pytest.FixtureRequest, lxd_options: LxdOptions) -> str:
    """The layout `lxd_vm` boots in: the test's `lxd_layout` mark, else `--lxd-layout`.
    Parametrize it to run a test in several: `@pytest.mark.parametrize("lxd_layout", [...])`."""
    return _marked(request.node, "lxd_layout", lxd_options.layout)


@pytest.fixture
def lxd_release(request: pytest.FixtureRequest, lxd_options: LxdOptions) -> str:
    """The release of the harness's image `lxd_vm` boots: the `lxd_release` mark, else
    `--lxd-release`; parametrize it like `lxd_layout`."""
    return _marked(request.node, "lxd_release", lxd_options.release)


@pytest.fixture
def lxd_vm(
    request: pytest.FixtureRequest,
    lxd_options: LxdOptions,
    lxd_layout: str,
    lxd_release: str,
    _lxd_session: tuple[_Images | None, Path | None, Accel],
) -> Iterator[LxdVm | HostGuest]:
    """A running guest: restored from a saved one with `--lxd-warm` (its STARTED already seen),
    else booting (wait for what you need: `lxd_vm.wait_for("STARTED")`); with `--lxd-host`, a
    VM of that daemon (`HostGuest`)."""
    images, seed, accel = _lxd_session
    item = request.node
    if lxd_options.host is not None:
        yield from _host_vm(request, lxd_options)
        return
    if lxd_release not in RELEASES:
        pytest.fail(f"{item.nodeid}: no release {lxd_release!r} ({', '.join(RELEASES)})")
    try:
        layout = get_layout(lxd_layout)
        boot: Boot
        if images is not None:
            boot = DirectBoot(images.get(lxd_release))
        else:
            assert lxd_options.image is not None and lxd_options.image_format is not None
            boot = FirmwareBoot(lxd_options.image, lxd_options.image_format, lxd_options.firmware)
        marked = tuple(
            parse_credential(f"{m.args[0]}={m.args[1]}")
            for m in item.iter_markers("lxd_credential")
        )
        # A raw.qemu.conf that does not fit this layout fails here, in one line.
        apply_overrides(layout_sections(layout), list(lxd_options.raw_qemu_conf))
    except HarnessError as e:
        pytest.fail(f"lxd-agent-harness: {e}", pytrace=False)
    config = VmConfig(
        layout=layout,
        boot=boot,
        accel=accel,
        arch=lxd_options.arch,
        seed=seed,
        network=lxd_options.network,
        credentials=lxd_options.credentials + marked,
        raw_qemu_conf=lxd_options.raw_qemu_conf,
        user_qmp=lxd_options.keep_on_failure,
    )
    warm = lxd_options.warm and item.get_closest_marker("lxd_cold") is None
    guest = LxdVm.start(config, warm=warm, timeout=lxd_options.timeout, progress=print)
    print(f"lxd_vm: {layout.name}: {guest.start_info.reason} ({guest.start_info.seconds:.1f} s)")
    yield from _handed_out(
        item,
        guest,
        lambda: save_artifacts(guest, lxd_options.artifacts, item.nodeid),
        "the guest's console, QMP events and timeline",
        (lambda: _hold(request, guest)) if lxd_options.keep_on_failure else None,
    )


def _handed_out(
    item: pytest.Item,
    guest: LxdVm | HostGuest,
    save: Callable[[], Path],
    saved: str,
    hold: Callable[[], None] | None = None,
) -> Iterator[LxdVm | HostGuest]:
    """The guest for the test; after a failed test, its files saved (and the guest held);
    closed on every exit path."""
    try:
        yield guest
        reports = item.stash.get(_REPORTS, {})
        if any(report.failed for report in reports.values()):
            print(f"lxd_vm: {saved} are in {save()}")
            if hold is not None:
                hold()
    finally:
        guest.close()


def _host_vm(request: pytest.FixtureRequest, options: LxdOptions) -> Iterator[LxdVm | HostGuest]:
    """`lxd_vm` with `--lxd-host`: a VM of the session's daemon."""
    session: _HostSession = request.getfixturevalue("_lxd_host")
    item = request.node
    layout = host_layout(session.info.kind, session.info.version_tuple).name
    marked = item.get_closest_marker("lxd_layout")
    wanted = request.getfixturevalue("lxd_layout") if marked is not None else None
    if wanted is not None and wanted != layout:
        pytest.skip(
            f"marked for the layout {wanted}; --lxd-host {session.info.kind} "
            f"{session.info.version} is {layout}"
        )
    try:
        credentials = options.credentials + tuple(
            parse_credential(f"{m.args[0]}={m.args[1]}")
            for m in item.iter_markers("lxd_credential")
        )
    except HarnessError as e:
        pytest.fail(f"lxd-agent-harness: {e}", pytrace=False)
    config = vm_config(session.adaptations, (), credentials)
    guest = HostGuest.start(
        session.client, session.info, session.disk, session.disk_format, config, print
    )
    print(f"lxd_vm: {layout}: {guest.start_info.reason} ({guest.start_info.seconds:.1f} s)")
    yield from _handed_out(
        item,
        guest,
        lambda: save_host_artifacts(guest, options.artifacts, item.nodeid),
        "the guest's console, timeline and the daemon's files",
    )


def artifact_folder(artifacts: Path, nodeid: str) -> Path:
    """`artifacts/<the test id, made a file name>`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")[:150]
    return artifacts / (name or "test")


def save_artifacts(guest: LxdVm, artifacts: Path, nodeid: str) -> Path:
    """A failed test's guest, as files: console log, QMP events, ring timeline, agent status."""
    folder = artifact_folder(artifacts, nodeid)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vm = guest.vm
    if vm.files is not None and vm.files.console_log.is_file():
        shutil.copyfile(vm.files.console_log, folder / "console.log")
    (folder / "timeline.txt").write_text("\n".join(guest.timeline) + "\n")
    (folder / "qmp-events.txt").write_text("\n".join(guest.events()) + "\n")
    start = guest.start_info
    (folder / "start.txt").write_text(
        f"{start.how.value}: {start.reason} ({start.seconds:.1f} s)\n"
    )
    diagnostics = guest.call(agent_diagnostics(vm), 30.0)
    (folder / "agent-status.txt").write_text(diagnostics + "\n")
    return folder


def save_host_artifacts(guest: HostGuest, artifacts: Path, nodeid: str) -> Path:
    """A failed test's VM of a real daemon, as files: console log, timeline, the daemon's log
    lines about it and its `qemu.conf`."""
    folder = artifact_folder(artifacts, nodeid)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    console = guest.console_log()
    if console is not None and console.is_file():
        shutil.copyfile(console, folder / "console.log")
    (folder / "timeline.txt").write_text("\n".join(guest.timeline) + "\n")
    (folder / "daemon-log.txt").write_text("\n".join(guest.daemon_log()) + "\n")
    (folder / "qemu.conf").write_text(guest.host.qemu_conf() or "")
    start = guest.start_info
    (folder / "start.txt").write_text(
        f"{start.how.value}: {start.reason} ({start.seconds:.1f} s)\n"
    )
    return folder


def _hold(request: pytest.FixtureRequest, guest: LxdVm) -> None:
    """`--lxd-keep-on-failure`: say how to reach the guest and wait for Enter (or stdin's end)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    vm = guest.vm
    lines = [
        f"lxd-agent-harness: {request.node.nodeid} failed; its guest is kept running",
        f"  console:     pyserial-miniterm {vm.console_device} 115200   (or screen)",
        f"  QMP:         {vm.files.user_qmp if vm.files else '-'}",
        f"  QEMU pid:    {vm.qemu.pid}",
        "  press Enter to stop it and go on",
    ]
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    try:
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        sys.stdin.readline()
    finally:
        if capture is not None:
            capture.resume_global_capture()
