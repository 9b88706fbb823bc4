"""Tests for lxd_agent_harness.scenarios.check: how a layout's boot is judged, without a VM.

Then `lxd-agent-harness check` on three real cloud images, as a user runs it: our package in
it (exit 0), the LXD 5.0 emulation in it (exit 1: it reports only on the old name), no agent
(exit 1). Each boots through UEFI, as it is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from lxd_agent_harness.base.arch import Arch
from lxd_agent_harness.base.errors import BootStuck
from lxd_agent_harness.image.cloud import CloudImage
from lxd_agent_harness.lxd.layouts import LAYOUTS, get_layout
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.check import (
    CHECK_LAYOUTS,
    DEFAULT_CHECK_BOUND,
    FOREIGN_ARCH_FACTOR,
    CheckVerdict,
    Finding,
    HostReport,
    LayoutCheck,
    _see_boot_held,
    default_bound,
    judge,
    status_port,
)
from lxd_agent_harness.vm.firmware import Firmware
from tests.helpers import harness_command
from tests.vms import Figures


def change(seconds: float, status: str, port: str) -> TimelineEntry:
    return TimelineEntry(seconds, EntryKind.STATE, f"unknown -> {status}", port)


def reporting(layout: str) -> LayoutCheck:
    """What an agent that survives the rename shows on `layout`."""
    port = status_port(get_layout(layout))
    return LayoutCheck(
        layout=layout,
        status_port=port,
        must_report=layout != "incus",
        started=change(30.0, STARTED, port),
        stopped=change(41.0, STOPPED, port),
        opened_ports=[port],
        powered_down=40.0,
        guest_off=42.0,
    )


def silent(layout: str, opened: list[str] | None = None) -> LayoutCheck:
    return replace(reporting(layout), started=None, stopped=None, opened_ports=opened or [])


def judged(*checks: LayoutCheck) -> list[tuple[str, Finding]]:
    judge(checks)
    return [(check.layout, check.finding) for check in checks]


def test_each_layouts_host_reads_the_port_lxds_template_puts_the_ring_on() -> None:
    assert {name: status_port(layout) for name, layout in LAYOUTS.items()} == {
        "lxd-5.19": LEGACY_PORT_NAME,
        "lxd-5.20": PORT_NAME,
        "incus": INCUS_PORT_NAME,
        "incus-6": INCUS_PORT_NAME,
        "bridged": PORT_NAME,
    }
    assert CHECK_LAYOUTS == ("lxd-5.19", "lxd-5.20", "incus")


def test_an_agent_that_reports_everywhere_passes_with_the_port_named() -> None:
    checks = [reporting("lxd-5.19"), reporting("lxd-5.20"), silent("incus")]
    assert judged(*checks) == [
        ("lxd-5.19", Finding.REPORTS),
        ("lxd-5.20", Finding.REPORTS),
        ("incus", Finding.STANDS_ASIDE),
    ]
    assert checks[1].reason == f"reports on {PORT_NAME}"
    verdict = CheckVerdict(Path("disk.qcow2"), Firmware.UEFI, checks=checks)
    assert verdict.passed


def test_an_agent_of_before_the_rename_reports_only_on_the_legacy_port() -> None:
    # Seen on lxd-5.19; on lxd-5.20 either it opened the chardev-less stub or never started.
    old, new = reporting("lxd-5.19"), silent("lxd-5.20")
    assert judged(old, new) == [("lxd-5.19", Finding.REPORTS), ("lxd-5.20", Finding.LEGACY_ONLY)]
    assert new.reason.startswith(f"reports only on the legacy port {LEGACY_PORT_NAME}")
    assert not new.passed
    alone = silent("lxd-5.20", opened=[LEGACY_PORT_NAME])
    assert judged(alone) == [("lxd-5.20", Finding.LEGACY_ONLY)]


def test_nothing_reported_anywhere_is_no_agent_where_lxd_needs_one() -> None:
    assert judged(silent("lxd-5.19"), silent("lxd-5.20"), silent("incus")) == [
        ("lxd-5.19", Finding.NO_AGENT),
        ("lxd-5.20", Finding.NO_AGENT),
        ("incus", Finding.STANDS_ASIDE),
    ]


def test_a_held_power_off_fails_and_names_the_blocking_write_and_the_job() -> None:
    # Incus: standing aside means holding nothing; a blocking write to the stub holds it.
    stub = replace(
        silent("incus", opened=[LEGACY_PORT_NAME]),
        power_off_held=True,
        guest_off=None,
        job_running="stop job for LXD - agent",
    )
    assert judged(stub) == [("incus", Finding.HOLDS_POWER_OFF)]
    assert stub.reason == (
        "holds the power-off: a blocking write to a port with nothing behind it; "
        "systemd was running a stop job for LXD - agent"
    )
    # An agent that reports and then holds the power-off.
    late = replace(reporting("lxd-5.20"), power_off_held=True, guest_off=None, stopped=None)
    assert judged(late) == [("lxd-5.20", Finding.HOLDS_POWER_OFF)]
    assert late.reason == "holds the power-off: the guest was still up 20 s after the power button"


def test_an_agent_silent_on_the_new_port_is_judged_by_that_whatever_it_held() -> None:
    """The root cause first: LXD 5.0's blocking write to the stub also holds the boot, and a
    power button pressed meanwhile; the finding is where it wrote."""
    held = replace(
        silent("lxd-5.20", opened=[LEGACY_PORT_NAME]),
        power_off_held=True,
        boot_job="start job for lxd-agent.service",
    )
    assert judged(held) == [("lxd-5.20", Finding.LEGACY_ONLY)]


def test_started_without_stopped_and_started_on_the_wrong_ring_both_fail() -> None:
    no_stop = replace(reporting("lxd-5.20"), stopped=None)
    bridged = replace(reporting("bridged"), started=change(30.0, STARTED, LEGACY_PORT_NAME))
    assert judged(no_stop, bridged) == [
        ("lxd-5.20", Finding.NO_STOPPED),
        ("bridged", Finding.WRONG_PORT),
    ]
    assert bridged.reason.startswith(f"reports on {LEGACY_PORT_NAME}, which this layout's host")


def test_a_layout_that_could_not_boot_is_not_checked_and_fails_the_verdict() -> None:
    stuck = replace(
        silent("lxd-5.20"), error=BootStuck("no kernel", dead_end="no kernel started in time")
    )
    assert judged(stuck) == [("lxd-5.20", Finding.NOT_CHECKED)]
    assert stuck.reason == "could not check: no kernel"
    assert not CheckVerdict(Path("x"), Firmware.UEFI, checks=[stuck]).passed
    assert not CheckVerdict(Path("x"), Firmware.UEFI).passed  # nothing checked: no pass


class ConsoleSaid:
    """Stands in for a VM whose console shows `text` (only what the boot-held check reads)."""

    def __init__(self, text: bytes, starved: float = 0.0) -> None:
        self.notes: list[str] = []
        self.console = self
        self.text = text
        self.cores_released = False
        self.starved = starved
        self.asked: list[float] = []

    def seconds(self) -> float:
        return 100.0

    def host_cpu_wait(self, since: float = 0.0) -> float:
        self.asked.append(since)
        return self.starved

    def last_groups(self, pattern: re.Pattern[bytes]) -> tuple[bytes | None, ...] | None:
        matches = list(pattern.finditer(self.text))
        return matches[-1].groups() if matches else None

    def note(self, text: str) -> None:
        self.notes.append(text)

    def release_cores(self) -> None:
        self.cores_released = True


@pytest.mark.parametrize(
    ("console", "held"),
    [
        (b"A start job is running for LXD - agent (19s / 1min 30s)\r\n", ""),
        (
            b"A start job is running for LXD - agent (12s / 1min 30s)\r\n"
            b"A start job is running for LXD - agent (20s / 1min 30s)\r\n",
            "start job for LXD - agent",
        ),
        (b"A start job is running for x (1min 5s / 1min 30s)", "start job for x"),
        (
            b"Job lxd-agent.service/start running (21s / 1min 30s)",
            "start job for lxd-agent.service",
        ),
        (b"A stop job is running for LXD - agent (40s / 1min 30s)", ""),
    ],
)
def test_a_start_job_on_the_console_holds_the_boot_once_it_ran_for_the_bound(
    console: bytes, held: str
) -> None:
    check = silent("lxd-5.20")
    vm = ConsoleSaid(console)
    _see_boot_held(vm, check)  # type: ignore[arg-type]
    assert check.boot_job == held
    assert bool(vm.notes) == bool(held)
    assert vm.cores_released == bool(held)  # a held boot only waits: its core goes to another VM


@pytest.mark.parametrize(
    ("running", "starved", "held"),
    [(25, 6.0, False), (25, 5.0, True), (40, 0.0, True)],
)
def test_a_start_job_holds_the_boot_for_the_time_the_guest_could_run(
    running: int, starved: float, held: bool
) -> None:
    """On a busy host a guest's vCPU waits for a CPU and its jobs run long: the wait within the
    job's time (from when the console says it began) is not counted against the bound."""
    check = silent("lxd-5.20")
    vm = ConsoleSaid(
        b"A start job is running for dev-ttyS0.device (%ds / no limit)" % running, starved
    )
    _see_boot_held(vm, check)  # type: ignore[arg-type]
    assert bool(check.boot_job) is held
    assert vm.asked == [100.0 - running]  # the window the job ran in, in VM seconds
    if held and starved:
        assert vm.notes == [
            f"the boot held for {running} s ({starved:.1f} s of it waiting for a host CPU) "
            "by a start job for dev-ttyS0.device"
        ]


