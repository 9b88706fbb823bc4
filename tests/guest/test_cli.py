"""The lxd-agent command line: probe, status write, and what bad input gets."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lxd_agent import __version__
from lxd_agent.guest import commands
from lxd_agent.protocol import LEGACY_PORT_NAME, PORT_NAME, STARTED, STOPPED
from tests.guest.conftest import CLI, REPO, DeadPort, LivePort, PortTree, run_cli


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
        with subprocess.Popen(
            [*CLI, "run", option, value, *tree.cli_args()], cwd=REPO, stderr=subprocess.PIPE
        ) as proc:
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

    monkeypatch.setattr(commands, "survey", broken)
    # ExecCondition= skips on 1-254 and fails on 255.
    assert commands.main(["probe", *tree.cli_args()]) == 255
    assert "probe failed: RuntimeError: surprise" in capsys.readouterr().err


# Runs the CLI as `python -m lxd_agent.guest` does, but sends itself signal N (argv[1]) the
# moment the commands start loading argparse: a signal in the entry point's first milliseconds,
# at a known point instead of a lucky one.
SIGNAL_DURING_START = """
import os, runpy, sys

signo = int(sys.argv.pop(1))

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "argparse":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signo)
        return None

sys.meta_path.insert(0, SignalOnImport())
runpy.run_module("lxd_agent.guest", run_name="__main__", alter_sys=True)
"""


ALL_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def _start_with_signal(signo: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SIGNAL_DURING_START, str(int(signo)), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_while_run_starts_is_held_until_started_then_stopped(
    tree: PortTree, live_port: LivePort, signo: signal.Signals
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with _start_with_signal(signo, "run", "--refresh", "0", *tree.cli_args()) as proc:
        try:
            _, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert (proc.returncode, err) == (
        0,
        f"lxd-agent: reporting to {PORT_NAME} "
        f"({tree.dev_root / PORT_NAME})\nlxd-agent: reported {STOPPED}\n",
    )
    assert live_port.read_lines(timeout=2) == [STARTED, STOPPED]


def test_a_sighup_while_run_starts_is_a_look_again_not_a_death(
    tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    with _start_with_signal(signal.SIGHUP, "run", "--refresh", "0", *tree.cli_args()) as proc:
        try:
            live_port.wait_for(STARTED, timeout=10)
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGHUP: looking for the port again" in err
    assert live_port.wait_for(STOPPED, timeout=2)[-1] == STOPPED


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_while_a_one_shot_command_starts_ends_it_quietly(
    tree: PortTree, signo: signal.Signals
) -> None:
    with _start_with_signal(signo, "probe", *tree.cli_args()) as proc:
        try:
            out, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
    # The default action, once the command is known: no traceback, no half-printed table.
    assert (proc.returncode, out, err) == (-signo, "", "")


@pytest.mark.parametrize("signo", ALL_SIGNALS, ids=lambda s: s.name)
def test_signals_right_after_exec_never_give_a_traceback_or_a_started_without_stopped(
    tree: PortTree, live_port: LivePort, signo: signal.Signals
) -> None:
    tree.link(PORT_NAME, live_port.device)
    run_args = ["--refresh", "0", *tree.cli_args()]
    for delay in (0, 0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12):
        # -S: without site, whose start here (this venv's editable installs) is not the
        # guest's; the agent needs nothing from site-packages.
        with subprocess.Popen(
            [sys.executable, "-S", "-m", "lxd_agent.guest", "run", *run_args],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            lines: list[str] = []
            try:
                time.sleep(delay)
                proc.send_signal(signo)
                if signo == signal.SIGHUP:
                    # A look again if it came in time, else the default death; then stop it.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.5)
                    if proc.returncode is None:
                        lines += live_port.wait_for(STARTED, timeout=10)
                        proc.terminate()
                _, err = proc.communicate(timeout=15)
            finally:
                proc.kill()
        lines += live_port.read_lines(timeout=0.5)
        what = f"after {delay * 1000:g} ms: exit {proc.returncode}, wrote {lines}, stderr {err!r}"
        # Held from our first line on: then STARTED is followed by STOPPED and exit 0. Before
        # it, in the interpreter's own start (runpy here, site and the console script's
        # `import re` in a guest), a signal does what it does to any Python program, and
        # nothing is written; a traceback through our code would mean the mask came late.
        assert "lxd_agent" not in err, what
        if proc.returncode == 0:
            assert lines and lines[0] == STARTED and lines[-1] == STOPPED, what
        else:
            assert lines == [], what
