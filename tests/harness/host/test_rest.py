"""Tests for lxd_agent_harness.host.rest: the daemon's envelope, its errors as fields, and an
operation waited for, against a small server of LXD's API shape on a unix socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.host.rest import Daemon
from tests.harness.host.fake_daemon import Handler


def test_a_sync_answer_gives_its_metadata(fake_daemon: Daemon) -> None:
    assert fake_daemon.request("GET", "/1.0") == {"environment": {"server": "lxd"}}


def test_an_async_answer_is_waited_for_and_its_failure_is_a_field(fake_daemon: Daemon) -> None:
    with pytest.raises(DaemonError) as raised:
        fake_daemon.request("POST", "/1.0/instances/vm/exec", {"command": ["true"]})
    assert raised.value.error == "LXD VM agent isn't currently running"
    assert raised.value.request == "POST /1.0/instances/vm/exec"
    assert raised.value.daemon == "lxd"
    sent = [body for method, path, body in Handler.seen if path.endswith("/exec")]
    assert json.loads(sent[-1]) == {"command": ["true"]}


def test_an_operation_whose_wait_is_refused_fails_as_the_request_that_made_it(
    fake_daemon: Daemon,
) -> None:
    with pytest.raises(DaemonError) as raised:
        fake_daemon.request("POST", "/1.0/instances", {"name": "vm"})
    assert (raised.value.request, raised.value.status_code) == ("POST /1.0/instances", 500)
    assert raised.value.error == "Unknown configuration key: x"


def test_a_refusal_carries_the_status_and_the_daemons_error(fake_daemon: Daemon) -> None:
    with pytest.raises(DaemonError) as raised:
        fake_daemon.request("DELETE", "/1.0/images/none")
    assert (raised.value.status_code, raised.value.error) == (404, "Image not found")


def test_no_daemon_on_the_socket_says_so(short_tmp_path: Path) -> None:
    with pytest.raises(DaemonError) as raised:
        Daemon(short_tmp_path / "none.socket", "incus").request("GET", "/1.0")
    assert raised.value.status_code is None
    assert "is the daemon up?" in str(raised.value)