def test_a_guest_of_another_architecture_gets_a_longer_default_bound_that_says_why() -> None:
    assert default_bound(Arch.AMD64, Arch.AMD64) == (DEFAULT_CHECK_BOUND, "")
    bound, why = default_bound(Arch.ARM64, Arch.AMD64)
    assert bound == DEFAULT_CHECK_BOUND * FOREIGN_ARCH_FACTOR > DEFAULT_CHECK_BOUND
    assert why == (
        f"bound {bound:g} s (20 s x 3: an arm64 guest runs under TCG on this amd64 host; "
        "--bound sets it)"
    )


# -- `check` on real images, through the command line --------------------------------------------

CHECK_TIMEOUT = 1800


def check(image: CloudImage, tmp_path: Path, *layouts: str) -> tuple[int, dict[str, Any], str]:
    """`lxd-agent-harness check` as a user runs it: exit status, its JSON, its output."""
    record, junit = tmp_path / "check.json", tmp_path / "check.xml"
    options = [arg for layout in layouts for arg in ("--layout", layout)]
    # Three guests at a time: each has one vCPU here (LXD_AGENT_HARNESS_VCPUS) and gives its
    # core up at the login prompt, so two boot while a third waits out the agent's grace.
    command = harness_command(
        "check", "--image", str(image.disk), *options, "--jobs", "3",
        "--json", str(record), "--junit", str(junit),
    )  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False
    )
    print(done.stdout, done.stderr)
    ET.parse(junit)  # a CI system can read it
    return done.returncode, json.loads(record.read_text()), done.stdout


