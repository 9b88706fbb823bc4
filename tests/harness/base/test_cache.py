"""Tests for lxd_agent_harness.base.cache: where the harness keeps its images and verdicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lxd_agent_harness.base import cache
from lxd_agent_harness.base.cache import CacheBusy, building, cache_root


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


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lxd_agent_harness.base.cache import building
with building(Path(sys.argv[1]), 5, print):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    Path(sys.argv[1] + ".done").touch()  # the last thing before letting go
"""


def _holder(lock: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding `lock` for `seconds`, once it has said so."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_second_builder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "tree-x.lock"
    holder = _holder(lock, 1.0)
    said: list[str] = []
    with building(lock, timeout=30, progress=said.append):
        assert lock.with_name(lock.name + ".done").exists()  # the first had finished
    holder.wait()
    assert len(said) == 1 and str(lock) in said[0]


def test_a_lock_held_past_the_timeout_is_cache_busy_naming_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "LOCK_POLL", 0.05)
    lock = tmp_path / "tree-y.lock"
    holder = _holder(lock, 30.0)
    with pytest.raises(CacheBusy) as caught, building(lock, timeout=0.3, progress=lambda _: None):
        pass
    assert caught.value.lock == lock and caught.value.waited >= 0
    assert holder.poll() is None  # gave up while the holder still held it
    holder.terminate()
    holder.wait()
    with building(lock, timeout=1, progress=lambda _: None):  # free again
        pass
