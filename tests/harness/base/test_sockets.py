"""Tests for lxd_agent_harness.base.sockets: where the harness's unix sockets can go."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from lxd_agent_harness.base import sockets


def test_a_short_temporary_directory_is_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = Path("/tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    assert sockets.socket_base() == short


def test_a_temporary_directory_with_no_room_for_a_socket_gives_way_to_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = tmp_path / ("d" * 80)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    # Where it would have gone: longer than any unix socket's path may be.
    would = long / "lxd-agent-qemu-12345678" / "qmp.sock"
    assert len(str(would)) > sockets.SOCKET_PATH_MAX
    base = sockets.socket_base()
    assert base == Path("/tmp")
    with socket.socket(socket.AF_UNIX) as bound, tempfile.TemporaryDirectory(dir=base) as room:
        bound.bind(str(Path(room) / "lxd-agent-qemu-12345678.sock"))  # the same length fits