def findings(record: dict[str, Any]) -> dict[str, str]:
    return {layout["layout"]: layout["finding"] for layout in record["layouts"]}


@pytest.mark.vm
def test_check_passes_an_image_with_our_agent_on_lxd_5_19_5_20_and_incus(
    cloud_images: dict[str, CloudImage], tmp_path: Path, figures: Figures
) -> None:
    code, record, said = check(cloud_images["ours"], tmp_path)
    assert code == 0, said
    assert findings(record) == {
        "lxd-5.19": "reports",
        "lxd-5.20": "reports",
        "incus": "reports",
    }
    by_layout = {layout["layout"]: layout for layout in record["layouts"]}
    assert by_layout["lxd-5.19"]["started"]["port"] == LEGACY_PORT_NAME
    assert by_layout["lxd-5.20"]["started"]["port"] == PORT_NAME
    assert by_layout["incus"]["started"]["port"] == INCUS_PORT_NAME
    for name, layout in by_layout.items():
        assert not layout["power_off_held"], name
        figures[f"check, ours on {name}: QEMU start -> STARTED"] = (
            f"{layout['started']['seconds']:.1f} s" if layout["started"] else "never"
        )
    assert "OK: the agent in" in said


@pytest.mark.vm
def test_check_fails_an_image_whose_agent_knows_only_the_old_name(
    cloud_images: dict[str, CloudImage], tmp_path: Path, figures: Figures
) -> None:
    code, record, said = check(cloud_images["lxd-5.0"], tmp_path, "lxd-5.20")
    assert code == 1, said
    (layout,) = record["layouts"]
    figures["check, LXD 5.0's agent on lxd-5.20"] = f"{layout['finding']}: {layout['reason']}"
    assert layout["started"] is None
    # LXD 5.0's unit races udev (its condition may be checked before the port has its name;
    # README, the matrix): where it ran, it opened the stub, and that is the finding.
    if LEGACY_PORT_NAME in layout["opened_ports"]:
        assert layout["finding"] == "legacy-only", layout
        assert layout["reason"] == (
            f"reports only on the legacy port {LEGACY_PORT_NAME}: LXD >= 5.20 never sees it"
        )
    else:
        assert layout["finding"] == "no-agent", layout
    assert "FAILED:" in said


@pytest.mark.vm
def test_check_fails_an_image_with_no_agent(
    cloud_images: dict[str, CloudImage], tmp_path: Path
) -> None:
    code, record, said = check(cloud_images["none"], tmp_path, "lxd-5.20")
    assert code == 1, said
    assert findings(record) == {"lxd-5.20": "no-agent"}
    (layout,) = record["layouts"]
    assert layout["started"] is None and layout["login_prompt"] is not None
    assert not layout["power_off_held"] and layout["reason"] == "no agent reported"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR for a harness run with a short path: its QMP socket goes there, and tmp_path
    under xdist is too long for a unix socket's path."""
    with tempfile.TemporaryDirectory(prefix="la-", dir="/tmp") as tmp:
        yield Path(tmp)


