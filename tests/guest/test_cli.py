"""The lxd-agent command line: probe, status write, and what bad input gets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lxd_agent import __version__
from lxd_agent.guest import cli
from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STOPPED
from tests.guest.conftest import DeadPort, LivePort, PortTree, run_cli


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "missing COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["run", "--refresh", "soon"], "--refresh: expected a number of seconds >= 0, got 'soon'"),
        (["run", "--refresh", "-1"], "got '-1'"),
        (["run", "--wait", "nan"], "--wait: expected a number of seconds >= 0, got 'nan'"),
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
    new, legacy, verdict = result.stdout.splitlines()
    assert new.startswith(PORT_NAME) and "char-device=yes  host-connected=no" in new
    assert legacy.startswith(LEGACY_PORT_NAME) and "host-connected=yes  usable" in legacy
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

    monkeypatch.setattr(cli, "survey", broken)
    # ExecCondition= skips on 1-254 and fails on 255.
    assert cli.main(["probe", *tree.cli_args()]) == 255
    assert "probe failed: RuntimeError: surprise" in capsys.readouterr().err
