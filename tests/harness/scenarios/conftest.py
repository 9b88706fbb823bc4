"""Fixtures shared by the scenario tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lxd_agent_harness.image.agents import AGENTS, emulation_deb
from lxd_agent_harness.image.cloud import CloudImage, build_cloud_image, cloud_spec
from tests.vms import Figures


@pytest.fixture(scope="session")
def cloud_images(deb: Path, figures: Figures) -> dict[str, CloudImage]:
    """The cloud image three ways: our package in it, the LXD 5.0 emulation's, no agent."""
    started = time.monotonic()
    emulation = emulation_deb(AGENTS["lxd-5.0"], print)
    images = {
        "ours": build_cloud_image(cloud_spec(debs=(deb,)), progress=print),
        "lxd-5.0": build_cloud_image(cloud_spec(debs=(emulation,)), progress=print),
        "none": build_cloud_image(cloud_spec(), progress=print),
    }
    figures["check: three cloud images, build or reuse"] = f"{time.monotonic() - started:.1f} s"
    return images
