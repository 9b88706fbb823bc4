"""Tests for lxd_agent_harness.cli.interrupt: interrupting the real `lxd-agent-harness` (a
subprocess) leaves nothing behind.

Each test starts the command line, waits for a line of its output that marks a moment (QEMU up,
mmdebstrap installing with the host's /proc and /sys mounted in its tree, mke2fs), sends SIGINT
or SIGTERM, and then counts what is left: mounts under the cache, `.build-*` directories, the
command's temporary directories (its TMPDIR is private) and processes it started (each carries a
marker in its environment). All must be zero, the exit status 128+signum, the last line say so.

The image builds run mmdebstrap for real (`slow`: tens of seconds each, the host's mirror); the
boots run a guest (`vm`).
"""

from __future__ import annotations

import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lxd_agent_harness.image.buildsteps import mounts_under
from lxd_agent_harness.qemu.process import process_exists
from lxd_agent_harness.vm.config import GuestImage
from tests.helpers import harness_command
from tests.repo import REPO, built_deb
from tests.vms import BOOT_TIMEOUT

# Bounds: an image build gets to any of its moments within a few minutes, a boot (after the
# machine-wide VM lock, which other runs may hold) too; the cleanup after a signal is quick.
REACH_TIMEOUT = 900.0
EXIT_TIMEOUT = 90.0


@dataclass
class Leftovers:
    mounts: list[str] = field(default_factory=list)
    build_dirs: list[Path] = field(default_factory=list)
    temp_entries: list[Path] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)

    def total(self) -> int:
        kinds: list[list[str] | list[Path]] = [
            self.mounts,
            self.build_dirs,
            self.temp_entries,
            self.processes,
        ]
        return sum(len(kind) for kind in kinds)


@dataclass
class Interrupted:
    status: int
    lines: list[str]
    left: Leftovers


def _marked_processes(marker: str) -> list[str]:
    """Processes (but this one) whose environment holds `marker`: what the command started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                found.append(f"{entry.name}: {cmdline.decode(errors='replace')[:120]}")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


def _leftovers(cache: Path | None, tmp: Path, marker: str) -> Leftovers:
    left = Leftovers(temp_entries=sorted(tmp.iterdir()), processes=_marked_processes(marker))
    if cache is not None:
        left.mounts = mounts_under(cache)
        left.build_dirs = sorted(cache.glob("*/.build-*"))
    return left


def interrupt_harness(
    args: list[str], at: str, signum: int, tmp_path: Path, private_cache: bool
) -> Interrupted:
    """Run `lxd-agent-harness ARGS`, send `signum` at the first output line containing `at`."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = f"LXD_AGENT_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "TMPDIR": str(tmp), marker.split("=")[0]: marker.split("=")[1]}
    cache = None
    if private_cache:
        cache = tmp_path / "cache"
        env["XDG_CACHE_HOME"] = str(cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lxd_agent_harness", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + REACH_TIMEOUT
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"the harness ended before {at!r}:\n" + "\n".join(seen[-30:]))
            seen.append(line)
            if at in line:
                break
        proc.send_signal(signum)
        status = proc.wait(timeout=EXIT_TIMEOUT)
        reader.join(timeout=10)
        while (line := lines.get_nowait() if not lines.empty() else None) is not None:
            seen.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Interrupted(status, seen, _leftovers(cache, tmp, marker))


def _check(result: Interrupted, signum: int) -> None:
    tail = "\n".join(result.lines[-15:])
    assert result.status == 128 + signum, tail
    assert result.lines[-1].startswith(f"INTERRUPTED: {signal.Signals(signum).name}"), tail
    assert result.left.total() == 0, result.left


def _deb_args() -> list[str]:
    return ["--deb", str(built_deb())]


# -- image builds (real mmdebstrap) ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("at", "signum"),
    [
        ("I: downloading packages with apt", signal.SIGINT),
        # The host's /proc, /sys and /dev are mounted inside the tree from here on.
        ("I: installing essential packages", signal.SIGTERM),
        ("image: mke2fs", signal.SIGTERM),
    ],
    ids=["sigint-downloading", "sigterm-installing-with-mounts", "sigterm-mke2fs"],
)
def test_an_interrupted_image_build_leaves_nothing(at: str, signum: int, tmp_path: Path) -> None:
    result = interrupt_harness(["image", *_deb_args()], at, signum, tmp_path, private_cache=True)
    _check(result, signum)


@pytest.mark.slow
def test_an_interrupted_cloud_image_build_leaves_nothing(tmp_path: Path) -> None:
    result = interrupt_harness(
        ["image", "--cloud"],
        "I: installing remaining packages",
        signal.SIGTERM,
        tmp_path,
        private_cache=True,
    )
    _check(result, signal.SIGTERM)


# -- boots ---------------------------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.parametrize(
    ("at", "signum"),
    [
        ("guest paused", signal.SIGTERM),
        ("console: kernel up", signal.SIGINT),
        ("STARTED seen", signal.SIGTERM),
    ],
    ids=["sigterm-qemu-paused", "sigint-kernel-up", "sigterm-agent-started"],
)
def test_an_interrupted_boot_leaves_nothing(at: str, signum: int, short_tmp_path: Path) -> None:
    result = interrupt_harness(
        ["boot", *_deb_args(), "--accel", "tcg"], at, signum, short_tmp_path, private_cache=False
    )
    _check(result, signum)


@pytest.mark.vm
def test_harness_keep_cleans_up_after_ctrl_c(deb: Path, guest_image: GuestImage) -> None:
    proc = subprocess.Popen(
        harness_command(
            "boot", "--layout", "lxd-5.20", "--accel", "tcg", "--deb", str(deb), "--keep"
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    pid = qmp = None
    try:
        # From QEMU's start: before it, the harness may wait its turn for the machine's cores
        # (`vm.lock`) for as long as the other workers' guests hold them.
        deadline = math.inf
        for line in proc.stdout:
            lines.append(line)
            if "QEMU started" in line:
                deadline = time.monotonic() + BOOT_TIMEOUT
            if m := re.search(r"QEMU pid: +(\d+)", line):
                pid = int(m.group(1))
            if m := re.search(r"QMP: +(\S+)", line):
                qmp = Path(m.group(1))
            if pid is not None or time.monotonic() > deadline:
                break
        assert pid is not None and qmp is not None, "".join(lines)
        assert process_exists(pid) and qmp.is_socket()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print("".join(lines), rest)
    assert proc.returncode == 130, rest
    assert not process_exists(pid), f"QEMU {pid} survived Ctrl-C"
    assert not qmp.parent.exists(), f"{qmp.parent} survived Ctrl-C"
