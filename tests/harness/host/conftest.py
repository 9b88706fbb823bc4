"""Fixtures of the host layer's tests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from lxd_agent_harness.host.rest import Daemon
from tests.harness.host.fake_daemon import Handler, UnixHTTPServer


@pytest.fixture
def fake_daemon(short_tmp_path: Path) -> Iterator[Daemon]:
    """An `lxd` client of a fake daemon (`fake_daemon.Handler`) on a short socket path."""
    path = short_tmp_path / "unix.socket"
    server = UnixHTTPServer(str(path), Handler)
    # BaseHTTPRequestHandler wants a client address it can print; a unix socket has none.
    server.get_request = lambda: (server.socket.accept()[0], ("local", 0))  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Daemon(path, "lxd")
    server.shutdown()
    server.server_close()
