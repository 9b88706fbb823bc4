"""Tests for lxd_agent_harness.host.daemon without a daemon: versions, and refusals. The real
daemon's start and stop are tested in tests/harness/scenarios/test_host_check.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.host.daemon import LocalDaemon, parse_version


@pytest.mark.parametrize(
    ("text", "version"),
    [("5.0.2", (5, 0, 2)), ("6.0.4-1\n", (6, 0, 4)), ("5.21.1 LTS", (5, 21, 1)), ("", ())],
)
def test_versions_are_their_leading_numbers(text: str, version: tuple[int, ...]) -> None:
    assert parse_version(text) == version


def test_a_missing_lxd_binary_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DaemonError) as raised, LocalDaemon(print, binary=str(tmp_path / "lxd")):
        pass
    assert "make setup" in str(raised.value)
