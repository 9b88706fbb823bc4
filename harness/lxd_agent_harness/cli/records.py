"""Verdicts as JSON for CI systems, and a matrix's JSON back into a verdict (to merge shards).

The JSON is a public interface (README, "JSON fields"): `schema` is bumped when a field changes
meaning or goes away; fields may be added. Times are seconds since that boot's QEMU start.
A timeline entry is `{"seconds", "kind", "text", "port", "trigger"}`; an error is
`{"type", "message", "fields"}` with the error's own fields (QEMU's output, the console tail...).

Host side only; pure functions from verdicts to dicts and back, no files (`cli.main` writes them).
"""

from __future__ import annotations

from typing import Any, Mapping

from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.image.agents import AGENTS, OURS
from lxd_agent_harness.image.lxd_image import ImageInput
from lxd_agent_harness.lxd.layouts import get_layout, lxd_ring_port
from lxd_agent_harness.lxd.monitor import EntryKind, TimelineEntry
from lxd_agent_harness.scenarios.check import CheckVerdict, HostReport, LayoutCheck
from lxd_agent_harness.scenarios.matrix import Cell, MatrixVerdict, Shard, ours_problems
from lxd_agent_harness.scenarios.rename_replay import ReplayVerdict
from lxd_agent_harness.vm.units import UnitFacts

SCHEMA = 1
"""The JSON's schema version; readers check it."""


class RecordError(HarnessError):
    """A JSON record that cannot be read back (another schema, a field missing or of the wrong
    type): `source` names the file, `problem` what was wrong."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(
            f"{source}: {problem}; give the JSON that `lxd-agent-harness matrix --json` wrote "
            "(with this version of the harness)"
        )
        self.source = source
        self.problem = problem


class RecordedError(HarnessError):
    """An error read back from JSON: its type's name and its fields, as the run recorded them."""

    def __init__(self, message: str, *, type_name: str, fields: Mapping[str, object]) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.fields = dict(fields)


# -- pieces ---------------------------------------------------------------------------------------


