"""Tests for lxd_agent_harness.image.seed: the NoCloud seed that carries the package into a guest
and installs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lxd_agent_harness.image.seed import make_seed_iso, user_data
from tests.helpers import minimal_deb


@pytest.fixture
def fake_deb(tmp_path: Path) -> Path:
    return minimal_deb(tmp_path)


def test_the_seed_carries_the_package_and_installs_it(fake_deb: Path, tmp_path: Path) -> None:
    text = user_data(fake_deb)
    assert text.startswith("#cloud-config\n")
    config = json.loads(text.split("\n", 1)[1])
    (written,) = config["write_files"]
    assert written["encoding"] == "b64" and written["path"].endswith(fake_deb.name)
    assert "dpkg -i" in config["runcmd"][0][2]
    iso = make_seed_iso(fake_deb, tmp_path / "seed.iso")
    head = iso.read_bytes()[32768 : 32768 + 2048]  # the primary volume descriptor
    assert head[1:6] == b"CD001" and head[40:46] == b"cidata"
    assert not (tmp_path / "seed.iso.partial").exists()
