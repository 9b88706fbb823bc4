"""The unit and the udev rule in systemd/: systemd's own checks, and agreement with the agent."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from lxd_agent.guest.cli import UNIT_RUN
from lxd_agent.protocol import CANDIDATE_PORT_NAMES

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "lxd-agent.service"
RULE = SYSTEMD / "60-lxd-agent.rules"


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: run 'make setup' (Debian package systemd)"
    return path


def test_security_exposure_is_at_most_1_5() -> None:
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"Overall exposure level for lxd-agent\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-2000:]
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure} (peers: 9.4-9.6)")
    assert exposure <= 1.5


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists: point it at this checkout's lxd-agent.
    agent = Path(sys.executable).parent / "lxd-agent"
    assert agent.exists(), f"{agent} is missing: run the tests from the venv ('make test')"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/lxd-agent", str(agent)))
    # --man=no: the manual page is checked with the package, not installed on this host.
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


# -- what the unit file says ---------------------------------------------------------------------

Unit = Dict[str, Dict[str, List[str]]]


def parse_unit(text: str) -> Unit:
    """A unit file as systemd reads it: sections of keys, each with every value it was given.

    Comments and blank lines are skipped and continued lines joined; an empty assignment
    resets the key, as in systemd (`CapabilityBoundingSet=` then holds `[""]`).
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            assert line[1:-1] not in unit, f"section {line} twice"
            section = unit[line[1:-1]] = {}
            continue
        assert section is not None and "=" in line, f"not a unit file line: {line!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        section[key] = [value] if value == "" else [*section.get(key, []), value]
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def words(unit: Unit, section: str, key: str) -> list[str]:
    return " ".join(unit[section].get(key, [])).split()


def test_unit_has_only_the_sections_it_needs(unit: Unit) -> None:
    # No [Install]: udev starts the unit when a port appears; enabling it would start it on
    # machines without a port and make dpkg wait for it.
    assert list(unit) == ["Unit", "Service"]


def test_unit_is_skipped_where_no_port_can_be_used(unit: Unit) -> None:
    # No VM, or no virtio port at all: systemd skips the unit without running anything (sysfs,
    # so a port udev did not link counts).
    assert unit["Unit"]["ConditionVirtualization"] == ["vm"]
    assert unit["Unit"]["ConditionPathExistsGlob"] == ["/sys/class/virtio-ports/vport*"]
    # Ports, but none usable (Incus's stub): run itself skips (READY=1, exit 0), so there is
    # no ExecCondition= probe, which was a second interpreter at every boot.
    assert "ExecCondition" not in unit["Service"]
    assert unit["Service"]["ExecStart"] == ["/usr/bin/lxd-agent run --if-no-port=skip"]


def test_unit_runs_what_the_entry_points_fast_path_expects(unit: Unit) -> None:
    # cli.UNIT_RUN skips argparse only for the unit's exact words; a drift would cost 20 ms.
    (start,) = unit["Service"]["ExecStart"]
    assert start.split()[1:] == UNIT_RUN


def test_unit_is_on_no_boot_targets_critical_chain(unit: Unit) -> None:
    section = unit["Unit"]
    # Without default dependencies it can start before basic.target, as soon as udev sees a
    # port, so it needs its own ordering and its own stop at shutdown.
    assert section["DefaultDependencies"] == ["no"]
    assert set(words(unit, "Unit", "After")) == {"local-fs.target", "systemd-journald.socket"}
    # Nothing waits for it: ordered before no boot target or service, only before the
    # shutdown targets (stopped, and STOPPED written, before the file systems go).
    assert set(words(unit, "Unit", "Before")) == {"shutdown.target", "umount.target"}
    assert words(unit, "Unit", "Conflicts") == ["shutdown.target"]
    assert "WantedBy" not in unit.get("Install", {}) and "RequiredBy" not in unit.get("Install", {})
    # Restarts are bounded: a broken agent does not loop for ever.
    assert section["StartLimitIntervalSec"] and section["StartLimitBurst"]


def test_unit_tells_ready_only_when_started_is_written_and_writes_stopped_however_it_ends(
    unit: Unit,
) -> None:
    service = unit["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    (post,) = service["ExecStopPost"]
    # `-`: a failed last write must not fail the stop; bounded, so it never holds up shutdown.
    assert post.startswith("-/bin/sh -c ")
    assert post.endswith(" || exec /usr/bin/lxd-agent status write STOPPED --timeout 2'")
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] and service["TimeoutStopSec"] and service["TimeoutStartSec"]


