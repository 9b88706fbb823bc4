"""Tests for lxd_agent_harness.base.cache: where the harness keeps its images and verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lxd_agent_harness.base.cache import cache_root


def test_cache_root_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "lxd-agent"


def test_without_xdg_cache_home_the_cache_is_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / ".cache" / "lxd-agent"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # set but empty: as if unset (the XDG spec)
    assert cache_root() == tmp_path / ".cache" / "lxd-agent"


def test_naming_the_cache_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert not cache_root().exists()
    assert list(tmp_path.iterdir()) == []
