"""The unit and the udev rule in systemd/: systemd's own checks, and agreement with the agent."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_udev_rule_starts_the_unit_for_both_port_names() -> None:
    rules = [line for line in RULE.read_text().splitlines() if line and not line.startswith("#")]
    assert len(rules) == 1
    rule = rules[0]
    assert 'SUBSYSTEM=="virtio-ports"' in rule
    names = re.search(r'ATTR\{name\}=="([^"]+)"', rule)
    assert names and tuple(names.group(1).split("|")) == CANDIDATE_PORT_NAMES
    assert 'TAG+="systemd"' in rule
    assert f'ENV{{SYSTEMD_WANTS}}+="{UNIT.name}"' in rule
    # The node stays 0600 root:root: the rule must not loosen it.
    assert not re.search(r"\b(MODE|OWNER|GROUP)\b", rule)


def test_unit_is_skipped_where_no_port_can_be_used() -> None:
    unit = UNIT.read_text()
    # No virtio port at all: systemd skips the unit without running anything.
    assert "\nConditionPathExistsGlob=/sys/class/virtio-ports/vport*\n" in unit
    # Ports, but none usable (Incus's stub): the probe skips it (exit 1) instead of a 30 s wait.
    assert "\nExecCondition=/usr/bin/lxd-agent probe\n" in unit
