"""Shared pieces of the harness's and the guests' tests: run a coroutine with a deadline, talk
to a QEMU ring, make a stand-in .deb, run pytest on a user's test directory.

Every QEMU here is cheap: `-machine none` (chardevs only) or a paused `-S` q35 (devices, but
no guest code ever runs). `QemuProcess` kills and reaps it on every exit path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, TypeVar

from lxd_agent.protocol import PORT_NAME
from lxd_agent_harness.base.aio import bounded
from lxd_agent_harness.lxd.layouts import ReadingRule, Ring, get_layout
from lxd_agent_harness.lxd.monitor import RingbufMonitor
from lxd_agent_harness.qemu.process import QemuProcess
from lxd_agent_harness.vm.accel import Accel
from lxd_agent_harness.vm.config import DirectBoot, GuestImage, VmConfig, VmFiles

T = TypeVar("T")

# A QEMU with no machine: chardevs and QMP only, nearly free to start.
MACHINE_NONE = ["-machine", "none", "-nodefaults", "-display", "none"]

# A paused q35: a PCI bus for virtio-serial devices, and no guest CPU ever runs.
MACHINE_PAUSED = ["-machine", "q35", "-S", "-nodefaults", "-display", "none"]

TEST_DEADLINE = 60.0


def run(awaitable: Awaitable[T], deadline: float = TEST_DEADLINE) -> T:
    """Run `awaitable` in a fresh event loop; fail rather than hang after `deadline` s."""
    return asyncio.run(bounded(awaitable, deadline))


def ring_qemu(*chardev_ids: str, size: int = 16, paused: bool = False) -> QemuProcess:
    """A `-machine none` QEMU with one ring-buffer chardev per id."""
    args = [*MACHINE_NONE, *(["-S"] if paused else [])]
    for chardev_id in chardev_ids:
        args += ["-chardev", f"ringbuf,id={chardev_id},size={size}"]
    return QemuProcess(args, name="test-qemu")


async def write_ring(qemu: QemuProcess, chardev_id: str, data: bytes) -> None:
    """What a guest write does to the ring, done from the host side (base64: any bytes)."""
    await qemu.qmp.execute(
        "ringbuf-write",
        {"device": chardev_id, "data": base64.b64encode(data).decode("ascii"), "format": "base64"},
    )


async def read_ring(qemu: QemuProcess, chardev_id: str, size: int = 16) -> bytes:
    reply = await qemu.qmp.execute(
        "ringbuf-read", {"device": chardev_id, "size": size, "format": "base64"}
    )
    assert isinstance(reply, str)
    return base64.b64decode(reply)


@contextlib.asynccontextmanager
async def monitored_ring(
    *,
    size: int = 16,
    paused: bool = False,
    rule: ReadingRule = ReadingRule.LXD,
    **monitor_options: Any,
) -> AsyncIterator[tuple[QemuProcess, RingbufMonitor]]:
    """A QEMU with one ring, chardev `ring`, monitored as port `PORT_NAME` by `rule`."""
    async with ring_qemu("ring", size=size, paused=paused) as qemu, RingbufMonitor(
        qemu.qmp, [Ring(PORT_NAME, "ring", rule)], **monitor_options
    ) as monitor:
        yield qemu, monitor


def minimal_deb(directory: Path, version: str = "1.0") -> Path:
    """A real (empty) .deb that `dpkg-deb` accepts, named like ours; tiny and quick to make."""
    name = f"lxd-status-agent_{version}_all.deb"
    root = directory / f"deb-root-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: lxd-status-agent\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: tests <tests@example.invalid>\nDescription: a test stand-in\n"
    )
    deb = directory / name
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return deb


def unbooted_config(tmp_path: Path, accel: Accel) -> tuple[VmConfig, VmFiles]:
    """An lxd-5.20 config for an image that does not exist: for tests that never boot."""
    image = GuestImage(tmp_path / "image")
    config = VmConfig(layout=get_layout("lxd-5.20"), boot=DirectBoot(image), accel=accel)
    return config, VmFiles(tmp_path / "run")


def harness_command(*args: str) -> list[str]:
    """`lxd-agent-harness ARGS` as this test run's Python runs it (`-m lxd_agent_harness`)."""
    return [sys.executable, "-m", "lxd_agent_harness", *args]


# -- pytest on a user's directory, with the plugin as its entry point loads it ------------------

RUN_TIMEOUT = 900


def pytest_in(directory: Path, *args: str, deb: Path | None = None) -> list[str]:
    """pytest's command line in `directory`, this run's Python, the plugin loaded by entry point."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    if deb is not None:
        # With `=`: pytest finds its rootdir before plugins register their options, and takes
        # the value of an option it does not know yet for a path to test.
        command.append(f"--lxd-deb={deb}")
    return command


def user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("LXD_AGENT_DEB", "PYTEST_ADDOPTS")}


def run_pytest(
    directory: Path, *args: str, deb: Path | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        pytest_in(directory, *args, deb=deb),
        cwd=directory,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    print(done.stdout[-6000:], done.stderr[-2000:])
    return done
