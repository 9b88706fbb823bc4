"""Tests for lxd_agent.guest.commands: the lxd-agent command line (probe, status write, what
bad input gets), run as a process."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from lxd_agent import __version__
from lxd_agent.guest import commands
from lxd_agent.protocol import INCUS_PORT_NAME, LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from tests.guest.conftest import (
    CLI,
    DeadPort,
    LivePort,
    PortTree,
    run_cli,
    start,
)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "missing COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "--refresh", "soon"], "--refresh: expected 0 (write it once) or 0.1 to 86400"),
        (["run", "--refresh", "-1"], "got '-1'"),
        (["run", "--wait", "nan"], "--wait: expected 0 (look once) or 0.1 to 86400 seconds"),
        (["run", "--log-level", "loud"], "invalid choice: 'loud'"),
        (["run", "--dev-root", "/nonexistent/x"], "'/nonexistent/x' does not exist"),
        (["probe", "--sys-root", "/etc/hostname"], "'/etc/hostname' is not a directory"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["status"], "missing ACTION"),
        (["status", "write", "RUNNING"], "invalid choice: 'RUNNING'"),
        (["status", "write", STOPPED, "--timeout", "inf"], "got 'inf'"),
    ],
)
def test_bad_input_gets_one_line_and_exit_status_2(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lxd-agent: error: "), result.stderr
    assert expected in lines[0]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--refresh", "1e-9"),
        ("--refresh", "0.09"),
        ("--refresh", "86401"),
        ("--refresh", "9.3e9"),
        ("--refresh", "1e10"),
        ("--refresh", "1e308"),
        ("--refresh", "inf"),
        ("--refresh", "nan"),
        ("--wait", "1e-9"),
        ("--wait", "1e10"),
        ("--wait", "86401"),
    ],
)
def test_run_durations_out_of_range_are_refused_before_anything_runs(
    tree: PortTree, live_port: LivePort, option: str, value: str
) -> None:
    # A live port: a value that slipped through would write STARTED here.
    tree.link(PORT_NAME, live_port.device)
    result = run_cli("run", option, value, *tree.cli_args(), timeout=10)
    assert (result.returncode, result.stdout) == (2, "")
    zero_means = "write it once" if option == "--refresh" else "look once"
    assert result.stderr.splitlines() == [
        f"lxd-agent: error: argument {option}: expected 0 ({zero_means}) "
        f"or 0.1 to 86400 seconds, got '{value}' (see 'lxd-agent run --help')"
    ]
    assert live_port.read_lines(timeout=0) == []


@pytest.mark.parametrize("value", ["0", "1e-9", "2147484", "1e308", "inf", "nan"])
def test_status_write_timeout_out_of_range_is_refused(
    tree: PortTree, live_port: LivePort, value: str
) -> None:
    tree.link(PORT_NAME, live_port.device)
    result = run_cli("status", "write", STOPPED, "--timeout", value, *tree.cli_args())
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"lxd-agent: error: argument --timeout: expected 0.1 to 86400 seconds, got '{value}' "
        "(see 'lxd-agent status write --help')"
    ]
    assert live_port.read_lines(timeout=0) == []


@pytest.mark.parametrize("option", ["--refresh", "--wait"])
def test_run_durations_at_the_bounds_are_accepted(
    tree: PortTree, live_port: LivePort, option: str
) -> None:
    tree.link(PORT_NAME, live_port.device)
    for value in ("0.1", "86400"):
        with start([*CLI, "run", option, value, *tree.cli_args()], stderr=subprocess.PIPE) as proc:
            try:
                live_port.wait_for(STARTED, timeout=10)
            finally:
                proc.terminate()
            assert proc.wait(timeout=10) == 0
        assert STOPPED in live_port.wait_for(STOPPED, timeout=5)


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"lxd-agent {__version__}"
    for args in (["--help"], ["run", "--help"], ["probe", "--help"], ["status", "write", "-h"]):
        result = run_cli(*args)
        assert result.returncode == 0 and "usage: lxd-agent" in result.stdout


def test_probe_shows_each_candidate_and_the_choice(
    tree: PortTree, dead_port: DeadPort, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, dead_port.device)
    tree.link(LEGACY_PORT_NAME, live_port.device)
    result = run_cli("probe", *tree.cli_args())
    assert result.returncode == 0, result.stderr
    new, legacy, incus, verdict = result.stdout.splitlines()
    assert new.startswith(PORT_NAME) and "char-device=yes  host-connected=no" in new
    assert legacy.startswith(LEGACY_PORT_NAME) and "host-connected=yes  usable" in legacy
    assert incus.startswith(INCUS_PORT_NAME) and "no such port" in incus
    assert (
        verdict
        == f"would use: {LEGACY_PORT_NAME} ({tree.dev_root / LEGACY_PORT_NAME}, legacy fallback)"
    )


def test_probe_exits_1_when_nothing_is_usable(tree: PortTree, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    tree.link(PORT_NAME, tmp_path / "plain")
    result = run_cli("probe", *tree.cli_args())
    assert result.returncode == 1
    assert "is a regular file, not a character device" in result.stdout
    assert result.stdout.splitlines()[-1] == "would use: none (no usable port)"


def test_status_write_writes_one_line(tree: PortTree, live_port: LivePort) -> None:
    tree.link(PORT_NAME, live_port.device)
    result = run_cli("status", "write", STOPPED, *tree.cli_args())
    assert result.returncode == 0, result.stderr
    assert live_port.read_lines(timeout=2) == [STOPPED]


def test_status_write_without_a_port_gives_up_quickly(tree: PortTree) -> None:
    began = time.monotonic()
    result = run_cli("status", "write", STOPPED, *tree.cli_args())
    elapsed = time.monotonic() - began
    assert result.returncode == 1
    assert f"no usable port for {STOPPED}: {PORT_NAME}: no such port" in result.stderr
    # A stop hook must never hold up a shutdown (the budget is 2 s; interpreter start aside).
    assert elapsed < 10


def test_stop_hook_after_an_execcondition_skip_writes_nothing(
    tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    result = run_cli(
        "status",
        "write",
        STOPPED,
        *tree.cli_args(),
        env={**os.environ, "SERVICE_RESULT": "exec-condition"},
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert live_port.read_lines(timeout=0.5) == []


def test_a_broken_probe_fails_the_unit_instead_of_skipping_it(
    tree: PortTree, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(**_: object) -> list[object]:
        raise RuntimeError("surprise")

    monkeypatch.setattr(commands, "survey", broken)
    # ExecCondition= skips on 1-254 and fails on 255.
    assert commands.main(["probe", *tree.cli_args()]) == 255
    assert "probe failed: RuntimeError: surprise" in capsys.readouterr().err


def test_state_prints_the_line_the_agent_would_write_and_the_switch(tmp_path: Path) -> None:
    result = run_cli("state", env={**os.environ, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["pid"] == 1 and state["os_info"]["kernel_version"] == os.uname().release
    assert result.stderr.startswith("state line: off (no lxd-agent.state credential")
    (tmp_path / "lxd-agent.state").write_text("on\n")
    result = run_cli("state", env={**os.environ, "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert result.stderr.startswith("state line: on (the unit's credential")
