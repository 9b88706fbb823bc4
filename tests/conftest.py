"""Fixtures every VM test shares (tests/in_vm and the harness's VM tests in tests/harness): the
package under test, its image, the measured figures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from lxd_agent_harness.image.deb import PackageNotFound
from lxd_agent_harness.image.rootfs import ImageSpec, build_image
from lxd_agent_harness.vm.config import GuestImage
from tests.helpers import harness_command
from tests.repo import REPO, built_deb
from tests.vms import TOOLS, Figures


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `last` run after all others: they check what the others left behind."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


# The arm64 tree is the one slow build (about ten minutes of qemu-user on one core, README
# "Where make test spends its time"); the tests that need it come late. It is built from the
# start of the session in a process of its own at a low priority, so it takes the cores the
# guests leave idle and the amd64 boots keep theirs; test_arm64's fixtures then wait for it on
# the cache's build lock, or find it done.
ARM64_PREBUILD = ("image", "--cloud", "--agent", "ours", "--arch", "arm64")
PREBUILD_NICE = 10
PREBUILD_STOP_TIMEOUT = 120.0
_prebuild: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _prebuild
    wanted = any(item.nodeid.startswith("tests/in_vm/test_arm64.py") for item in session.items)
    if not wanted or session.config.option.collectonly:
        return
    try:
        deb = built_deb()
    except PackageNotFound:
        return  # the `deb` fixture fails the VM tests with the reason
    log = REPO / "out" / "arm64-prebuild.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("wb") as output:
        _prebuild = subprocess.Popen(
            [
                "nice",
                "-n",
                str(PREBUILD_NICE),
                *harness_command(*ARM64_PREBUILD, "--deb", str(deb)),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The background build ends with the session: asked to stop (it cleans up its build
    directory) if the tests that needed it did not wait for it, killed if it does not."""
    if _prebuild is None or _prebuild.poll() is not None:
        return
    _prebuild.send_signal(signal.SIGTERM)
    try:
        _prebuild.wait(timeout=PREBUILD_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(_prebuild.pid, signal.SIGKILL)
        _prebuild.wait()


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """Measured figures, printed after the run whether the tests passed or not."""
    measured: Figures = {}
    yield measured
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not measured:
        return
    # Session teardown runs inside the last test's captured teardown: print past the capture.
    with capture.global_and_fixture_disabled():
        reporter.section("Measured figures (guests under TCG; the agent's start storm)")
        for name, value in measured.items():
            reporter.write_line(f"{name:<48} {value}")


@pytest.fixture(scope="session")
def deb() -> Path:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH: the VM tests need it; run `make setup`")
    try:
        return built_deb()
    except PackageNotFound as e:
        pytest.fail(f"the VM tests need the package: {e}")


@pytest.fixture(scope="session")
def guest_image(deb: Path, figures: Figures) -> GuestImage:
    """The image with the package installed (bookworm), built once per session (or reused)."""
    started = time.monotonic()
    image = build_image(ImageSpec(debs=(deb,)), progress=print)
    figures["image with the .deb: build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return image
