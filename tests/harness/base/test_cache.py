"""Tests for lxd_agent_harness.base.cache: where the harness keeps its images and verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxd_agent_harness.base.cache import cache_root


def test_cache_root_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "lxd-agent"
