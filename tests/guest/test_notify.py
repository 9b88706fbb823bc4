"""Tests for lxd_agent.guest.notify: sd_notify through systemd-python or sdnotify, the watchdog,
and where the agent's log goes outside systemd."""

from __future__ import annotations

from pathlib import Path

from lxd_agent.protocol import PORT_NAME, STARTED
from tests.guest.conftest import LivePort, PortTree
from tests.guest.test_agent import agent, notify_socket, stop


def test_watchdog_is_pinged_when_the_unit_sets_watchdogsec(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    tree.link(PORT_NAME, live_port.device)
    env = {"WATCHDOG_USEC": "400000"}
    with notify_socket(tmp_path) as notify, agent(tree, "--refresh", "0", notify=notify, env=env):
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout=5)
        notify.wait_for("WATCHDOG=1", timeout=5)


def test_sdnotify_is_the_fallback_without_systemd_python(
    tmp_path: Path, tree: PortTree, live_port: LivePort
) -> None:
    hidden = tmp_path / "hide"
    (hidden / "systemd").mkdir(parents=True)
    (hidden / "systemd" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    tree.link(PORT_NAME, live_port.device)
    env = {"PYTHONPATH": str(hidden)}
    with notify_socket(tmp_path) as notify, agent(tree, notify=notify, env=env) as proc:
        notify.wait_for("READY=1")
        code, _ = stop(proc)
    assert code == 0


def test_outside_systemd_it_runs_and_logs_to_stderr(tree: PortTree, live_port: LivePort) -> None:
    tree.link(PORT_NAME, live_port.device)
    with agent(tree) as proc:
        live_port.wait_for(STARTED, timeout=10)
        code, err = stop(proc)
    assert code == 0
    assert f"lxd-agent: reporting to {PORT_NAME} ({tree.dev_root / PORT_NAME})" in err
