"""Tests for lxd_agent_harness.cli.records: verdicts as JSON, and a matrix's JSON read back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lxd_agent.protocol import PORT_NAME
from lxd_agent_harness.base.errors import GuestStateMismatch
from lxd_agent_harness.cli import report
from lxd_agent_harness.cli.records import (
    SCHEMA,
    RecordedError,
    RecordError,
    check_json,
    matrix_from_json,
    matrix_json,
)
from lxd_agent_harness.image.agents import AGENTS, OURS
from lxd_agent_harness.image.lxd_image import ImageInput, ImageKind, ImageMetadata
from lxd_agent_harness.scenarios.check import CheckVerdict, HostReport, judge
from lxd_agent_harness.scenarios.matrix import MatrixVerdict, Shard
from lxd_agent_harness.vm.firmware import Firmware
from tests.harness.scenarios.test_check import reporting, silent
from tests.harness.scenarios.test_matrix import good_cell


def a_matrix() -> MatrixVerdict:
    failed = replace(
        good_cell("incus"),
        agent="lxd-5.0",
        started=None,
        stopped=None,
        power_off_held=True,
        job_running="stop job for LXD - agent",
        error=GuestStateMismatch(
            "the unit was not skipped", subject="lxd-agent.service", seen={"ActiveState": "failed"}
        ),
        timeline=["   0.100s  note   QEMU started"],
    )
    return MatrixVerdict(
        agents=[AGENTS[OURS], AGENTS["lxd-5.0"]],
        layouts=["lxd-5.20", "incus"],
        cells=[good_cell("lxd-5.20"), failed],
        shard=Shard(2, 3),
    )


def through_json(data: dict[str, Any]) -> Any:
    """What a file gives back: the text a reader parses."""
    return json.loads(json.dumps(data))


def test_a_matrix_survives_json_with_every_field_and_the_same_table() -> None:
    verdict = a_matrix()
    back = matrix_from_json(through_json(matrix_json(verdict)), "shard.json")
    assert back.shard == Shard(2, 3)
    assert [a.name for a in back.agents] == [OURS, "lxd-5.0"]
    assert back.layouts == verdict.layouts
    for before, after in zip(verdict.cells, back.cells):
        assert (after.agent, after.layout, after.started, after.stopped, after.unit) == (
            before.agent,
            before.layout,
            before.started,
            before.stopped,
            before.unit,
        )
        assert after.boot_held == before.boot_held
        assert after.off_after_power_off == pytest.approx(before.off_after_power_off)
    # The error comes back as data: its type, its line and its fields.
    error = back.cells[1].error
    assert isinstance(error, RecordedError)
    assert (error.type_name, str(error)) == ("GuestStateMismatch", "the unit was not skipped")
    assert error.fields["seen"] == {"ActiveState": "failed"}
    assert report.matrix_markdown(back) == report.matrix_markdown(verdict)


def test_the_matrix_json_names_the_schema_the_shard_and_what_ours_fell_short_of() -> None:
    data = matrix_json(a_matrix())
    assert (data["schema"], data["command"], data["shard"]) == (
        SCHEMA,
        "matrix",
        {"index": 2, "count": 3},
    )
    ours = data["cells"][0]
    assert ours["started"]["port"] == PORT_NAME and ours["problems"] == []
    assert ours["off_after_power_off"] == pytest.approx(1.2)
    assert data["passed"] is False  # the harness failed a cell


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.update(schema=SCHEMA + 1), f"schema {SCHEMA + 1}, this harness reads"),
        (lambda d: d.update(command="check"), "not a matrix record"),
        (lambda d: d.update(agents=["ours", "lxd-9.9"]), "agents ['lxd-9.9'] are unknown"),
        (lambda d: d["cells"][0].pop("bound"), "cells[0] has no 'bound'"),
        (lambda d: d["cells"][0].update(power_off_held="no"), "power_off_held is str, not true"),
        (lambda d: d["cells"][0].update(bound=True), "cells[0].bound is bool, not a number"),
        (lambda d: d["cells"][0]["started"].update(kind="?"), "'?' is no timeline entry kind"),
        (lambda d: d.pop("shard"), "the record has no 'shard'"),
    ],
)
def test_a_record_that_cannot_be_read_back_says_which_field_and_why(
    edit: Any, problem: str
) -> None:
    data = through_json(matrix_json(a_matrix()))
    edit(data)
    with pytest.raises(RecordError) as raised:
        matrix_from_json(data, "shard.json")
    assert raised.value.source == "shard.json"
    assert problem in raised.value.problem


def test_a_check_on_a_real_daemon_names_it_and_the_model_has_none() -> None:
    host = HostReport(
        kind="lxd",
        version="5.0.2",
        layout="lxd-5.19",
        adaptations=(("tcg", "TCG: KVM crashed the probe guest"),),
        log=('time="..." level=debug msg="Instance agent started" instance=vm',),
        smbios=("type=2,manufacturer=Canonical Ltd.,product=LXD",),
    )
    on_lxd = replace(reporting("lxd-5.19"), host=host)
    differs = replace(on_lxd, config_differences=['[chardev "x"] size: ...'])
    judge([on_lxd])
    data = through_json(check_json(CheckVerdict(Path("/a.qcow2"), Firmware.UEFI, checks=[on_lxd])))
    assert data["host"] == {
        "kind": "lxd",
        "version": "5.0.2",
        "layout": "lxd-5.19",
        "adaptations": [{"name": "tcg", "reason": "TCG: KVM crashed the probe guest"}],
        "log": ['time="..." level=debug msg="Instance agent started" instance=vm'],
        "qemu_conf": "",
        "smbios": ["type=2,manufacturer=Canonical Ltd.,product=LXD"],
    }
    assert data["layouts"][0]["host"] == data["host"]
    judge([differs])
    data = through_json(check_json(CheckVerdict(Path("/a.qcow2"), Firmware.UEFI, checks=[differs])))
    assert data["layouts"][0]["finding"] == "config-differs"
    assert data["layouts"][0]["config_differences"] == ['[chardev "x"] size: ...']
    model = [reporting("lxd-5.19")]
    judge(model)
    data = through_json(check_json(CheckVerdict(Path("/a.qcow2"), Firmware.UEFI, checks=model)))
    assert data["host"] is None and data["layouts"][0]["host"] is None


def test_a_check_record_has_a_finding_and_reason_per_layout() -> None:
    checks = [reporting("lxd-5.19"), silent("lxd-5.20", opened=["org.linuxcontainers.lxd"])]
    judge(checks)
    data = through_json(
        check_json(CheckVerdict(Path("/images/a.qcow2"), Firmware.BIOS, checks=checks))
    )
    assert (data["schema"], data["command"], data["firmware"], data["passed"]) == (
        SCHEMA,
        "check",
        "bios",
        False,
    )
    assert [(c["layout"], c["passed"], c["finding"]) for c in data["layouts"]] == [
        ("lxd-5.19", True, "reports"),
        ("lxd-5.20", False, "legacy-only"),
    ]
    assert data["layouts"][1]["opened_ports"] == ["org.linuxcontainers.lxd"]
    assert data["layouts"][1]["boot_job"] == ""
    assert data["layouts"][0]["stopped_after_power_off"] == pytest.approx(1.0)
    assert data["image_input"] is None  # check_image called on a disk directly


def test_a_check_record_says_what_shape_of_image_was_given() -> None:
    metadata = ImageMetadata("x86_64", 1700000000, {"os": "Debian", "release": "bookworm"})
    source = ImageInput(
        ImageKind.SPLIT, (Path("/i/lxd.tar.xz"), Path("/i/disk.qcow2")), Path("/i/disk.qcow2"),
        "qcow2", metadata,
    )  # fmt: skip
    checks = [reporting("lxd-5.20")]
    judge(checks)
    verdict = CheckVerdict(Path("/i"), Firmware.UEFI, checks=checks, source=source)
    data = through_json(check_json(verdict))
    assert data["image"] == "/i"
    assert data["image_input"] == {
        "kind": "split",
        "files": ["/i/lxd.tar.xz", "/i/disk.qcow2"],
        "disk_format": "qcow2",
        "metadata": {
            "architecture": "x86_64",
            "creation_date": 1700000000,
            "properties": {"os": "Debian", "release": "bookworm"},
        },
    }
