"""Fixtures every VM test shares (tests/in_vm and the harness's VM tests in tests/harness): the
package under test, its image, the measured figures."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from lxd_agent_harness.image.deb import PackageNotFound
from lxd_agent_harness.image.rootfs import ImageSpec, build_image
from lxd_agent_harness.vm.config import GuestImage
from tests.repo import built_deb
from tests.vms import TOOLS, Figures


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `last` run after all others: they check what the others left behind."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


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