@pytest.mark.vm
def test_check_passes_our_cloud_image_as_lxds_split_image_and_as_its_unified_tarball(
    deb: Path,
    cloud_images: dict[str, CloudImage],
    tmp_path: Path,
    short_tmp: Path,
    figures: Figures,
) -> None:
    # The image as `image --cloud --format` writes it (the "ours" disk, already built).
    made = {}
    for kind in ("split", "unified"):
        command = harness_command(
            "image", "--cloud", "--agent", "ours", "--deb", str(deb), "--format", kind
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
        made[kind] = Path(done.stdout.splitlines()[-1])  # after its progress lines
    assert sorted(p.name for p in made["split"].iterdir()) == ["disk.qcow2", "lxd.tar.xz"]
    assert made["unified"].is_file() and made["unified"].parent == cloud_images["ours"].directory
    # Both checked at once, each on a layout of its own.
    runs = {
        kind: (tmp_path / kind, layout)
        for kind, layout in (("split", "lxd-5.20"), ("unified", "incus"))
    }
    running = {}
    scratch = short_tmp  # the checks' TMPDIR, where the unified disk is extracted
    for kind, (out, layout) in runs.items():
        out.mkdir()
        command = harness_command(
            "check", "--image", str(made[kind]), "--layout", layout,
            "--json", str(out / "check.json"),
        )  # fmt: skip
        running[kind] = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TMPDIR": str(scratch)},
        )
    said = {
        kind: process.communicate(timeout=CHECK_TIMEOUT)[0] for kind, process in running.items()
    }
    print(said)
    for kind, (out, layout) in runs.items():
        assert running[kind].returncode == 0, said[kind]
        record = json.loads((out / "check.json").read_text())
        assert findings(record) == {layout: "reports"}
        assert record["image"] == str(made[kind])
        assert record["image_input"]["kind"] == kind
        assert record["image_input"]["metadata"]["architecture"] == "x86_64"
        assert record["image_input"]["metadata"]["properties"]["release"] == "bookworm"
        assert "image: " in said[kind] and "x86_64, Debian bookworm" in said[kind]
        figures[f"check, ours as a {kind} image on {layout}: QEMU start -> STARTED"] = (
            f"{record['layouts'][0]['started']['seconds']:.1f} s"
        )
    # The unified tarball's disk was extracted for the check, and is gone with it.
    assert f"extracting rootfs.img from {made['unified']} into {scratch}/" in said["unified"]
    assert [p for p in scratch.iterdir() if p.name.startswith("lxd-agent-image-")] == []


# -- the findings of a check on a real daemon (`check --host`) -----------------------------------

ON_LXD = HostReport(kind="lxd", version="5.0.2", layout="lxd-5.19")


def test_a_daemon_whose_configuration_differs_from_the_model_outranks_a_report() -> None:
    check = replace(reporting("lxd-5.19"), host=ON_LXD, config_differences=["[x] y: ..."])
    assert judged(check) == [("lxd-5.19", Finding.CONFIG_DIFFERS)]
    assert "[x] y: ..." in check.reason


def test_stopped_that_could_not_be_looked_for_is_not_checked_never_a_pass() -> None:
    check = replace(
        reporting("lxd-5.19"), host=ON_LXD, stopped=None, stopped_unchecked="no root shell"
    )
    assert judged(check) == [("lxd-5.19", Finding.NOT_CHECKED)]
    assert check.reason.endswith("STOPPED not checked: no root shell")
    unit_stopped = replace(reporting("lxd-5.19"), host=ON_LXD, stopped=None)
    assert judged(unit_stopped) == [("lxd-5.19", Finding.NO_STOPPED)]
    assert "when its unit stopped" in unit_stopped.reason


def test_an_agent_that_could_not_start_for_this_machine_is_not_checked_not_absent() -> None:
    vsock = replace(silent("lxd-5.19"), host=ON_LXD, agent_unstartable="no vsock device")
    assert judged(vsock) == [("lxd-5.19", Finding.NOT_CHECKED)]
    skipped = replace(silent("lxd-5.19"), host=ON_LXD, agent_unit="inactive, skipped")
    assert judged(skipped) == [("lxd-5.19", Finding.NO_AGENT)]
    assert skipped.reason == "no agent reported; lxd-agent.service: inactive, skipped"
