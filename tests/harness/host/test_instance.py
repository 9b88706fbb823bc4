"""Tests for lxd_agent_harness.host.instance without a daemon: the agent flag read from the
daemon's answer to `exec`, and the daemon's log lines about one VM. The whole VM's life on a
real daemon is tested in tests/harness/scenarios/test_host_check.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lxd_agent_harness.host.daemon import DaemonInfo
from lxd_agent_harness.host.instance import AGENT_OFFLINE, AgentFlag, HostVm
from lxd_agent_harness.host.rest import Daemon
from tests.harness.host.fake_daemon import Handler

EXEC = ("POST", "/1.0/instances/vm/exec")
WAIT = ("GET", "/1.0/operations/op1/wait?timeout=30")


def answering(err: str, monkeypatch: pytest.MonkeyPatch) -> None:
    answers: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {
        EXEC: (202, {"type": "async", "operation": "/1.0/operations/op1", "metadata": {}}),
        WAIT: (200, {"type": "sync", "metadata": {"status": "Failure", "err": err}}),
    }
    monkeypatch.setattr(Handler, "answers", answers)


def a_vm(client: Daemon, log: Path | None = None) -> HostVm:
    info = DaemonInfo(kind="lxd", version="5.0.2", qemu_version="7.2.22", log=log)
    vm = HostVm(client, info, Path("/disk.qcow2"), "qcow2", {}, print)
    vm.name = "vm"
    return vm


@pytest.mark.parametrize(
    ("err", "flag"),
    [
        (AGENT_OFFLINE["lxd"], AgentFlag.DOWN),  # its monitor has not read STARTED
        ("Failed to connect to lxd-agent", AgentFlag.UP),  # it read STARTED and tried vsock
    ],
)
def test_the_agent_flag_is_the_daemons_answer_to_exec(
    err: str, flag: AgentFlag, fake_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    answering(err, monkeypatch)
    assert asyncio.run(a_vm(fake_daemon).agent_flag()) is flag


def test_the_log_lines_are_this_vms_agent_and_state_lines(tmp_path: Path) -> None:
    log = tmp_path / "lxd.log"
    log.write_text(
        'time="t1" level=debug msg="Instance agent started" instance=vm project=default\n'
        'time="t2" level=debug msg="Instance agent started" instance=vm2 project=default\n'
        'time="t3" level=info msg="Starting instance" instance=vm project=default\n'
        'time="t4" level=debug msg="Handling API request" instance=vm\n'
        + 'time="t5" level=debug msg="WriteJSON '
        + "x" * 3000
        + '" instance=vm agent\n'
    )
    assert a_vm(Daemon(tmp_path / "s", "lxd"), log).log_lines() == [
        'time="t1" level=debug msg="Instance agent started" instance=vm project=default',
        'time="t3" level=info msg="Starting instance" instance=vm project=default',
    ]