def _stop_hook(unit: Unit, agent: Path) -> list[str]:
    """ExecStopPost= as systemd runs it: `-` dropped, `$$` unescaped, our lxd-agent put in."""
    (post,) = unit["Service"]["ExecStopPost"]
    command = shlex.split(post.lstrip("-").replace("$$", "$"))
    return [word.replace("/usr/bin/lxd-agent", str(agent)) for word in command]


@pytest.mark.parametrize(
    ("exit_code", "exit_status", "runs_the_agent"),
    [
        ("exited", "0", False),  # stopped cleanly (STOPPED written), or skipped: no port
        ("exited", "3", True),  # stopped, but STOPPED did not get out
        ("exited", "1", True),  # no port after --wait, or crashed
        ("killed", "KILL", True),  # SIGKILL, OOM: the agent never said STOPPED
        ("dumped", "ABRT", True),
        ("", "", True),  # ExecStart= never ran
    ],
)
def test_stop_hook_starts_a_second_interpreter_only_when_the_agent_did_not_exit_0(
    unit: Unit, tmp_path: Path, exit_code: str, exit_status: str, runs_the_agent: bool
) -> None:
    calls = tmp_path / "calls"
    agent = tmp_path / "lxd-agent"
    agent.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    agent.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "EXIT_CODE": exit_code, "EXIT_STATUS": exit_status}
    result = subprocess.run(_stop_hook(unit, agent), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ran = calls.read_text().splitlines() if calls.exists() else []
    assert ran == (["status write STOPPED --timeout 2"] if runs_the_agent else [])


def test_unit_may_write_only_virtio_ports_and_keeps_no_privilege(unit: Unit) -> None:
    service = unit["Service"]
    # Root only because the port is 0600 root:root; nothing else.
    assert "User" not in service and "DynamicUser" not in service
    assert service["CapabilityBoundingSet"] == [""] and service["AmbientCapabilities"] == [""]
    assert service["NoNewPrivileges"] == ["yes"]
    # The one device it may open: the virtio ports, write only.
    assert service["DevicePolicy"] == ["closed"]
    assert service["DeviceAllow"] == ["char-virtio-portsdev w"]
    assert service["ProtectSystem"] == ["strict"] and service["ProtectHome"] == ["yes"]
    # No IP: journald and the notify socket, and netlink to read the guest's addresses for
    # Incus's state line (the guest's own network namespace, so no PrivateNetwork=).
    assert "PrivateNetwork" not in service
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert service["IPAddressDeny"] == ["any"]
    assert service["ProtectProc"] == ["invisible"] and service["ProcSubset"] == ["pid"]
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


# -- the udev rule ------------------------------------------------------------------------------

RULE_TOKEN = re.compile(r'\s*([A-Z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,|$)')


def parse_rule(line: str) -> list[tuple[str, str, str]]:
    """One udev rule as (key, operator, value) tokens; fails on anything else in the line."""
    tokens: list[tuple[str, str, str]] = []
    position = 0
    while position < len(line):
        match = RULE_TOKEN.match(line, position)
        assert match, f"not a udev rule token at {line[position:]!r}"
        tokens.append((match.group(1), match.group(2), match.group(3)))
        position = match.end()
    return tokens


def test_udev_rule_starts_the_unit_for_both_port_names() -> None:
    rules = [line for line in RULE.read_text().splitlines() if line and not line.startswith("#")]
    assert len(rules) == 1
    tokens = parse_rule(rules[0])
    matches = [(key, value) for key, op, value in tokens if op in ("==", "!=")]
    assigns = [(key, op, value) for key, op, value in tokens if op not in ("==", "!=")]
    # Any virtio port named by one of LXD's names, on every event (add at coldplug or hotplug).
    assert matches[0] == ("SUBSYSTEM", "virtio-ports")
    assert [key for key, _ in matches] == ["SUBSYSTEM", "ATTR{name}"]
    assert tuple(matches[1][1].split("|")) == CANDIDATE_PORT_NAMES
    # systemd sees the device and wants the unit: exactly this unit, added to the list.
    assert assigns == [
        ("TAG", "+=", "systemd"),
        ("ENV{SYSTEMD_WANTS}", "+=", UNIT.name),
    ]
    # Nothing else: no MODE, OWNER or GROUP, so the node stays 0600 root:root.


def test_udev_rule_runs_after_the_port_is_named_and_before_systemds_rule() -> None:
    # 50-udev-default.rules links /dev/virtio-ports/NAME; 99-systemd.rules acts on the tag.
    number = int(RULE.name.split("-", 1)[0])
    assert 50 < number < 99
