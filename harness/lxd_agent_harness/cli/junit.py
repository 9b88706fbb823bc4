"""Verdicts as JUnit XML, the report format CI systems (GitLab, Jenkins, GitHub's test reporters)
read: one test case per layout of a `check`, one per cell of a `matrix`.

A case fails (`<failure>`) where the verdict does: a layout whose finding does not pass, a cell
of our agent that fell short. A cell or layout the harness could not run is an `<error>`. Each
case's `<system-out>` holds its timeline. The matrix's cells of other agents record what those
agents do and pass unless the harness failed: they are data, not requirements.

Host side only; pure functions from a verdict to the document's text.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Sequence

from lxd_agent_harness.image.agents import OURS
from lxd_agent_harness.lxd.layouts import get_layout, lxd_ring_port
from lxd_agent_harness.scenarios.check import CheckVerdict, Finding
from lxd_agent_harness.scenarios.matrix import MatrixVerdict, ours_problems


@dataclass(frozen=True)
class Case:
    classname: str
    name: str
    seconds: float
    failure: str | None = None
    """Why the case failed; None: it passed (or errored)."""
    error: str | None = None
    """Why the harness could not run the case."""
    output: Sequence[str] = field(default_factory=list)


def document(suite: str, cases: Sequence[Case]) -> str:
    """One `<testsuites>` with one `<testsuite>` of `cases`."""
    root = ET.Element("testsuites")
    element = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(cases)),
        failures=str(sum(case.failure is not None for case in cases)),
        errors=str(sum(case.error is not None for case in cases)),
        time=f"{sum(case.seconds for case in cases):.3f}",
    )
    for case in cases:
        node = ET.SubElement(
            element,
            "testcase",
            classname=case.classname,
            name=case.name,
            time=f"{case.seconds:.3f}",
        )
        if case.error is not None:
            ET.SubElement(node, "error", message=case.error).text = case.error
        elif case.failure is not None:
            ET.SubElement(node, "failure", message=case.failure).text = case.failure
        if case.output:
            ET.SubElement(node, "system-out").text = "\n".join(case.output) + "\n"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def check_junit(verdict: CheckVerdict) -> str:
    cases = []
    for check in verdict.checks:
        error = check.reason if check.finding is Finding.NOT_CHECKED else None
        failure = check.reason if not check.passed and error is None else None
        cases.append(
            Case(
                classname=f"lxd-agent-harness.check.{verdict.image.name}",
                name=check.layout,
                seconds=check.guest_off or check.powered_down or 0.0,
                failure=failure,
                error=error,
                output=[f"{check.finding.value}: {check.reason}", *check.timeline],
            )
        )
    return document("lxd-agent-harness check", cases)


def matrix_junit(verdict: MatrixVerdict) -> str:
    cases = []
    for cell in verdict.cells:
        error = str(cell.error) if cell.error is not None else None
        failure = None
        if cell.agent == OURS and error is None:
            problems = ours_problems(cell, lxd_ring_port(get_layout(cell.layout)))
            failure = "; ".join(problems) if problems else None
        cases.append(
            Case(
                classname=f"lxd-agent-harness.matrix.{cell.agent}",
                name=cell.layout,
                seconds=cell.guest_off or cell.powered_down or 0.0,
                failure=failure,
                error=error,
                output=cell.timeline,
            )
        )
    return document("lxd-agent-harness matrix", cases)
