"""A daemon's state directory is locked while in use; what a killed run left is reclaimed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lxd_agent_harness.host import statedir
from lxd_agent_harness.host.statedir import (
    OWNER_LOCK,
    UNLOCKED_GRACE,
    new_state_directory,
    processes_naming,
    reclaim_abandoned,
)
from lxd_agent_harness.image.buildsteps import mounts_under


@pytest.fixture(autouse=True)
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """State directories go to this test's own directory, never /tmp's real ones."""
    monkeypatch.setattr(statedir, "state_base", lambda: tmp_path)
    return tmp_path


def running(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process that waits, once it runs (/proc shows an empty command line while it execs)."""
    code = "print(flush=True); import time; time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    child.stdout.readline()
    return child


def holder(path: Path) -> subprocess.Popen[bytes]:
    """A process that names `path` in its environment, as a daemon names its LXD_DIR."""
    return running(env=dict(os.environ, LXD_DIR=str(path / "state")))


def abandon(kind: str) -> Path:
    """A directory made and locked by a process that is then killed outright."""
    code = (
        "import pathlib, time\n"
        "from lxd_agent_harness.host.statedir import new_state_directory\n"
        f"print(new_state_directory({kind!r}, pathlib.Path({str(statedir.state_base())!r})).path,"
        " flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None
    path = Path(child.stdout.readline().decode().strip())
    child.kill()
    child.wait()
    return path


def test_a_directory_a_killed_run_left_is_reclaimed_with_its_processes_and_mounts(
    base: Path,
) -> None:
    path = abandon("lxd")
    assert path.parent == base and (path / OWNER_LOCK).is_file()
    (path / "state" / "shmounts").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path / "state" / "shmounts")], check=True)
    orphan = holder(path)
    try:
        (reclaimed,) = reclaim_abandoned()
        assert orphan.wait(timeout=10) == -9
    finally:
        orphan.kill()
        orphan.wait()
    assert (reclaimed.path, reclaimed.processes, reclaimed.mounts) == (path, (orphan.pid,), 1)
    assert not path.exists() and mounts_under(base) == []
    assert "left by a run that was killed" in reclaimed.describe()


def test_a_directory_in_use_is_left_alone_whether_this_process_or_another_holds_it() -> None:
    ours = new_state_directory("incus")
    theirs = holder(ours.path)
    try:
        assert reclaim_abandoned() == []
        assert (ours.path / OWNER_LOCK).is_file() and theirs.poll() is None
        ours.release()
        (reclaimed,) = reclaim_abandoned()
        assert reclaimed.processes == (theirs.pid,)
    finally:
        theirs.kill()
        theirs.wait()


def test_a_directory_without_a_lock_is_taken_only_when_old_and_named_by_no_process(
    base: Path,
) -> None:
    young = base / "lxd-agent-lxd-young"
    old = base / "lxd-agent-lxd-old"
    named = base / "lxd-agent-lxd-named"
    for path in (young, old, named):
        path.mkdir()
    long_ago = time.time() - UNLOCKED_GRACE - 60
    for path in (old, named):
        os.utime(path, (long_ago, long_ago))
    user = holder(named)
    try:
        assert [r.path for r in reclaim_abandoned(("lxd",))] == [old]
        assert young.is_dir() and named.is_dir() and user.poll() is None
    finally:
        user.kill()
        user.wait()


def test_only_directories_named_as_the_harness_names_them_are_looked_at(base: Path) -> None:
    other = base / "lxd-other-1"
    other.mkdir()
    (other / OWNER_LOCK).touch()
    assert reclaim_abandoned() == [] and other.is_dir()


def test_a_process_naming_a_directory_is_found_by_its_command_line(base: Path) -> None:
    path = base / "lxd-agent-lxd-x"
    child = running(str(path))
    try:
        assert processes_naming(path) == [child.pid]
    finally:
        child.kill()
        child.wait()
