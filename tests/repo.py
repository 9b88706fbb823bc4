"""Where the tests find this repository's files and the agent's package built from it."""

from __future__ import annotations

from pathlib import Path

from lxd_agent_harness.image.deb import find_deb

REPO = Path(__file__).resolve().parents[1]
"""The clone under test: its `out/`, `systemd/`, `debian/` and README."""


def built_deb() -> Path:
    """The package under test: `$LXD_AGENT_DEB` if set, else the newest in this clone's out/."""
    return find_deb(places=[REPO])