def entry_json(entry: TimelineEntry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {
        "seconds": round(entry.seconds, 3),
        "kind": entry.kind.value,
        "text": entry.text,
        "port": entry.port,
        "trigger": entry.trigger,
    }


def error_json(error: HarnessError | None) -> dict[str, Any] | None:
    """The error's class name, its one line, and its data fields (those JSON can carry)."""
    if error is None:
        return None
    if isinstance(error, RecordedError):
        return {"type": error.type_name, "message": str(error), "fields": error.fields}
    fields = {
        name: value
        for name, value in vars(error).items()
        if not name.startswith("_") and _is_plain(value)
    }
    return {"type": type(error).__name__, "message": str(error), "fields": fields}


def _is_plain(value: object) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


# -- check ----------------------------------------------------------------------------------------


def layout_check_json(check: LayoutCheck) -> dict[str, Any]:
    return {
        "layout": check.layout,
        "passed": check.passed,
        "finding": check.finding.value,
        "reason": check.reason,
        "status_port": check.status_port,
        "must_report": check.must_report,
        "started": entry_json(check.started),
        "stopped": entry_json(check.stopped),
        "stopped_after_power_off": _round(check.stopped_after_power_off),
        "off_after_power_off": _round(check.off_after_power_off),
        "power_off_held": check.power_off_held,
        "job_running": check.job_running,
        "boot_job": check.boot_job,
        "bound": check.bound,
        "opened_ports": list(check.opened_ports),
        "kernel_up": _round(check.kernel_up),
        "login_prompt": _round(check.login_prompt),
        "powered_down": _round(check.powered_down),
        "guest_off": _round(check.guest_off),
        "error": error_json(check.error),
        "timeline": list(check.timeline),
        "host": host_json(check.host),
        "config_differences": list(check.config_differences),
        "stopped_unchecked": check.stopped_unchecked,
        "agent_unstartable": check.agent_unstartable,
        "agent_unit": check.agent_unit,
        "agent_journal": list(check.agent_journal),
    }


def host_json(host: HostReport | None) -> dict[str, Any] | None:
    """The real daemon a layout ran on; None for the harness's QEMU model."""
    if host is None:
        return None
    return {
        "kind": host.kind,
        "version": host.version,
        "layout": host.layout,
        "adaptations": [{"name": name, "reason": reason} for name, reason in host.adaptations],
        "log": list(host.log),
        "qemu_conf": host.qemu_conf,
        "smbios": list(host.smbios),
    }


def image_input_json(image: ImageInput | None) -> dict[str, Any] | None:
    """What `check --image` was given: its shape (disk, split, unified), the files read, the
    disk's format and what metadata.yaml said (null for a bare disk)."""
    if image is None:
        return None
    metadata = image.metadata
    return {
        "kind": image.kind.value,
        "files": [str(path) for path in image.paths],
        "disk_format": image.disk_format,
        "metadata": None
        if metadata is None
        else {
            "architecture": metadata.architecture,
            "creation_date": metadata.creation_date,
            "properties": dict(metadata.properties),
        },
    }


def check_json(verdict: CheckVerdict) -> dict[str, Any]:
    hosts = [check.host for check in verdict.checks]
    return {
        "schema": SCHEMA,
        "command": "check",
        "image": str(verdict.image),
        "image_input": image_input_json(verdict.source),
        "firmware": verdict.firmware.value,
        "secure_boot": verdict.secure_boot,
        "passed": verdict.passed,
        # The one daemon every layout ran on; null for the QEMU model (or several daemons:
        # each layout's own `host` says which).
        "host": host_json(hosts[0]) if len(hosts) == 1 else None,
        "layouts": [layout_check_json(check) for check in verdict.checks],
    }


def replay_json(verdict: ReplayVerdict) -> dict[str, Any]:
    """`rename-replay`: each step's verdict, what was seen and the daemon's own lines, and the
    rename build's record (its version, seconds and Go tests)."""
    return {
        "schema": SCHEMA,
        "command": "rename-replay",
        "passed": verdict.passed,
        "build": dict(verdict.build),
        "steps": [
            {
                "name": step.name,
                "verdict": step.verdict,
                "seen": list(step.seen),
                "daemon_lines": list(step.daemon_lines),
            }
            for step in verdict.steps
        ],
        "error": error_json(verdict.error),
    }


# -- the matrix -----------------------------------------------------------------------------------


def _unit_json(unit: UnitFacts | None) -> dict[str, Any] | None:
    if unit is None:
        return None
    return {
        "active": unit.active,
        "sub": unit.sub,
        "result": unit.result,
        "restarts": unit.restarts,
        "condition_met": unit.condition_met,
        "status_text": unit.status_text,
        "before": list(unit.before),
        "start_began_us": unit.start_began_us,
        "active_at_us": unit.active_at_us,
        "summary": unit.summary(),
    }


def cell_json(cell: Cell) -> dict[str, Any]:
    """Every field of the cell, and what the table and the verdict derive from them."""
    ours = cell.agent == OURS
    return {
        "agent": cell.agent,
        "layout": cell.layout,
        "bound": cell.bound,
        "started": entry_json(cell.started),
        "stopped": entry_json(cell.stopped),
        "system_state": cell.system_state,
        "unit": _unit_json(cell.unit),
        "target_reached_us": cell.target_reached_us,
        "kernel_up": _round(cell.kernel_up),
        "powered_down": _round(cell.powered_down),
        "guest_off": _round(cell.guest_off),
        "power_off_held": cell.power_off_held,
        "job_running": cell.job_running,
        "error": error_json(cell.error),
        "entries": [entry_json(entry) for entry in cell.entries],
        "timeline": list(cell.timeline),
        # Derived, for readers; ignored when read back.
        "boot_held": _round(cell.boot_held),
        "boot_held_past_bound": cell.boot_held_past_bound,
        "stopped_after_power_off": _round(cell.stopped_after_power_off),
        "off_after_power_off": _round(cell.off_after_power_off),
        "problems": ours_problems(cell, lxd_ring_port(get_layout(cell.layout))) if ours else [],
    }


def matrix_json(verdict: MatrixVerdict) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "command": "matrix",
        "agents": [agent.name for agent in verdict.agents],
        "layouts": list(verdict.layouts),
        "shard": {"index": verdict.shard.index, "count": verdict.shard.count},
        "passed": verdict.passed,
        "cells": [cell_json(cell) for cell in verdict.cells],
    }


