"""Tests for lxd_agent_harness.cli.junit: verdicts as the JUnit XML that CI systems read."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from lxd_agent_harness.base.errors import VmError
from lxd_agent_harness.cli.junit import check_junit, matrix_junit
from lxd_agent_harness.image.agents import AGENTS, OURS
from lxd_agent_harness.scenarios.check import CheckVerdict, judge
from lxd_agent_harness.scenarios.matrix import MatrixVerdict
from lxd_agent_harness.vm.firmware import Firmware
from tests.harness.scenarios.test_check import reporting, silent
from tests.harness.scenarios.test_matrix import good_cell


def cases(xml: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    return {f"{case.get('classname')}::{case.get('name')}": case for case in root.iter("testcase")}


def test_check_gives_one_case_per_layout_failing_with_the_reason() -> None:
    checks = [reporting("lxd-5.19"), silent("lxd-5.20", opened=["org.linuxcontainers.lxd"])]
    judge(checks)
    xml = check_junit(CheckVerdict(Path("/i/img.qcow2"), Firmware.UEFI, checks=checks))
    suite = ET.fromstring(xml).find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("2", "1")
    found = cases(xml)
    ok = found["lxd-agent-harness.check.img.qcow2::lxd-5.19"]
    assert ok.find("failure") is None
    failure = found["lxd-agent-harness.check.img.qcow2::lxd-5.20"].find("failure")
    assert failure is not None
    assert (failure.get("message") or "").startswith("reports only on the legacy port")


def test_matrix_fails_only_cells_of_ours_and_errors_cells_the_harness_could_not_run() -> None:
    regressed = replace(good_cell("lxd-5.20"), stopped=None)
    emulation = replace(good_cell("lxd-5.19"), agent="lxd-5.0", started=None, stopped=None)
    broken = replace(good_cell("incus"), agent="lxd-5.0", error=VmError("QEMU died"))
    verdict = MatrixVerdict(
        agents=[AGENTS[OURS], AGENTS["lxd-5.0"]],
        layouts=["lxd-5.19", "lxd-5.20", "incus"],
        cells=[good_cell("lxd-5.19"), regressed, emulation, broken],
    )
    found = cases(matrix_junit(verdict))
    assert found["lxd-agent-harness.matrix.ours::lxd-5.19"].find("failure") is None
    failure = found["lxd-agent-harness.matrix.ours::lxd-5.20"].find("failure")
    assert failure is not None and failure.get("message") == (
        "STOPPED not seen after the power button"
    )
    # An emulation's silence is what it does, not a failure of this project.
    assert found["lxd-agent-harness.matrix.lxd-5.0::lxd-5.19"].find("failure") is None
    error = found["lxd-agent-harness.matrix.lxd-5.0::incus"].find("error")
    assert error is not None and error.get("message") == "QEMU died"
