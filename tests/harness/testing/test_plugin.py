"""Tests for lxd_agent_harness.testing.plugin: pytest run on test files of a user's, in a
directory with nothing of this repository, with the plugin as the harness's entry point loads it.

The same plugin from the installed wheel, on examples/, is in tests/harness/test_installed.py.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lxd_agent_harness.qemu.process import process_exists
from lxd_agent_harness.testing.plugin import artifact_folder
from tests.helpers import RUN_TIMEOUT, pytest_in, run_pytest, user_env


def test_the_plugins_options_and_marks_are_in_pytests_help(tmp_path: Path) -> None:
    help_text = run_pytest(tmp_path, "--help").stdout
    for option in (
        "--lxd-image",
        "--lxd-deb",
        "--lxd-layout",
        "--lxd-firmware",
        "--lxd-release",
        "--lxd-arch",
        "--lxd-warm",
        "--lxd-keep-on-failure",
        "--lxd-artifacts",
        "--lxd-credential",
        "--lxd-nic",
        "--lxd-raw-qemu-conf",
        "--lxd-host",
        "--lxd-host-socket",
    ):
        assert option in help_text, option
    marks = run_pytest(tmp_path, "--markers").stdout
    for mark in (
        "@pytest.mark.lxd_layout(name)",
        "@pytest.mark.lxd_release(name)",
        "lxd_cold",
        "@pytest.mark.lxd_credential(name, value)",
    ):
        assert mark in marks, mark


def test_an_image_that_is_not_there_fails_the_test_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text("def test_x(lxd_vm):\n    pass\n")
    done = run_pytest(tmp_path, f"--lxd-image={tmp_path / 'missing.qcow2'}")
    assert done.returncode == 1
    assert "lxd-agent-harness: looked for the image" in done.stdout
    assert "Traceback" not in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lxd-host-socket=/x.sock"], "--lxd-host-socket needs --lxd-host"),
        (
            ["--lxd-host=lxd", "--lxd-warm", "--lxd-nic=open"],
            "--lxd-host cannot be given with --lxd-warm (the daemon boots every VM), --lxd-nic "
            "(the VM gets no NIC); drop it",
        ),
        (
            ["--lxd-host=lxd", "--lxd-credential=a=b"],
            "--lxd-credential on --lxd-host lxd (LXD has no systemd.credential keys)",
        ),
    ],
)
def test_what_a_daemon_cannot_honour_fails_the_test_in_one_line(
    args: list[str], message: str, tmp_path: Path, deb: Path
) -> None:
    (tmp_path / "test_x.py").write_text("def test_x(lxd_vm):\n    pass\n")
    done = run_pytest(tmp_path, *args, deb=deb)
    assert done.returncode == 1
    assert message in done.stdout
    assert "Traceback" not in done.stdout


USER_TESTS = """
import time

import pytest


def test_fails_with_the_guest_up(lxd_vm):
    lxd_vm.wait_for("STARTED", timeout=120)
    assert lxd_vm.run("echo $((6 * 7))").output == "41"


@pytest.mark.lxd_layout("lxd-5.19")
def test_marked_layout(lxd_vm):
    assert (lxd_vm.layout.name, lxd_vm.port) == ("lxd-5.19", "org.linuxcontainers.lxd")
    assert lxd_vm.wait_for("STARTED", timeout=120).port == "org.linuxcontainers.lxd"


@pytest.mark.lxd_cold
def test_cold_even_when_warm(lxd_vm):
    assert lxd_vm.start_info.how.value == "cold"
    lxd_vm.wait_for("STARTED", timeout=120)
    assert lxd_vm.power_off().stopped


@pytest.mark.parametrize("lxd_layout", ["lxd-5.20"])
def test_parametrized_layout(lxd_vm):
    assert lxd_vm.warm and lxd_vm.layout.name == "lxd-5.20"


@pytest.mark.lxd_layout("incus")
@pytest.mark.lxd_credential("lxd-agent.state", "on")
def test_incus_shows_the_guests_state(lxd_vm):
    lxd_vm.wait_for("STARTED", timeout=120)
    deadline = time.monotonic() + 30
    while "os_info" not in (lxd_vm.instance_state() or {}) and time.monotonic() < deadline:
        time.sleep(0.5)
    state = lxd_vm.instance_state()
    assert state["pid"] == 1
    assert state["os_info"]["hostname"] == lxd_vm.run("hostname").output
"""


@pytest.mark.vm
def test_a_users_tests_get_guests_by_mark_and_a_failure_leaves_its_files(
    tmp_path: Path, deb: Path
) -> None:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    artifacts = tmp_path / "kept"
    done = run_pytest(
        tmp_path,
        "--lxd-warm",
        f"--lxd-artifacts={artifacts}",
        f"--junit-xml={tmp_path / 'junit.xml'}",
        deb=deb,
    )
    assert f"rootdir: {tmp_path}" in done.stdout  # the user's directory, not this clone
    outcomes = {
        case.get("name"): "failed" if case.find("failure") is not None else "passed"
        for case in ET.parse(tmp_path / "junit.xml").iter("testcase")
    }
    assert outcomes == {
        "test_fails_with_the_guest_up": "failed",
        "test_marked_layout": "passed",
        "test_cold_even_when_warm": "passed",
        "test_parametrized_layout[lxd-5.20]": "passed",
        "test_incus_shows_the_guests_state": "passed",
    }, done.stdout
    folder = artifact_folder(artifacts, "test_user.py::test_fails_with_the_guest_up")
    assert sorted(p.name for p in folder.iterdir()) == [
        "agent-status.txt",
        "console.log",
        "qmp-events.txt",
        "start.txt",
        "timeline.txt",
    ]
    assert "STARTED" in (folder / "timeline.txt").read_text()
    assert "VSERPORT_CHANGE" in (folder / "qmp-events.txt").read_text()
    # The console from the restore on: the command's answer (the shell does not echo).
    assert "42" in (folder / "console.log").read_text(errors="replace").splitlines()
    assert "lxd-agent.service" in (folder / "agent-status.txt").read_text()
    assert (folder / "start.txt").read_text().startswith("warm: restored from ")
    # Only the failed test left files.
    assert [p.name for p in artifacts.iterdir()] == [folder.name]


@pytest.mark.vm
def test_keep_on_failure_holds_the_guest_until_enter(tmp_path: Path, deb: Path) -> None:
    (tmp_path / "test_fail.py").write_text(
        "def test_fail(lxd_vm):\n    lxd_vm.wait_for('STARTED', timeout=120)\n    assert False\n"
    )
    command = pytest_in(tmp_path, "--lxd-warm", "--lxd-keep-on-failure", deb=deb)
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=user_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdin is not None
        said = _read_until(proc.stderr, "press Enter", timeout=RUN_TIMEOUT)
        pid = int(said.split("QEMU pid:")[1].split()[0])
        assert "QMP:" in said and "console:" in said
        time.sleep(2)
        assert process_exists(pid), "the kept guest's QEMU is gone before Enter"
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 1
    assert not process_exists(pid)


def _read_until(stream: object, text: str, timeout: float) -> str:
    """What `stream` (a text pipe) said up to and including the line with `text`."""
    seen = ""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()  # type: ignore[attr-defined]
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} within {timeout} s; saw:\n{seen}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096).decode(errors="replace")
            assert chunk, f"stream closed before {text!r}; saw:\n{seen}"
            seen += chunk
    return seen