class _Reader:
    """Typed access to one JSON record, every problem a `RecordError` naming the file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, problem: str) -> RecordError:
        return RecordError(self.source, problem)

    def get(self, data: object, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(data, dict):
            raise self.fail(f"{where} is not a JSON object")
        if key not in data:
            raise self.fail(f"{where} has no {key!r}")
        value = data[key]
        # bool is an int: a number field must not take true/false.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
            raise self.fail(f"{where}.{key} is {type(value).__name__}, not {_names(kind)}")
        return value

    def optional(
        self, data: object, key: str, kind: type | tuple[type, ...], where: str
    ) -> Any | None:
        if isinstance(data, dict) and data.get(key) is None:
            return None
        return self.get(data, key, kind, where)

    def entry(self, data: object, where: str) -> TimelineEntry | None:
        if data is None:
            return None
        kind = self.get(data, "kind", str, where)
        try:
            entry_kind = EntryKind(kind)
        except ValueError:
            raise self.fail(f"{where}.kind {kind!r} is no timeline entry kind") from None
        return TimelineEntry(
            float(self.get(data, "seconds", (int, float), where)),
            entry_kind,
            self.get(data, "text", str, where),
            self.optional(data, "port", str, where),
            self.optional(data, "trigger", str, where),
        )

    def unit(self, data: object, where: str) -> UnitFacts | None:
        if data is None:
            return None
        return UnitFacts(
            active=self.get(data, "active", str, where),
            sub=self.get(data, "sub", str, where),
            result=self.get(data, "result", str, where),
            restarts=self.get(data, "restarts", int, where),
            condition_met=self.get(data, "condition_met", bool, where),
            status_text=self.get(data, "status_text", str, where),
            before=tuple(str(x) for x in self.get(data, "before", list, where)),
            start_began_us=self.get(data, "start_began_us", int, where),
            active_at_us=self.get(data, "active_at_us", int, where),
        )

    def error(self, data: object, where: str) -> HarnessError | None:
        if data is None:
            return None
        return RecordedError(
            self.get(data, "message", str, where),
            type_name=self.get(data, "type", str, where),
            fields=self.get(data, "fields", dict, where),
        )

    def seconds(self, data: object, key: str, where: str) -> float | None:
        value = self.optional(data, key, (int, float), where)
        return None if value is None else float(value)

    def cell(self, data: object, where: str) -> Cell:
        cell = Cell(
            agent=self.get(data, "agent", str, where),
            layout=self.get(data, "layout", str, where),
            bound=float(self.get(data, "bound", (int, float), where)),
        )
        cell.started = self.entry(self.optional(data, "started", dict, where), f"{where}.started")
        cell.stopped = self.entry(self.optional(data, "stopped", dict, where), f"{where}.stopped")
        cell.system_state = self.get(data, "system_state", str, where)
        cell.unit = self.unit(self.optional(data, "unit", dict, where), f"{where}.unit")
        cell.target_reached_us = self.get(data, "target_reached_us", int, where)
        cell.kernel_up = self.seconds(data, "kernel_up", where)
        cell.powered_down = self.seconds(data, "powered_down", where)
        cell.guest_off = self.seconds(data, "guest_off", where)
        cell.power_off_held = self.get(data, "power_off_held", bool, where)
        cell.job_running = self.get(data, "job_running", str, where)
        cell.error = self.error(self.optional(data, "error", dict, where), f"{where}.error")
        entries = self.get(data, "entries", list, where)
        cell.entries = [
            e
            for i, item in enumerate(entries)
            if (e := self.entry(item, f"{where}.entries[{i}]")) is not None
        ]
        cell.timeline = [str(line) for line in self.get(data, "timeline", list, where)]
        return cell


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "text", bool: "true or false"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _kinds(kind)))


def matrix_from_json(data: object, source: str) -> MatrixVerdict:
    """A matrix verdict (a whole run's or one shard's) from `matrix_json`'s output."""
    read = _Reader(source)
    schema = read.get(data, "schema", int, "the record")
    if schema != SCHEMA:
        raise read.fail(f"schema {schema}, this harness reads schema {SCHEMA}")
    if read.get(data, "command", str, "the record") != "matrix":
        raise read.fail("not a matrix record (its command is not 'matrix')")
    agent_names = read.get(data, "agents", list, "the record")
    unknown = [name for name in agent_names if name not in AGENTS]
    if unknown:
        raise read.fail(f"agents {unknown} are unknown to this harness ({', '.join(AGENTS)})")
    layouts = [str(name) for name in read.get(data, "layouts", list, "the record")]
    shard = read.get(data, "shard", dict, "the record")
    verdict = MatrixVerdict(
        agents=[AGENTS[name] for name in agent_names],
        layouts=layouts,
        shard=Shard(
            read.get(shard, "index", int, "the record's shard"),
            read.get(shard, "count", int, "the record's shard"),
        ),
    )
    cells = read.get(data, "cells", list, "the record")
    verdict.cells = [read.cell(item, f"cells[{i}]") for i, item in enumerate(cells)]
    return verdict
